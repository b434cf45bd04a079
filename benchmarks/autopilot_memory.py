"""Peak memory of `quant.mode: auto` against one PTQ recipe, on torchvision's resnet18 at 64x64 (zoo_models.py).

Each job is a cold `tidlq run` in its own process from a copy of the code (snapshot.py), fresh output folder and
PREFECT_HOME, on the harder digits of zoo.py at 64x64; the model is trained by tidlq itself for two epochs (memory,
not accuracy, is measured: the float check is off), with no onnxruntime baseline and no sensitivity stage in either
job. Memory as cold_run.py measures it: the largest single process (ru_maxrss) and the summed process tree (psutil,
the local Prefect server included). Prints the table and writes benchmarks/results/autopilot_memory.json.

    make zoo-deps && .venv/bin/python benchmarks/autopilot_memory.py [--parallel 1 6]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import cold_run
import numpy as np
import snapshot
import zoo
from rich.console import Console
from rich.table import Table

from tidlq.core import files

HERE = Path(__file__).resolve().parent
COMMON = ["data.image_size=64", "model.source=zoo_models:resnet18", "model.kwargs={num_classes: 10}",
          "model.name=resnet18", "float_train.epochs=2", "verify.min_float_accuracy=0", "verify.baseline=none",
          "sensitivity.enabled=false", "verify.max_accuracy_drop=100", "verify.min_sqnr_db=-100"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", type=int, nargs="+", default=[1], help="autopilot.max_parallel values")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="tidlq-autopilot-memory-") as tmp:
        code, env = snapshot.take(Path(tmp) / "code")
        env["PYTHONPATH"] += os.pathsep + str(HERE)  # zoo_models
        x, y = zoo.hard_digits()
        np.savez(Path(tmp) / "hard_digits.npz", x=x, y=y)
        common = [f"data.source={Path(tmp) / 'hard_digits.npz'}", *COMMON]
        jobs = {"ptq (one recipe)": ["quant.mode=ptq"]}
        jobs |= {f"auto, max_parallel {n}": ["quant.mode=auto", f"autopilot.max_parallel={n}"] for n in args.parallel}
        for i, (label, sets) in enumerate(jobs.items()):
            job = Path(tmp) / f"job{i}"
            job.mkdir()
            with snapshot.prefect_home(code, env, job / "prefect") as job_env:
                extra = [a for s in [*common, *sets] for a in ("--set", s)]
                rows[label] = cold_run.run_job(code, job_env, job, extra, model="resnet18")
    one = rows["ptq (one recipe)"]
    table = Table(title=f"peak memory, torchvision resnet18 at 64x64 ({platform.machine()}, {os.cpu_count()} cores)")
    for col in ("job", "wall s", "largest process MiB", "process tree MiB", "largest / ptq"):
        table.add_column(col, justify="right")
    for label, r in rows.items():
        table.add_row(label, f"{r['wall']:.0f}", f"{r['max_process_rss_mib']:.0f}", f"{r['tree_peak_rss_mib']:.0f}",
                      f"{r['max_process_rss_mib'] / one['max_process_rss_mib']:.2f}")
    Console(width=120).print(table)
    files.write_json(HERE / "results" / "autopilot_memory.json", rows)


if __name__ == "__main__":
    main()
