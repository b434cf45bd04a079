"""The quantize flow: the stage graph (`tidlq.graph`: data, float model, PTQ or QAT, convert, QDQ export, verify,
sensitivity, TIDL bundle) for one params file, or the autopilot's recipes side by side; then the run published as
one step (output folder, MLflow, S3). A gate failure fails the flow after everything is published."""

from __future__ import annotations

from typing import Any

from prefect import flow, tags
from prefect.runtime import flow_run

from tidlq import autopilot
from tidlq.core.errors import UserError
from tidlq.core.params import load_params
from tidlq.results import flow_runs, publish, tracking
from tidlq.runner import StageRunner


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
    flow_runs.claim_and_close_crashed("quantize")  # killed runs of this host end CRASHED, not RUNNING forever
    p = load_params(params_path, overrides)
    with tags(p.model.display_name, p.quant.mode, p.tidl.target_device), \
            tracking.tracked_run(p, str(flow_run.id), str(flow_run.name)) as run:
        destination = publish.destination(p, run)  # S3 checked before any work
        stages = StageRunner(p.stage_root, p.autopilot.max_parallel)
        outcome = autopilot.search(stages, p) if p.quant.mode == "auto" else stages.outcome(p)
        summary = publish.publish(p, outcome, run, destination)
        publish.check_gate(summary, p)
        return summary
