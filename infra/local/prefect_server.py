"""The local Prefect server of `tidlq run` when PREFECT_API_URL is not set: one process, started by the first run
that needs it, found and reused by every later run (however many of them were killed), stopped by
`tidlq server stop`. Prefect's ephemeral mode would start and stop a server of its own in every command (seconds
each time) and leave it running as an orphan when the command is SIGKILLed.

It serves the database ephemeral mode uses (`$PREFECT_HOME/prefect.db`) and Prefect's UI (the "View at" link of
each run), on 127.0.0.1 at the port it had last time when that is free, else a free one; its state is in
`$PREFECT_HOME/tidlq-server/`: `server.pid` and `server.start` (`infra.local.processes`), `port`, `server.log`.
Finding it and starting it happen under a lock, so runs started at once share one server.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from infra.local import processes, stack
from infra.local.config import HOST, StackError, port_in_use
from tidlq.core import files

START_TIMEOUT = 120.0


@dataclass(frozen=True)
class Server:
    """A running local server: its API URL, its PID, and whether this call started it."""

    url: str
    pid: int
    started: bool = False


def home() -> Path:
    """PREFECT_HOME, as Prefect reads it (default ~/.prefect)."""
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def state_dir(prefect_home: Path) -> Path:
    """Where the server's PID, port and log are."""
    return prefect_home / "tidlq-server"


def running(prefect_home: Path) -> Server | None:
    """The recorded server if its process is the one recorded and its API answers."""
    state = state_dir(prefect_home)
    pid, started = processes.recorded(state / "server.pid")
    if pid is None or not processes.alive(pid, started):
        return None
    try:
        url = f"http://{HOST}:{int((state / 'port').read_text())}/api"
    except (OSError, ValueError):
        return None
    return Server(url, pid) if _healthy(url) else None


def ensure(prefect_home: Path, timeout: float = START_TIMEOUT) -> Server:
    """The running local server, started first when there is none."""
    state = state_dir(prefect_home)
    try:
        state.mkdir(parents=True, exist_ok=True)
        with files.lock(state / "server"):
            return _find_or_start(prefect_home, state, timeout)
    except OSError as exc:
        raise StackError(f"the local Prefect server needs a writable PREFECT_HOME ({prefect_home}): "
                         f"{exc.strerror or exc}. Set PREFECT_HOME to a writable folder, or PREFECT_API_URL to a "
                         "running server.") from exc


def _find_or_start(prefect_home: Path, state: Path, timeout: float) -> Server:
    found = running(prefect_home)
    if found is not None:
        return found
    processes.stop(state / "server.pid", "the local Prefect server")  # a recorded one that does not answer
    port = _port(state / "port")
    cmd, env = stack.prefect_server_command(prefect_home, port)
    files.write_text(state / "port", f"{port}\n")
    pid = processes.start(cmd, env, prefect_home, state / "server.log", state / "server.pid")
    url = f"http://{HOST}:{port}/api"
    deadline = time.monotonic() + timeout
    while not _healthy(url):
        exited = not processes.alive(pid)
        if exited or time.monotonic() > deadline:
            processes.stop(state / "server.pid", "the local Prefect server")
            what = "exited before it answered" if exited else f"did not answer within {timeout:.0f} s"
            raise StackError(f"the local Prefect server (PID {pid}, port {port}) {what}; its log: "
                             f"{state / 'server.log'}. Or point PREFECT_API_URL at a running server.")
        time.sleep(0.2)
    return Server(url, pid, started=True)


def stop(prefect_home: Path) -> int | None:
    """Stop the local server (its whole process group); its PID, None if none was running."""
    state = state_dir(prefect_home)
    if not state.is_dir():
        return None
    with files.lock(state / "server"):
        return processes.stop(state / "server.pid", "the local Prefect server")


def _healthy(url: str) -> bool:
    return stack.http_ok(f"{url}/health")


def _port(recorded: Path) -> int:
    """The port of the last server when it is free (a stable UI address), else a free one."""
    try:
        last = int(recorded.read_text())
    except (OSError, ValueError):
        last = None
    if last is not None and not port_in_use(last):
        return last
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]
