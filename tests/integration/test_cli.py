"""`tidlq run` as users run it, in a separate process: exit codes, messages without tracebacks, nothing half-written,
killed runs, a rerun that is up to date and a forced cached rerun on the local Prefect server `tidlq run` starts
and reuses."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import FAST, PROJECT_ROOT
from tidlq.core import files

pytestmark = pytest.mark.slow
TIDLQ = str(Path(sys.executable).with_name("tidlq"))


def tidlq(*args: str, api: str | None = None, cwd: Path = PROJECT_ROOT,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = os.environ | {"PYTHONPATH": str(PROJECT_ROOT), "COLUMNS": "200"} | (env or {})
    full.pop("PREFECT_API_URL", None)
    if api:
        full["PREFECT_API_URL"] = api
    return subprocess.run([TIDLQ, *args], env=full, cwd=cwd, capture_output=True, text=True, timeout=600)


def sets(overrides: dict) -> list[str]:
    return [arg for k, v in overrides.items() for arg in ("--set", f"{k}={v}")]


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "quant.moed=qat"], "unknown key 'quant.moed'; did you mean 'quant.mode'?"),
    (["--set", "data.image_size=huge"], "--set data.image_size: data.image_size: Input should be a valid integer"),
    (["-p", "missing.yaml"], "params file 'missing.yaml' not found"),
    (["--set", "quant.mode"], "expected KEY=VALUE"),
])
def test_bad_params_exit_2_before_any_work(tmp_path: Path, args: list[str], message: str) -> None:
    done = tidlq("run", *args, "--set", f"output_dir={tmp_path / 'out'}")
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"data.source": "/no/such/folder"}, "data.source '/no/such/folder' does not exist"),
    ({"model.source": "tests.fixture_models:branchy"}, "cannot be traced by torch.fx in submodule 'gate'"),
    ({"model.weights": "/no/weights.pt"}, "model.weights '/no/weights.pt' does not exist"),
])
def test_bad_inputs_exit_2_without_traceback(prefect_api: str, tmp_path: Path, overrides: dict, message: str) -> None:
    done = tidlq("run", *sets(FAST | overrides | {"output_dir": tmp_path}), api=prefect_api)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: " in done.stderr and message in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "mobilenet_v2_tiny").exists()
    leftovers = [p for p in (tmp_path / ".stages").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_gate_failure_exits_1_with_the_report(prefect_api: str, tmp_path: Path) -> None:
    done = tidlq("run", *sets(FAST | {"verify.min_sqnr_db": 99, "output_dir": tmp_path}), api=prefect_api)
    assert done.returncode == 1
    assert "gate failed:" in done.stderr and "verify.min_sqnr_db 99" in done.stderr
    assert "int8 logit SQNR (dB)" in done.stdout
    assert files.read_json(tmp_path / "mobilenet_v2_tiny" / "summary.json")["gate"]["passed"] is False
    again = tidlq("run", *sets(FAST | {"verify.min_sqnr_db": 99, "output_dir": tmp_path}), api=prefect_api)
    assert again.returncode == 1 and "up to date" in again.stdout  # the same failed run, not a new one
    assert "gate failed:" in again.stderr and "verify.min_sqnr_db 99" in again.stderr


def started_after(proc: subprocess.Popen, out: Path, timeout: float = 240) -> None:
    """Wait until the run `proc` writes its first stage folder (its flow run is RUNNING and labelled by then)."""
    deadline = time.monotonic() + timeout
    while not list((out / ".stages").glob(f"*/.*.p{proc.pid}@*.tmp")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or never started a stage"
        time.sleep(0.01)


def local_servers(home: Path) -> set[int]:
    """The process groups of Prefect servers (tidlq's or a temporary one) serving PREFECT_HOME `home`."""
    groups = set()
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if "server" in " ".join(proc.info["cmdline"] or []) and proc.environ().get("PREFECT_HOME") == str(home):
                groups.add(os.getpgid(proc.pid))
    return groups


def test_killed_runs_then_a_run_then_up_to_date_then_forced(tmp_path: Path) -> None:
    """Five runs SIGKILLed mid-stage leave one local Prefect server, which the next run reuses and which marks their
    flow runs CRASHED; then a rerun with nothing changed answers 'up to date' without a flow, and --force runs the
    flow with every stage cached."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from infra.local import prefect_server

    home, out = tmp_path / "prefect", tmp_path / "out"
    args = ["run", *sets(FAST | {"output_dir": out})]
    env = {"PREFECT_HOME": str(home)}
    try:
        for i in range(5):
            with open(tmp_path / f"killed{i}.log", "w") as log:
                proc = subprocess.Popen([TIDLQ, *args], env=os.environ | env | {"PYTHONPATH": str(PROJECT_ROOT)},
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            started_after(proc, out)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        (server,) = local_servers(home)

        first = tidlq(*args, env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        assert "using the local server" in first.stdout and f"(PID {server};" in first.stdout
        published = out / "mobilenet_v2_tiny" / "summary.json"
        summary = files.read_json(published)
        url = prefect_server.running(home).url
        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_filter=FlowFilter(name={"any_": ["quantize"]}))
        assert sorted(r.state.type.value for r in runs) == ["COMPLETED"] + ["CRASHED"] * 5
        assert all("ended without ending the flow run (killed)" in r.state.message for r in runs
                   if r.state.type.value == "CRASHED")
        qdq_digest = files.sha256_file(Path(summary["artifacts"]["qdq_onnx"]))
        digest = files.sha256_file(published)

        second = tidlq(*args, env=env)  # nothing changed: no flow, no new MLflow run
        assert second.returncode == 0, second.stderr[-3000:]
        assert f"up to date: nothing changed since MLflow run {summary['run']['mlflow_run_id']}" in second.stdout
        assert "local server" not in second.stdout and files.sha256_file(published) == digest

        third = tidlq(*args, "--force", env=env)
        assert third.returncode == 0, third.stderr[-3000:]
        cached = files.read_json(published)
        assert all(t["cached"] for t in cached["stages"].values())
        assert cached["stage_keys"] == summary["stage_keys"]
        assert cached["run"]["mlflow_run_id"] != summary["run"]["mlflow_run_id"]
        assert files.sha256_file(Path(cached["artifacts"]["qdq_onnx"])) == qdq_digest
        assert local_servers(home) == {server}
    finally:
        stopped = tidlq("server", "stop", env=env)
    assert f"stopped the local Prefect server (PID {server})" in stopped.stdout
    assert local_servers(home) == set()
