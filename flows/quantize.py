"""The quantize flow: params -> data -> float model -> PTQ or QAT -> convert -> QDQ export -> verify -> TIDL bundle.

Every stage runs through the content-addressed cache (`tasks.cache.StageRunner`); publish never does. A gate failure
fails the flow after the summary is written.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, tags
from prefect.runtime import flow_run

from tasks import storage, tracking
from tasks.baseline_ort import baseline_ort_task
from tasks.cache import StageRunner
from tasks.calibrate import calibrate_task
from tasks.convert import convert_task
from tasks.errors import GateFailed, UserError
from tasks.evaluate_float import evaluate_float_task
from tasks.export_qdq import export_qdq_task
from tasks.float_model import float_model_task
from tasks.inputs import fingerprint
from tasks.params import Params, load_params
from tasks.prepare_data import prepare_data_task
from tasks.publish import histories, publish_task
from tasks.sensitivity import sensitivity_task
from tasks.tidl_bundle import tidl_bundle_task
from tasks.train_qat import train_qat_task
from tasks.verify_onnx import verify_onnx_task


def run_name() -> str:
    """`<model>-<mode>-<device>-<time>`: what the Prefect UI lists; params that do not validate name it 'invalid'."""
    parameters = flow_run.parameters
    try:
        p = load_params(parameters.get("params_path", "params.yaml"), parameters.get("overrides"))
        label = f"{p.model.display_name}-{p.quant.mode}-{p.tidl.target_device}"
    except UserError:
        label = "invalid-params"
    return f"{label}-{flow_run.scheduled_start_time:%Y%m%d-%H%M%S}"


@flow(name="quantize", flow_run_name=run_name, log_prints=True)
def quantize(params_path: str | None = "params.yaml", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Quantize one model as `params_path` (plus dotted `overrides`) says; return the run's summary."""
    p = load_params(params_path, overrides)
    with tags(p.model.display_name, p.quant.mode, p.tidl.target_device), \
            tracking.tracked_run(p, str(flow_run.id), str(flow_run.name)) as run:
        return run_pipeline(p, run)


def run_pipeline(p: Params, run: tracking.TrackedRun) -> dict[str, Any]:
    """The stages, then the run's side effects: the output folder, MLflow, S3; then the gate."""
    ids = {"mlflow_run_id": run.run_id, "prefect_flow_run_id": str(flow_run.id)}
    dest = storage.destination(p.storage, p.model.display_name, run.run_id or ids["prefect_flow_run_id"])
    storage.preflight(dest)
    stages = StageRunner(p.stage_root)
    data = stages.run(prepare_data_task, p.data, fingerprint(p.data.source, "data.source"))
    model = stages.run(float_model_task, p.model, p.float_train, fingerprint(p.model.weights, "model.weights"), data)
    float_eval = stages.run(evaluate_float_task, p.export, model, data)
    if p.verify.baseline == "ort":
        stages.run(baseline_ort_task, p.quant, float_eval, data)
    device = p.tidl.target_device
    if p.quant.mode == "qat":
        prepared = stages.run(train_qat_task, p.quant, p.qat, device, model, data)
    else:
        prepared = stages.run(calibrate_task, p.quant, device, model, data)
    int8 = stages.run(convert_task, prepared, model, data)
    qdq = stages.run(export_qdq_task, p.export, device, int8, prepared, model)
    stages.run(verify_onnx_task, p.verify, qdq, float_eval, int8, data)
    sensitivity = stages.run(sensitivity_task, p.sensitivity, prepared, model, data, qdq) \
        if p.sensitivity.enabled else None
    stages.run(tidl_bundle_task, p.tidl, qdq, data, sensitivity)
    ids["s3_uri"] = dest.uri if dest else None
    summary = publish_task(p, stages.manifests, stages.timings, ids, [run.warning] if run.warning else [])
    tracking.track_task(run, p, summary, p.model_dir.resolve(), histories(stages.manifests))
    if dest is not None:
        storage.upload_task(dest, p.model_dir.resolve())
    if not summary["gate"]["passed"]:
        raise GateFailed(f"{summary['model']}: the quality gate failed: {'; '.join(summary['gate']['reasons'])}. "
                         f"The report is in {p.model_dir / 'summary.json'}.")
    return summary
