"""The stack's processes, through psutil: each service runs in its own session (process group), its PID and start
time recorded in `<state>/pids/<name>.pid` and `.start`; processes are only ever signalled through a recorded PID and
its process group, never by name, and a recorded PID whose start time differs (the PID was reused) is not ours."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import psutil

from infra.local.config import StackError
from tidlq.core import files

STOP_TIMEOUT = 15.0
_CHILDREN: dict[int, subprocess.Popen] = {}  # processes started by this Python process, so they can be reaped


def start(cmd: list[str], env: Mapping[str, str], cwd: Path, log_path: Path, pid_file: Path) -> int:
    """Start `cmd` in a new session with its output appended to `log_path`; record its PID and start time next to
    `pid_file` (the start time first: a pid file never lacks it); its PID."""
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _CHILDREN[proc.pid] = proc
    files.write_text(pid_file.with_suffix(".start"), f"{psutil.Process(proc.pid).create_time()!r}\n", mode=0o600)
    files.write_text(pid_file, f"{proc.pid}\n", mode=0o600)
    return proc.pid


def recorded(pid_file: Path) -> tuple[int | None, float | None]:
    """The PID and start time recorded in `pid_file` (and its `.start`); (None, None) without a readable pid file."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None, None
    try:
        return pid, float(pid_file.with_suffix(".start").read_text().strip())
    except (OSError, ValueError):
        return pid, None


def forget(pid_file: Path) -> None:
    """Remove a pid file and its start time."""
    for path in (pid_file, pid_file.with_suffix(".start")):
        path.unlink(missing_ok=True)


def alive(pid: int, started: float | None = None) -> bool:
    """Whether `pid` runs (not a zombie) and, with `started`, is the process that started then."""
    _reap(pid)
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and (started is None or process.create_time() == started)
    except psutil.Error:
        return False


def group_members(pgid: int) -> list[int]:
    """The live (non-zombie) processes of process group `pgid`."""
    _reap(pgid)
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
    return members


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


def stop(pid_file: Path, name: str, timeout: float = STOP_TIMEOUT) -> int | None:
    """Stop the process group of the PID recorded in `pid_file` and forget it; the PID stopped, None if it was not
    running (a stale pid file is just removed). Leftovers of a dead group leader still carry its PID as their group:
    they are stopped too."""
    pid, started = recorded(pid_file)
    if pid is None:
        return None
    stopped = None
    if alive(pid, started) or (not alive(pid) and group_members(pid)):
        terminate_group(pid, name, timeout)
        stopped = pid
    forget(pid_file)
    proc = _CHILDREN.pop(pid, None)
    if proc is not None:  # our child: collect its exit status now (the group is empty, so it has exited)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    return stopped


def _reap(pid: int) -> None:
    """Collect the exit status of `pid` if this Python process started it, so it does not linger as a zombie."""
    proc = _CHILDREN.get(pid)
    if proc is not None:
        if proc.poll() is not None:
            del _CHILDREN[pid]
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
