"""The autopilot's grid and choice (pure functions; the flow test runs it for real)."""

from __future__ import annotations

from tidlq import autopilot
from tidlq.core.params import AutopilotParams, QuantParams


def result(sqnr: float, passed: bool, accuracy: float = 98.0) -> dict:
    return {"int8": {"accuracy": accuracy, "agreement": 99.0, "sqnr_db": sqnr}, "accuracy_drop": 0.5,
            "gate": {"passed": passed}}


def test_grid_starts_with_the_params_recipe_and_has_no_duplicates() -> None:
    grid = autopilot.grid(QuantParams(mode="auto"), AutopilotParams())
    labels = [c.label for c in grid]
    assert labels == ["tidl-histogram", "tidl-histogram-bc", "tidl-minmax", "tidl-minmax-bc",
                      "tidl-percentile99.999", "tidl-percentile99.999-bc"]
    assert all(c.quant.mode == "ptq" for c in grid)
    custom = autopilot.grid(QuantParams(qconfig="x86", observer="moving_average"),
                            AutopilotParams(presets=["tidl", "qnnpack"], observers=["minmax"], bias_correction=[False]))
    assert [c.label for c in custom] == ["x86-moving_average", "tidl-minmax", "qnnpack-minmax"]


def test_winner_is_the_best_sqnr_among_those_that_pass() -> None:
    grid = autopilot.grid(QuantParams(), AutopilotParams(observers=["histogram", "minmax"], bias_correction=[False]))
    choice = autopilot.choose(grid, [result(30.0, True), result(35.0, False)], grid[0].label)
    assert choice["winner"] == "tidl-histogram" and choice["passed"]
    assert "1 of 2 recipes that passed" in choice["reason"]
    choice = autopilot.choose(grid, [result(30.0, True), result(31.0, True)], grid[0].label)
    assert choice["winner"] == "tidl-minmax"
    assert [r["sqnr_db"] for r in choice["candidates"]] == [30.0, 31.0]


def test_ties_go_to_accuracy_then_to_the_default() -> None:
    grid = autopilot.grid(QuantParams(), AutopilotParams(observers=["histogram", "minmax"], bias_correction=[False]))
    assert autopilot.choose(grid, [result(30.0, True), result(30.0, True)], grid[0].label)["winner"] == grid[0].label
    choice = autopilot.choose(grid, [result(30.0, True, 97.0), result(30.0, True, 98.0)], grid[0].label)
    assert choice["winner"] == "tidl-minmax"


def test_none_passing_names_the_closest_and_qat_label() -> None:
    grid = autopilot.grid(QuantParams(), AutopilotParams(observers=["histogram", "minmax"], bias_correction=[False]))
    choice = autopilot.choose(grid, [result(30.0, False), result(32.0, False)], grid[0].label)
    assert not choice["passed"] and choice["winner"] == "tidl-minmax"
    assert choice["reason"].startswith("no recipe passed the gate; tidl-minmax came closest")
    qat = autopilot.Candidate.of(grid[1].quant.model_copy(update={"mode": "qat"}))
    assert qat.label == "qat-tidl"
