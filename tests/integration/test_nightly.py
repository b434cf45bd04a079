"""The nightly over several models on the local stack: a Prefect server, two process workers (each one flow run at a
time, separate PREFECT_HOMEs: the only shared cache records are the S3 result storage), the MLflow server and S3."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from mlflow import MlflowClient

from flows.nightly import nightly
from infra.local.processes import terminate_group
from infra.results_storage import clear_default, create_block
from tests import servers
from tests.conftest import FAST, PROJECT_ROOT
from tidlq.core import files
from tidlq.core.errors import NightlyFailed

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
POOL = "tidlq-nightly-pool"
QUICK = FAST | {"verify.baseline": "none", "sensitivity.enabled": False}
MODELS = [{"model.source": "mobilenet_v2_tiny"}, {"model.source": "resnet_tiny"},
          {"model.source": "mobilenet_v2_tiny", "model.name": "mobilenet_qat", "quant.mode": "qat"}]


class Workers:
    """Process workers of the test pool, each started in its own session and stopped by PID."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.procs = env, logs, {}

    def start(self, name: str) -> int:
        # one core each: two workers of torch threads on two cores are slower than one (README, Measured)
        env = self.env | {"PREFECT_HOME": str(self.logs / f"home-{name}"), "OMP_NUM_THREADS": "1"}
        log = open(self.logs / f"{name}.log", "a")  # noqa: SIM115 - the worker writes to it until stopped
        proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--limit", "1",
                                 "--name", name], cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc.pid

    def kill(self, name: str) -> None:
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs.pop(name).wait()

    def stop_all(self) -> None:
        for name, proc in list(self.procs.items()):
            terminate_group(proc.pid, f"worker {name}")
            proc.wait()
        self.procs.clear()


@pytest.fixture(scope="module")
def zoo(stack, tmp_path_factory: pytest.TempPathFactory):
    """The pool, quantize/adhoc deployed, S3 result storage, two workers, a params file with three models."""
    _, stack_env = stack
    tmp = tmp_path_factory.mktemp("nightly")
    env = os.environ | stack_env | {"TIDLQ_PROJECT_DIR": str(PROJECT_ROOT), "TIDLQ_WORK_POOL": POOL,
                                    "TIDLQ_NIGHTLY_CRON": "0 3 * * *", "PREFECT_WORKER_QUERY_SECONDS": "2",
                                    "PATH": f"{BIN}:{os.environ['PATH']}"}
    prefect = [str(BIN / "prefect")]
    assert subprocess.run([*prefect, "work-pool", "create", POOL, "--type", "process"], env=env,
                          capture_output=True).returncode == 0
    done = subprocess.run([*prefect, "--no-prompt", "deploy", "--name", "adhoc"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    with on_stack(stack_env):  # the server's default: the workers are given nothing about it
        create_block(stack_env["TIDLQ_S3_BUCKET"], folder="it-results", endpoint_url=stack_env["AWS_ENDPOINT_URL"])
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    for dotted, value in (QUICK | {"output_dir": str(tmp / "outputs"), "nightly.max_parallel": 2,
                                   "nightly.timeout_minutes": 3.0, "tracking.experiment": "it-zoo",
                                   "nightly.experiment": "it-zoo-nightly"}).items():
        section, _, key = dotted.rpartition(".")
        (params[section] if section else params)[key] = value
    params["nightly"]["models"] = MODELS
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    workers = Workers(env, tmp)
    pids = {workers.start("w1"), workers.start("w2")}
    yield {"params": tmp / "params.yaml", "outputs": tmp / "outputs", "env": stack_env, "workers": workers,
           "pids": pids}
    workers.stop_all()
    with on_stack(stack_env):  # the stack serves later tests, some of which stop S3
        clear_default()


@contextlib.contextmanager
def on_stack(env: dict[str, str]) -> Iterator[None]:
    """This process talks to the stack: its environment, and Prefect's settings (read once, so set them too)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with servers.env_applied(env), temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        yield


def run_nightly(zoo: dict, params: Path | None = None) -> list[dict]:
    with on_stack(zoo["env"]):
        return asyncio.run(nightly(str(params or zoo["params"])))


def test_each_model_runs_as_its_own_flow_run_on_both_workers(zoo: dict) -> None:
    results = run_nightly(zoo)
    assert [r["name"] for r in results] == ["mobilenet_v2_tiny", "resnet_tiny", "mobilenet_qat"]
    assert all(r["state"] == "COMPLETED" and r["status"] == "first" and r["gate_passed"] for r in results)
    assert len({r["flow_run_id"] for r in results}) == 3
    client = MlflowClient(zoo["env"]["MLFLOW_TRACKING_URI"])
    parents = {client.get_run(r["mlflow_run_id"]).data.tags["runner.parent_pid"] for r in results}
    assert parents == {str(pid) for pid in zoo["pids"]}  # spread over both workers
    for r in results:  # every first run became its model's champion
        champion = client.get_model_version_by_alias(f"{r['name']}-qdq", "champion")
        assert str(champion.version) == client.get_run(r["mlflow_run_id"]).data.tags["registered_version"]
    s3 = servers.s3_client(zoo["env"])
    listing = s3.list_objects_v2(Bucket=zoo["env"]["TIDLQ_S3_BUCKET"], Prefix="it-results/")
    stored = {o["Key"].removeprefix("it-results/") for o in listing["Contents"]}
    keys = {k for r in results for k in files.read_json(zoo["outputs"] / r["name"] / "summary.json")["stage_keys"]
            .values()}
    assert keys <= stored  # every stage's cache record is in the shared S3 result storage
    nights = client.search_runs([client.get_experiment_by_name("it-zoo-nightly").experiment_id])
    assert {a.path for a in client.list_artifacts(nights[0].info.run_id)} >= {"nightly_report.md", "nightly.png"}
    table = latest_artifact(zoo["env"], "nightly-result")  # on the nightly's flow run: each model, linked
    ui = zoo["env"]["PREFECT_API_URL"].removesuffix("/api")
    for r in results:
        assert f"| [{r['name']}]({ui}/runs/flow-run/{r['flow_run_id']}) | first |" in table.data
    assert table.description == "3 models, 0 failed or regressed"


def latest_artifact(env: dict[str, str], key: str) -> Any:
    """The newest Prefect artifact with `key`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with on_stack(env), get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                     sort=ArtifactSort.CREATED_DESC, limit=1)[0]


def test_a_rerun_is_all_cache_hits_whichever_worker_runs_it(zoo: dict) -> None:
    results = run_nightly(zoo)
    assert [r["status"] for r in results] == ["held"] * 3  # the same models: nothing to promote
    for name in ("mobilenet_v2_tiny", "resnet_tiny", "mobilenet_qat"):
        summary = files.read_json(zoo["outputs"] / name / "summary.json")
        assert summary["stages"] and all(t["cached"] for t in summary["stages"].values()), name


def test_a_worse_recipe_is_reported_as_regressed_and_keeps_the_champion(zoo: dict, tmp_path: Path) -> None:
    client = MlflowClient(zoo["env"]["MLFLOW_TRACKING_URI"])
    before = client.get_model_version_by_alias("mobilenet_qat-qdq", "champion").version
    params = yaml.safe_load(zoo["params"].read_text())
    params["nightly"]["models"] = [{"model.source": "mobilenet_v2_tiny", "model.name": "mobilenet_qat",
                                    "quant.mode": "ptq", "quant.qconfig": "qnnpack", "quant.observer": "minmax",
                                    "quant.calibration_batches": 1}]
    worse = tmp_path / "params.yaml"
    worse.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(NightlyFailed, match=r"1 of 1 models .* mobilenet_qat regressed: (int8 accuracy|logit SQNR)"):
        run_nightly(zoo, worse)
    assert client.get_model_version_by_alias("mobilenet_qat-qdq", "champion").version == before


def wait_until_running(api: str, count: int, since: datetime, timeout: float = 300) -> None:
    """Until `count` quantize flow runs started after `since` are RUNNING at once (runs killed by other tests of
    the session stay RUNNING forever: they do not count)."""
    query = {"flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}, "start_time": {"after_": since.isoformat()}},
             "flows": {"name": {"any_": ["quantize"]}}}
    deadline = time.monotonic() + timeout
    while len(httpx.post(f"{api}/flow_runs/filter", json=query).json()) < count:
        assert time.monotonic() < deadline, f"fewer than {count} quantize runs ever ran at once"
        time.sleep(1)


def test_a_killed_worker_leaves_the_rest_to_the_other_and_a_rerun_finishes(zoo: dict, tmp_path: Path) -> None:
    params = yaml.safe_load(zoo["params"].read_text())
    params["output_dir"] = str(tmp_path / "outputs")  # nothing cached yet: the models take time
    params["float_train"]["epochs"] = 6
    fresh = tmp_path / "params.yaml"
    fresh.write_text(yaml.safe_dump(params, sort_keys=False))
    since = datetime.now(UTC)
    with servers.env_applied(zoo["env"]):
        started = subprocess.Popen([sys.executable, "-c", "import asyncio, sys; from flows.nightly import nightly; "
                                    "asyncio.run(nightly(sys.argv[1]))", str(fresh)], cwd=PROJECT_ROOT,
                                   env=os.environ | zoo["env"] | {"PYTHONPATH": str(PROJECT_ROOT)},
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until_running(zoo["env"]["PREFECT_API_URL"], 2, since)  # each worker is inside a model
    zoo["workers"].kill("w1")
    output, _ = started.communicate(timeout=600)
    assert started.returncode != 0 and "failed" in output  # the killed worker's model never finished
    finished = [name for name in ("mobilenet_v2_tiny", "resnet_tiny", "mobilenet_qat")
                if (tmp_path / "outputs" / name / "summary.json").is_file()]
    assert len(finished) == 2  # the other worker finished its model and then the third
    zoo["workers"].start("w1")
    results = run_nightly(zoo, fresh)
    assert all(r["state"] == "COMPLETED" for r in results)
    for name in finished:  # what finished before the kill is reused, stage by stage
        summary = files.read_json(tmp_path / "outputs" / name / "summary.json")
        assert all(t["cached"] for t in summary["stages"].values()), name
    stages = tmp_path / "outputs" / ".stages"
    for manifest in stages.glob("*/*/manifest.json"):  # no entry is partial
        assert files.read_json(manifest)["files"], manifest
