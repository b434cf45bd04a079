"""A frozen copy of the project's code for benchmarks that run `tidlq` as a subprocess.

The checkout may change while a benchmark runs (edits change the stage cache keys, a half-written module breaks a
run): the benchmark runs `tidlq` from a copy taken when it started, with that copy first on PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ("flows", "tidlq", "infra", "params.yaml")


def take(dest: Path) -> tuple[Path, dict[str, str]]:
    """Copy the code and params.yaml to `dest` (and the MLflow store, so that no run pays its creation); return the
    folder to run `tidlq` in and the environment that makes it import the copy."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in CODE:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", ".stack"))
        else:
            shutil.copy2(src, dest / name)
    if (ROOT / "mlflow.db").exists():  # SQLite's backup: a consistent copy even while another run writes to it
        with closing(sqlite3.connect(ROOT / "mlflow.db")) as src, closing(sqlite3.connect(dest / "mlflow.db")) as copy:
            src.backup(copy)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(dest), os.environ.get("PYTHONPATH")]))}
    env.pop("PREFECT_API_URL", None)  # the local Prefect server of PREFECT_HOME, as `make run`
    env.pop("MLFLOW_TRACKING_URI", None)  # the copied SQLite store in `dest`
    return dest, env


@contextlib.contextmanager
def prefect_home(code: Path, env: dict[str, str], home: Path) -> Iterator[dict[str, str]]:
    """`env` with PREFECT_HOME `home`; on the way out, `tidlq server stop` stops the local Prefect server that a run
    started for it (a benchmark leaves no server behind)."""
    env = env | {"PREFECT_HOME": str(home)}
    try:
        yield env
    finally:
        subprocess.run([str(Path(sys.executable).with_name("tidlq")), "server", "stop"], cwd=code, env=env,
                       capture_output=True, check=True)
