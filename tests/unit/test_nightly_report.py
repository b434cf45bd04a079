"""The nightly's table on its Prefect flow run: failures and regressions first, each model linked to its run."""

from __future__ import annotations

from tidlq.results import nightly_report


def result(name: str, status: str) -> dict:
    return {"name": name, "status": status, "flow_run_id": f"id-{name}", "accuracy": 98.0, "accuracy_drop": 0.5,
            "sqnr_db": 30.0, "reasons": [] if status in ("first", "held") else [f"{name} is worse"]}


def test_failures_and_regressions_come_first_each_linked() -> None:
    results = [result("a", "held"), result("b", "regressed"), result("c", "first"), result("d", "failed")]
    table = nightly_report.flow_run_markdown(results, "http://127.0.0.1:4200/")
    rows = [line for line in table.splitlines() if line.startswith("| [")]
    assert [row.split("]")[0].removeprefix("| [") for row in rows] == ["d", "b", "a", "c"]
    assert rows[0].startswith("| [d](http://127.0.0.1:4200/runs/flow-run/id-d) | failed | 98.00 | 0.50 | 30.0 |")
    assert "d is worse" in rows[0] and "![" not in table  # no picture: it is the MLflow report's


def test_without_a_ui_the_names_are_plain() -> None:
    table = nightly_report.flow_run_markdown([result("a", "first")], None)
    assert "| a | first |" in table and "](" not in table
