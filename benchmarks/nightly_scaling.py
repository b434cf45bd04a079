"""Nightly wall time for 1, 2 and 4 models on one and on two process workers, all cold (nothing cached).

Starts a throwaway local stack (Prefect server, MLflow server, SeaweedFS on 127.0.0.1), deploys quantize/adhoc on a
process pool, starts the workers (one flow run at a time each), and times `nightly` end to end. The point on a
2-core machine is the shape: runs overlap and nothing serializes on the server, not a 2x speed-up (two models already
share two cores). Models train for 3 epochs here and the gate is off, to keep it short. Not a test; writes
benchmarks/results/nightly_scaling.json.

    .venv/bin/python benchmarks/nightly_scaling.py
"""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from infra.local import stack
from infra.local.processes import terminate_group
from tidlq.core import files

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "tidlq-bench"
ZOO = [{"model.source": "mobilenet_v2_tiny"}, {"model.source": "resnet_tiny"},
       {"model.source": "mobilenet_v2_tiny", "model.name": "mobilenet_qat", "quant.mode": "qat"},
       {"model.source": "resnet_tiny", "model.name": "resnet_qat", "quant.mode": "qat"}]
FAST = {"float_train": {"epochs": 3}, "qat": {"epochs": 1},
        "verify": {"baseline": "none", "min_sqnr_db": -100.0, "max_accuracy_drop": 100.0},
        "sensitivity": {"enabled": False}}


def params_file(folder: Path, models: int) -> Path:
    """params.yaml with `models` entries of the zoo and a fresh output folder."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in FAST.items():
        params[section].update(values)
    params["output_dir"] = str(folder / "outputs")
    params["nightly"].update({"models": ZOO[:models], "max_parallel": 4, "experiment": "bench-nightly",
                              "accuracy_tolerance": 100.0, "sqnr_tolerance_db": 100.0})  # timing only
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def timed_nightly(env: dict[str, str], params: Path) -> float:
    """Wall time of one nightly run in-process against the stack's Prefect server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.nightly import nightly

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            started = time.perf_counter()
            asyncio.run(nightly(str(params)))
            return time.perf_counter() - started
    finally:
        os.environ.clear()
        os.environ.update(saved)


def start_workers(env: dict[str, str], count: int, logs: Path) -> list[subprocess.Popen]:
    """`count` process workers on the pool, one flow run at a time each, the cores split between them (torch uses
    every core by default; two runs would then fight over them)."""
    threads = str(max(1, (os.cpu_count() or 1) // count))
    return [subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--limit", "1"], cwd=ROOT,
                             env=env | {"PREFECT_HOME": str(logs / f"home-{i}"), "OMP_NUM_THREADS": threads},
                             stdout=open(logs / f"worker-{i}.log", "w"),  # noqa: SIM115 - until stopped
                             stderr=subprocess.STDOUT, start_new_session=True) for i in range(count)]


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        stack_env = stack.up(tmp_path / "stack")
        env = os.environ | stack_env | {"TIDLQ_PROJECT_DIR": str(ROOT), "TIDLQ_WORK_POOL": POOL,
                                        "TIDLQ_NIGHTLY_CRON": "0 3 * * *", "PREFECT_WORKER_QUERY_SECONDS": "1",
                                        "PATH": f"{BIN}:{os.environ['PATH']}"}
        try:
            subprocess.run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"], env=env,
                           check=True, capture_output=True)
            subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "adhoc"], cwd=ROOT, env=env,
                           check=True, capture_output=True)
            for workers in (1, 2):
                procs = start_workers(env, workers, tmp_path)
                try:
                    for models in (1, 2, 4):
                        folder = tmp_path / f"w{workers}-m{models}"
                        folder.mkdir()
                        seconds = timed_nightly(env, params_file(folder, models))
                        rows.append({"workers": workers, "models": models, "seconds": round(seconds, 1)})
                finally:
                    for proc in procs:
                        terminate_group(proc.pid, "worker")
        finally:
            stack.down(tmp_path / "stack")
    print_table(rows)
    out = ROOT / "benchmarks" / "results" / "nightly_scaling.json"
    out.parent.mkdir(exist_ok=True)
    files.write_json(out, {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                                      f"{platform.python_version()}", "runs": rows})


def print_table(rows: list[dict]) -> None:
    """Models down, workers across, seconds in the cells, and per-model time."""
    table = Table(title=f"nightly wall time, cold ({platform.machine()}, {os.cpu_count()} cores)")
    table.add_column("models", justify="right")
    for workers in (1, 2):
        table.add_column(f"{workers} worker(s): s", justify="right")
        table.add_column("s / model", justify="right")
    for models in (1, 2, 4):
        cells = []
        for workers in (1, 2):
            seconds = next(r["seconds"] for r in rows if r["workers"] == workers and r["models"] == models)
            cells += [f"{seconds:.1f}", f"{seconds / models:.1f}"]
        table.add_row(str(models), *cells)
    Console().print(table)


if __name__ == "__main__":
    main()
