"""The nightly's regression verdict against a champion (pure; the nightly test runs it on the MLflow server)."""

from __future__ import annotations

from tidlq.results.regression import verdict

CHAMPION = {"version": "3", "accuracy": 98.0, "sqnr_db": 34.0}


def new(accuracy: float, sqnr: float, passed: bool = True) -> dict:
    return {"accuracy": accuracy, "sqnr_db": sqnr, "gate_passed": passed}


def test_first_gated_run_becomes_champion() -> None:
    assert verdict(new(90.0, 20.0), None, 0.5, 1.0) == {"status": "first", "reasons": [], "promote": True}
    assert verdict(new(90.0, 20.0, passed=False), None, 0.5, 1.0)["promote"] is False


def test_within_tolerance_holds_and_strictly_better_is_promoted() -> None:
    assert verdict(new(97.6, 33.1), CHAMPION, 0.5, 1.0) == {"status": "held", "reasons": [], "promote": False}
    assert verdict(new(98.0, 34.0), CHAMPION, 0.5, 1.0)["status"] == "held"  # identical: the alias stays
    assert verdict(new(98.0, 34.5), CHAMPION, 0.5, 1.0) == {"status": "improved", "reasons": [], "promote": True}
    assert verdict(new(98.3, 34.5, passed=False), CHAMPION, 0.5, 1.0)["promote"] is False


def test_regressions_name_the_number_and_the_champion() -> None:
    result = verdict(new(97.0, 32.5), CHAMPION, 0.5, 1.0)
    assert result["status"] == "regressed" and result["promote"] is False
    assert result["reasons"] == ["int8 accuracy 97.00 % < champion v3 98.00 % - 0.5",
                                 "logit SQNR 32.5 dB < champion v3 34.0 dB - 1.0"]
