"""`tidlq run` as users run it, in a separate process: exit codes, messages without tracebacks, nothing half-written,
a rerun that is up to date, and a forced cached rerun in Prefect's ephemeral mode (no server)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, PROJECT_ROOT
from tidlq.core import files

pytestmark = pytest.mark.slow
TIDLQ = str(Path(sys.executable).with_name("tidlq"))


def tidlq(*args: str, api: str | None = None, cwd: Path = PROJECT_ROOT) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(PROJECT_ROOT), "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)
    if api:
        env["PREFECT_API_URL"] = api
    return subprocess.run([TIDLQ, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


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


def test_ephemeral_mode_run_then_up_to_date_then_forced_cached_rerun(tmp_path: Path) -> None:
    args = ["run", *sets(FAST | {"output_dir": tmp_path})]
    first = tidlq(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Starting temporary server" in first.stdout + first.stderr
    published = tmp_path / "mobilenet_v2_tiny" / "summary.json"
    summary = files.read_json(published)
    assert not any(t["cached"] for t in summary["stages"].values())
    qdq_digest = files.sha256_file(Path(summary["artifacts"]["qdq_onnx"]))
    digest = files.sha256_file(published)

    second = tidlq(*args)  # nothing changed: no flow, no server, no new MLflow run
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"up to date: nothing changed since MLflow run {summary['run']['mlflow_run_id']}" in second.stdout
    assert "Starting temporary server" not in second.stdout + second.stderr
    assert files.sha256_file(published) == digest

    third = tidlq(*args, "--force")
    assert third.returncode == 0, third.stderr[-3000:]
    cached = files.read_json(published)
    assert all(t["cached"] for t in cached["stages"].values())
    assert cached["stage_keys"] == summary["stage_keys"]
    assert cached["run"]["mlflow_run_id"] != summary["run"]["mlflow_run_id"]
    assert files.sha256_file(Path(cached["artifacts"]["qdq_onnx"])) == qdq_digest
    assert third.stdout.count("cached") >= 8
