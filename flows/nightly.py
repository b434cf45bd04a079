"""The nightly over a model zoo: one `quantize` deployment run per model, at most `nightly.max_parallel` in flight
(Prefect spreads them over whatever workers serve the pool), then each result judged against its champion
(`tidlq.results.nightly`), a table artifact on the nightly's flow run (failures and regressions first, each model
linked to its flow run) and a report in the nightly's own MLflow run. One model failing does not stop the others;
the nightly fails at the end, naming every model that failed or regressed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prefect import flow
from prefect.artifacts import acreate_markdown_artifact
from prefect.deployments import arun_deployment
from prefect.runtime import flow_run
from prefect.settings import get_current_settings

from tidlq.core.params import NightlyParams, load_params
from tidlq.results import nightly as zoo
from tidlq.results import nightly_report, tracking


@flow(name="nightly", log_prints=True)
async def nightly(params_path: str = "params.yaml") -> list[dict[str, Any]]:
    """Quantize every model of `nightly.models` (and `nightly.models_file`) and compare each with its champion."""
    p = load_params(params_path)
    models = zoo.entries(params_path, p.nightly)
    runs = await run_all(models, params_path, p.nightly)
    results = zoo.judge_all(models, runs, p.nightly)
    bad = sum(r["status"] in ("failed", "regressed") for r in results)
    await acreate_markdown_artifact(nightly_report.flow_run_markdown(results, get_current_settings().ui_url),
                                    key="nightly-result",
                                    description=f"{len(results)} models, {bad} failed or regressed")
    nightly_report.log(tracking.tracking_uri(), p.nightly.experiment, results, p.nightly.history, str(flow_run.id))
    zoo.check(results)
    return results


async def run_all(models: list[dict[str, Any]], params_path: str, nightly_params: NightlyParams) -> list[Any]:
    """One deployment run per model, at most `max_parallel` at a time; each FlowRun as it ended (or timed out)."""
    gate = asyncio.Semaphore(nightly_params.max_parallel)

    async def one(model: dict[str, Any]) -> Any:
        async with gate:
            return await arun_deployment(nightly_params.deployment, timeout=nightly_params.timeout_minutes * 60,
                                         parameters={"params_path": params_path, "overrides": model["overrides"]},
                                         tags=["nightly", model["name"]], poll_interval=2)

    return list(await asyncio.gather(*(one(m) for m in models)))
