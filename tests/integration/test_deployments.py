"""The quantize flow as a team runs it: deployments from prefect.yaml on a process work pool of the local stack's
Prefect server, a worker, `prefect deployment run --watch`, and the nightly schedule."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from infra.local.processes import terminate_group
from tests.conftest import FAST, PROJECT_ROOT

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
POOL = "tidlq-test-pool"


def prefect(env: dict[str, str], *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prefect"), *args], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def deployed(stack, tmp_path_factory: pytest.TempPathFactory):
    """The stack's Prefect server with the pool, both deployments, and one worker (stopped by PID at the end)."""
    state, stack_env = stack
    env = os.environ | stack_env | {"TIDLQ_PROJECT_DIR": str(PROJECT_ROOT), "TIDLQ_WORK_POOL": POOL,
                                    "TIDLQ_NIGHTLY_CRON": "0 3 * * *", "PREFECT_WORKER_QUERY_SECONDS": "2",
                                    "PATH": f"{BIN}:{os.environ['PATH']}"}
    assert prefect(env, "work-pool", "create", POOL, "--type", "process").returncode == 0
    done = prefect(env, "--no-prompt", "deploy", "--all")
    assert done.returncode == 0, done.stdout + done.stderr
    log = open(tmp_path_factory.mktemp("worker") / "worker.log", "w")  # noqa: SIM115 - closed below
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL], cwd=PROJECT_ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    yield env
    terminate_group(worker.pid, "prefect worker")
    worker.wait()
    log.close()


def run_deployment(env: dict[str, str], name: str, overrides: dict) -> tuple[int, str]:
    done = prefect(env, "deployment", "run", name, "--param", f"overrides={json.dumps(overrides)}", "--watch",
                   "--watch-timeout", "600")
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)
    return done.returncode, flow_run_id


def flow_run_state(env: dict[str, str], flow_run_id: str) -> tuple[str, str]:
    done = prefect(env, "flow-run", "inspect", flow_run_id, "--output", "json")
    run = json.loads(done.stdout)
    return run["state"]["type"], run["state"]["message"] or ""


def test_adhoc_deployment_run_completes_and_is_tracked(deployed, tmp_path: Path) -> None:
    overrides = FAST | {"output_dir": str(tmp_path), "tracking.experiment": "it-deployed"}
    returncode, flow_run_id = run_deployment(deployed, "quantize/adhoc", overrides)
    state, message = flow_run_state(deployed, flow_run_id)
    assert (returncode, state) == (0, "COMPLETED"), message
    summary = json.loads((tmp_path / "mobilenet_v2_tiny" / "summary.json").read_text())
    assert summary["run"]["prefect_flow_run_id"] == flow_run_id
    client = MlflowClient(deployed["MLFLOW_TRACKING_URI"])
    run = client.get_run(summary["run"]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.flow_run_id"] == flow_run_id
    assert run.data.tags["prefect.flow_run_name"].startswith("mobilenet_v2_tiny-ptq-am68a-")
    artifacts = flow_run_artifacts(deployed, flow_run_id)
    rows = {r["metric"]: r["value"] for r in json.loads(artifacts["mobilenet-v2-tiny-result"].data)}
    assert rows["int8 logit SQNR (dB)"] == f"{summary['int8']['sqnr_db']:.1f}" and rows["gate"] == "passed"
    mlflow_url = f"{deployed['MLFLOW_TRACKING_URI']}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert artifacts["mobilenet-v2-tiny-mlflow-run"].data == f"[MLflow run {run.info.run_id}]({mlflow_url})"


def flow_run_artifacts(env: dict[str, str], flow_run_id: str) -> dict:
    """The Prefect artifacts of a flow run, by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as c:
        found = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {a.key: a for a in found}


def test_bad_param_fails_before_any_work_with_the_reason_in_the_state(deployed, tmp_path: Path) -> None:
    returncode, flow_run_id = run_deployment(deployed, "quantize/adhoc",
                                             {"quant.mode": "bogus", "output_dir": str(tmp_path)})
    state, message = flow_run_state(deployed, flow_run_id)
    assert returncode != 0 and state == "FAILED"
    assert "invalid params" in message and "quant.mode" in message
    assert not tmp_path.joinpath(".stages").exists()


def test_nightly_deployment_has_its_next_run_scheduled(deployed) -> None:
    inspected = prefect(deployed, "deployment", "inspect", "quantize/nightly")
    assert "0 3 * * *" in inspected.stdout and "UTC" in inspected.stdout
    api = deployed["PREFECT_API_URL"]
    deployment = httpx.get(f"{api}/deployments/name/quantize/nightly").json()
    query = {"deployments": {"id": {"any_": [deployment["id"]]}},
             "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}
    deadline = time.monotonic() + 120
    while not (runs := httpx.post(f"{api}/flow_runs/filter", json=query).json()) and time.monotonic() < deadline:
        time.sleep(3)  # the server's scheduler service creates the runs
    starts = sorted(datetime.fromisoformat(r["expected_start_time"]) for r in runs)
    assert starts and starts[0] > datetime.now(UTC)
    assert all((t.astimezone(UTC).hour, t.minute, t.second) == (3, 0, 0) for t in starts)
