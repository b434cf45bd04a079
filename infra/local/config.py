"""The local stack's state folder and configuration: ports (chosen on the first `up`, reused after), bucket, the S3
keys (generated once, mode 0600) and the client environment written to `<state>/env`.

    stack.json        ports and bucket
    credentials       the S3 keys (mode 0600)
    env               `export KEY=VALUE` lines for bash (mode 0600): `source .stack/env`
    s3/ mlflow/ prefect/   the data of each service, kept by `down`
    logs/<name>.log   stdout and stderr of each service (appended)
    pids/<name>.pid   the PID of each running service (`infra.local.processes`)
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shlex
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from tidlq.core import files
from tidlq.core.errors import UserError

HOST = "127.0.0.1"
DEFAULT_DIR = Path(".stack")
DEFAULT_BUCKET = "tidlq"
REGION = "us-east-1"
SERVICES = ("seaweedfs", "mlflow", "prefect")  # start order; `down` stops in reverse
WEED_COMPONENTS = ("s3", "master", "volume", "filer", "admin")  # each opens an HTTP and a gRPC port
GRPC_OFFSET = 10000  # weed's default gRPC port is HTTP + 10000; its embedded worker assumes it for the admin server
PORT_NAMES = (*WEED_COMPONENTS, *(f"{c}_grpc" for c in WEED_COMPONENTS), "mlflow", "prefect")
KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


class StackError(UserError):
    """A service of the local stack did not start or stop; the message names it and shows the end of its log."""


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


def configure(state_dir: Path | str, ports: Mapping[str, int] | None = None, bucket: str | None = None,
              running: bool = False) -> dict[str, Any]:
    """Ports, bucket and credentials of the stack: the given ones, else the remembered ones, else new (and saved).
    `running`: some service of the stack runs, so its ports and bucket cannot change."""
    state_dir = Path(state_dir)
    saved = read_config(state_dir, required=False)
    unknown = set(ports or {}) - set(PORT_NAMES)
    if unknown:
        raise UserError(f"unknown port name(s) {sorted(unknown)}; known: {', '.join(PORT_NAMES)}")
    wanted = {**saved.get("ports", {}), **{k: int(v) for k, v in (ports or {}).items()}}
    bucket = _check_bucket(bucket or saved.get("bucket") or DEFAULT_BUCKET)
    changed = saved and (wanted != saved["ports"] or bucket != saved.get("bucket"))
    if changed and running:
        raise UserError(f"the stack in {state_dir} runs with other ports or bucket; run `tidlq stack down` first")
    config = {"ports": fill_ports(wanted), "bucket": bucket}
    if len(set(config["ports"].values())) < len(PORT_NAMES):
        raise UserError(f"two services of the stack would share a port: {config['ports']}")
    if config != {k: saved.get(k) for k in ("ports", "bucket")}:
        files.write_text(state_dir / "stack.json", json.dumps(config, indent=2) + "\n", mode=0o600)
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
    """The S3 keys of the stack from <state>/credentials (dotenv lines), generated with `secrets` (mode 0600) on the
    first call."""
    path = Path(state_dir) / "credentials"
    if not path.exists():
        keys = {"AWS_ACCESS_KEY_ID": "TIDLQ" + secrets.token_hex(8).upper(),
                "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20)}
        files.write_text(path, "".join(f"{k}={v}\n" for k, v in keys.items()), mode=0o600)
    pairs = dotenv_values(path)
    if not all(pairs.get(k) for k in KEYS):
        raise UserError(f"{path} must have AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=... lines")
    return {k: str(pairs[k]).strip() for k in KEYS}


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
    files.write_text(path, "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()), mode=0o600)
    return path


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
