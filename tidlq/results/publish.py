"""Publishing a flow run, as one step: the model's output folder `<output_dir>/<model name>/` with `summary.json`
and the report, the MLflow run (params, metrics, artifacts, registered model), and the S3 copy. Never cached: it is
the run's side effect, and what a person or a script reads after a run.

The flow run gets Prefect artifacts (its Artifacts tab): the key numbers as a table, links to the MLflow run and
the S3 copy.

The folder holds `summary.json`, `model_qdq.onnx`, `float.onnx`, `float.pt`, `int8.pt`, `params.json` (the
validated params of the run), `tidl/` (the bundle) and the report; it is replaced in one rename. Two runs of one
model publish one after the other (a lock beside the folder). Last, after tracking and the S3 upload,
`<model>.published.json` beside the folder records the publish for the next run's up-to-date check
(`tidlq.results.uptodate`).
"""

from __future__ import annotations

import re
import shutil
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tidlq.core import files
from tidlq.core.errors import GateFailed
from tidlq.results import report, storage, tracking, uptodate
from tidlq.results.summary import artifact_paths, build_summary, histories, metric_rows

if TYPE_CHECKING:
    from tidlq.core.params import Params
    from tidlq.runner import Outcome

# (stage, file in its folder) -> name in the published folder
PUBLISHED_FILES = {
    ("export_qdq", "model_qdq.onnx"): "model_qdq.onnx",
    ("evaluate_float", "float.onnx"): "float.onnx",
    ("float_model", "float.pt"): "float.pt",
    ("convert", "int8.pt"): "int8.pt",
}


def destination(params: Params, run: tracking.TrackedRun) -> storage.Destination | None:
    """Where the run's outputs go in S3 (None: no bucket), checked now, before any work is spent."""
    dest = storage.destination(params.storage, params.model.display_name, run.run_id or run.flow_run_id)
    storage.preflight(dest)
    return dest


def publish(params: Params, outcome: Outcome, run: tracking.TrackedRun,
            dest: storage.Destination | None) -> dict[str, Any]:
    """The output folder, the MLflow run and the S3 copy of a flow run's outcome; its summary."""
    folder = params.model_dir.resolve()
    ids = {"mlflow_run_id": run.run_id, "prefect_flow_run_id": run.flow_run_id, "s3_uri": dest.uri if dest else None}
    with files.lock(folder.with_name(f"{folder.name}.publish")):
        summary = output_task(params, outcome, ids, [run.warning] if run.warning else [])
        tracking.track_task(run, params, summary, folder, histories(outcome.manifests))
        if dest is not None:
            storage.upload_task(dest, folder)
        flow_run_artifacts(summary, run)
        uptodate.record(params, summary)  # last: what the next `tidlq run` checks (not uploaded)
    return summary


def flow_run_artifacts(summary: dict[str, Any], run: tracking.TrackedRun) -> None:
    """What the Prefect UI shows on the flow run's Artifacts tab: the table of key numbers (the command line's), and
    links to the MLflow run (on a tracking server) and to the S3 copy."""
    from prefect.artifacts import create_link_artifact, create_table_artifact

    key = re.sub(r"[^a-z0-9-]+", "-", summary["model"].lower()).strip("-") or "model"
    create_table_artifact([{"metric": label, "value": value} for label, value in metric_rows(summary)],
                          key=f"{key}-result", description=f"{summary['model']}: {summary['mode']} / "
                          f"{summary['qconfig']} / {summary['target_device']}, gate "
                          f"{'passed' if summary['gate']['passed'] else 'failed'}")
    if run.url:
        create_link_artifact(run.url, link_text=f"MLflow run {run.run_id}", key=f"{key}-mlflow-run")
    if summary["run"]["s3_uri"]:
        create_link_artifact(summary["run"]["s3_uri"], link_text=summary["run"]["s3_uri"], key=f"{key}-s3")
    from prefect import get_run_logger

    get_run_logger().info(
        f"{summary['model']}: int8 accuracy {summary['int8']['accuracy']:.2f} % (drop {summary['accuracy_drop']:.2f} "
        f"points), SQNR {summary['int8']['sqnr_db']:.1f} dB, gate {'passed' if summary['gate']['passed'] else 'FAILED'}"
        f"; MLflow run {run.url or run.run_id or '-'}; S3 {summary['run']['s3_uri'] or '-'}")


def check_gate(summary: dict[str, Any], params: Params) -> None:
    """Fail (after everything is published) when the quality gate did not pass."""
    if not summary["gate"]["passed"]:
        raise GateFailed(f"{summary['model']}: the quality gate failed: {'; '.join(summary['gate']['reasons'])}. "
                         f"The report is in {params.model_dir / 'summary.json'}.")


def write_outputs(params: Params, outcome: Outcome, ids: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """Copy the artifacts to the model's output folder, write summary.json and the report; return the summary."""
    final = params.model_dir.resolve()
    stages = outcome.manifests
    summary = build_summary(params, stages, outcome.timings, artifact_paths(final)) | {
        "run": ids, "autopilot": outcome.choice}
    summary["warnings"] += warnings
    with files.atomic_dir(final) as tmp:
        for (stage, name), published in PUBLISHED_FILES.items():
            shutil.copyfile(stages[stage].path(name), tmp / published)
        shutil.copytree(stages["tidl_bundle"].path("tidl"), tmp / "tidl")
        if "sensitivity" in stages:
            for name in ("sensitivity.json", "sensitivity.png"):
                shutil.copyfile(stages["sensitivity"].path(name), tmp / name)
        files.write_json(tmp / "params.json", params.model_dump(mode="json"))
        files.write_json(tmp / "summary.json", summary)
        report.write(summary, files.read_json(stages["verify_onnx"].path("verify.json")), histories(stages), tmp)
    return summary


@task(name="publish", cache_policy=NO_CACHE)
def output_task(params: Params, outcome: Outcome, ids: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """Prefect task around `write_outputs` (not cached)."""
    return write_outputs(params, outcome, ids, warnings)
