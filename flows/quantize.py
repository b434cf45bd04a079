"""The quantize flow: params -> data -> float model -> PTQ or QAT -> convert -> QDQ export -> verify -> TIDL bundle.

Every stage runs through the content-addressed cache (`tasks.cache.StageRunner`); publish never does. A gate failure
fails the flow after the summary is written.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, tags
from prefect.runtime import flow_run

from tasks import autopilot, files, storage, tracking
from tasks.baseline_ort import baseline_ort_task
from tasks.cache import Manifest, StageRunner
from tasks.calibrate import calibrate_task
from tasks.convert import convert_task
from tasks.errors import GateFailed, UserError
from tasks.evaluate_float import evaluate_float_task
from tasks.export_qdq import export_qdq_task
from tasks.float_model import float_model_task
from tasks.inputs import fingerprint
from tasks.params import Params, QuantParams, load_params
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
    choice = None
    if p.quant.mode == "auto":
        prepared, qdq, choice = run_autopilot(stages, p, model, data, float_eval)
    else:
        prepared, _, qdq, _ = run_recipe(stages, p, p.quant, model, data, float_eval)
    sensitivity = stages.run(sensitivity_task, p.sensitivity, prepared, model, data, qdq) \
        if p.sensitivity.enabled else None
    stages.run(tidl_bundle_task, p.tidl, qdq, data, sensitivity)
    ids["s3_uri"] = dest.uri if dest else None
    # Two runs of one model share its folder: each writes, logs and uploads it before the other may replace it.
    with files.lock(p.model_dir.with_name(f"{p.model_dir.name}.publish")):
        summary = publish_task(p, stages.manifests, stages.timings, ids, [run.warning] if run.warning else [], choice)
        tracking.track_task(run, p, summary, p.model_dir.resolve(), histories(stages.manifests))
        if dest is not None:
            storage.upload_task(dest, p.model_dir.resolve())
    if not summary["gate"]["passed"]:
        raise GateFailed(f"{summary['model']}: the quality gate failed: {'; '.join(summary['gate']['reasons'])}. "
                         f"The report is in {p.model_dir / 'summary.json'}.")
    return summary


def run_recipe(stages: StageRunner, p: Params, quant: QuantParams, model: Manifest, data: Manifest,
               float_eval: Manifest, tag: str = "") -> tuple[Manifest, Manifest, Manifest, Manifest]:
    """PTQ or QAT with one recipe, then convert, export and verify: (prepared, int8, qdq, verified)."""
    device = p.tidl.target_device
    if quant.mode == "qat":
        prepared = stages.run(train_qat_task, quant, p.qat, device, model, data, label=f"train_qat{tag}")
    else:
        prepared = stages.run(calibrate_task, quant, device, model, data, label=f"calibrate{tag}")
    int8 = stages.run(convert_task, prepared, model, data, label=f"convert{tag}")
    qdq = stages.run(export_qdq_task, p.export, device, int8, prepared, model, label=f"export_qdq{tag}")
    verified = stages.run(verify_onnx_task, p.verify, qdq, float_eval, int8, data, label=f"verify_onnx{tag}")
    return prepared, int8, qdq, verified


def run_autopilot(stages: StageRunner, p: Params, model: Manifest, data: Manifest,
                  float_eval: Manifest) -> tuple[Manifest, Manifest, dict[str, Any]]:
    """The autopilot's PTQ recipes side by side (Prefect runs each stage's calls in parallel), QAT from the best when
    none passes the gate; the winner's folders become the run's. Returns (prepared, qdq, the choice and why)."""
    candidates = autopilot.grid(p.quant, p.autopilot)
    device = p.tidl.target_device

    def each(task: Any, name: str, calls: list[tuple]) -> list[Manifest]:
        return stages.run_many(task, calls, [f"{name}:{c.label}" for c in candidates])

    prepared = each(calibrate_task, "calibrate", [(c.quant, device, model, data) for c in candidates])
    int8 = each(convert_task, "convert", [(pr, model, data) for pr in prepared])
    pairs = list(zip(int8, prepared, strict=True))
    qdq = each(export_qdq_task, "export_qdq", [(p.export, device, i, pr, model) for i, pr in pairs])
    pairs = list(zip(qdq, int8, strict=True))
    verified = each(verify_onnx_task, "verify_onnx", [(p.verify, q, float_eval, i, data) for q, i in pairs])
    outcomes = {c.label: ("calibrate", *m) for c, *m in zip(candidates, prepared, int8, qdq, verified, strict=True)}

    def decide() -> dict[str, Any]:
        results = [files.read_json(outcomes[c.label][4].path("verify.json")) for c in candidates]
        return autopilot.choose(candidates, results, candidates[0].label)

    choice = decide()
    if not choice["passed"]:
        best = next(c for c in candidates if c.label == choice["winner"])
        qat = autopilot.Candidate.of(best.quant.model_copy(update={"mode": "qat"}))
        outcome = run_recipe(stages, p, qat.quant, model, data, float_eval, tag=f":{qat.label}")
        outcomes[qat.label] = ("train_qat", *outcome)
        candidates.append(qat)
        choice = decide()
    kind, *winner = outcomes[choice["winner"]]
    for name, manifest in zip((kind, "convert", "export_qdq", "verify_onnx"), winner, strict=True):
        stages.manifests[name] = manifest  # publish and the report read the winner under the stage names
    return winner[0], winner[2], choice
