"""The nightly's record in MLflow: one run with every model's numbers and verdict, a markdown report, and a plot
of each model's accuracy drop across the last nights."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from tidlq.core import files
from tidlq.results import tracking


def log(uri: str, experiment: str, results: list[dict[str, Any]], history: int, flow_run_id: str) -> str:
    """Create the nightly MLflow run, log the results, the report and the plot; its run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    client = MlflowClient(uri)
    experiment_id = tracking.ensure_experiment(client, experiment, uri)
    past = previous_nights(client, experiment_id, history - 1)
    run = client.create_run(experiment_id, run_name=f"nightly-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={"prefect.flow_run_id": flow_run_id})
    now = int(time.time() * 1000)
    metrics = [Metric(f"{r['name']}.{k}", float(r[k]), now, 0) for r in results
               for k in ("accuracy", "accuracy_drop", "sqnr_db") if r.get(k) is not None]
    metrics += [Metric(f"{r['name']}.regressed", float(r["status"] == "regressed"), now, 0) for r in results]
    metrics += [Metric(f"{r['name']}.failed", float(r["status"] == "failed"), now, 0) for r in results]
    client.log_batch(run.info.run_id, metrics=metrics,
                     tags=[RunTag(f"{r['name']}.status", r["status"]) for r in results])
    nights = [*past, {r["name"]: r.get("accuracy_drop") for r in results}]
    with tempfile.TemporaryDirectory() as tmp:
        plot(nights, Path(tmp) / "nightly.png")
        files.write_text(Path(tmp) / "nightly_report.md", markdown(results))
        files.write_json(Path(tmp) / "nightly.json", {"models": results})
        client.log_artifacts(run.info.run_id, tmp)
    bad = [r for r in results if r["status"] in ("failed", "regressed")]
    client.set_terminated(run.info.run_id, "FAILED" if bad else "FINISHED")
    return run.info.run_id


def previous_nights(client: Any, experiment_id: str, count: int) -> list[dict[str, float]]:
    """{model: accuracy drop} of the last `count` nightly runs, oldest first."""
    if count <= 0:
        return []
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=count)
    return [{k.removesuffix(".accuracy_drop"): v for k, v in r.data.metrics.items() if k.endswith(".accuracy_drop")}
            for r in reversed(runs)]


def markdown(results: list[dict[str, Any]], picture: bool = True) -> str:
    """The nightly's table: every model, its numbers, its champion's, and the verdict with reasons; then the plot
    (`picture`: the MLflow report's `nightly.png`)."""
    lines = ["# Nightly", "", "| model | status | int8 accuracy (%) | drop | SQNR (dB) | champion | reasons |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        champ = r.get("champion") or {}
        champ_text = f"v{champ['version']}: {champ['accuracy']:.2f} % / {champ['sqnr_db']:.1f} dB" if champ else "-"
        numbers = [f"{r[k]:.2f}" if r.get(k) is not None else "-" for k in ("accuracy", "accuracy_drop")]
        sqnr = f"{r['sqnr_db']:.1f}" if r.get("sqnr_db") is not None else "-"
        lines.append(f"| {r['name']} | {r['status']} | {numbers[0]} | {numbers[1]} | {sqnr} | {champ_text} | "
                     f"{'; '.join(r.get('reasons', []))} |")
    return "\n".join(lines) + ("\n\n![accuracy drop per night](nightly.png)\n" if picture else "\n")


def flow_run_markdown(results: list[dict[str, Any]], ui_url: str | None) -> str:
    """The nightly's table for its Prefect flow run's Artifacts tab: failed and regressed models first, each model
    linked to its quantize flow run in the Prefect UI (`ui_url`, when there is one)."""
    order = {"failed": 0, "regressed": 1}
    rows = sorted(results, key=lambda r: order.get(r["status"], 2))
    if ui_url:
        rows = [r | {"name": f"[{r['name']}]({ui_url.rstrip('/')}/runs/flow-run/{r['flow_run_id']})"} for r in rows]
    return markdown(rows, picture=False)


def plot(nights: list[dict[str, float | None]], path: Path) -> None:
    """Accuracy drop per model across the nights (oldest left)."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    models = sorted({m for night in nights for m in night})
    for model in models:
        points = [(i, night[model]) for i, night in enumerate(nights) if night.get(model) is not None]
        if points:
            ax.plot([i for i, _ in points], [v for _, v in points], marker="o", label=model)
    ax.set(xlabel=f"night (last {len(nights)}, tonight rightmost)", ylabel="accuracy drop (points)",
           title="int8 accuracy drop per model")
    if models:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)

