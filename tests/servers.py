"""Helpers for session-scoped server fixtures (no pytest here): the local stack of infra/local/stack.py.

A fixture in conftest.py can do

    env = start_stack(tmp_path_factory.mktemp("stack"))
    yield env
    stop_stack(state_dir)

and a fault test can stop and restart one service (`stop_service(state_dir, "seaweedfs")`, `start_service`,
`restart`) while the others keep running. Services are "seaweedfs", "mlflow" and "prefect"; data survives a
stop and start.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from infra.local.config import SERVICES, read_config, stack_env
from infra.local.stack import down, s3_client, service_pid, start_service, status, stop_service, up

__all__ = [
    "SERVICES", "env_applied", "pids", "read_env", "restart", "s3_client", "service_pid", "start_service",
    "start_stack", "status", "stop_service", "stop_stack",
]


def start_stack(state_dir: Path, ports: Mapping[str, int] | None = None) -> dict[str, str]:
    """Start SeaweedFS, MLflow and Prefect with their state in `state_dir`; the environment clients need."""
    return up(state_dir, ports)


def stop_stack(state_dir: Path) -> list[int]:
    """Stop every service of the stack in `state_dir` (data is kept); the PIDs stopped."""
    return down(state_dir)


def read_env(state_dir: Path) -> dict[str, str]:
    """The client environment of the (configured) stack in `state_dir`, without starting anything."""
    return stack_env(read_config(Path(state_dir)))


@contextlib.contextmanager
def env_applied(env: Mapping[str, str]) -> Iterator[None]:
    """Set `env` in os.environ for the duration of the block, then restore the previous values."""
    previous = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def restart(state_dir: Path, name: str) -> int:
    """Stop and start one service ("seaweedfs", "mlflow", "prefect") with the same ports and data; its new PID."""
    stop_service(state_dir, name)
    return start_service(state_dir, name)


def pids(state_dir: Path) -> dict[str, Any]:
    """The PID of each running service (None if not running)."""
    return {name: service_pid(state_dir, name) for name in SERVICES}
