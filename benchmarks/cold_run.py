"""Where a cold run of the default job spends its time, and how much memory it takes: PTQ (the default) and QAT.

Runs a copy of the code taken at the start (benchmarks/snapshot.py). Each repeat runs `tidlq run -p params.yaml`
(then with `--set quant.mode=qat`) in its own process from nothing (fresh output folder, fresh PREFECT_HOME), and
reads the per-stage seconds from its summary.json (`stages.<name>.seconds`: each stage's wall time in the flow,
Prefect task overhead included). Memory, two ways: the peak resident set of the largest single process (`ru_maxrss`
from `os.wait4`, which covers the command and the children it waited for), and the peak of the summed resident set
of the whole process tree, sampled every 50 ms with psutil (the local Prefect server that the run starts is in the
tree while the run lasts). Each repeat has a fresh PREFECT_HOME, so each run starts that server (stopped after).
Prints median tables (and each row's minimum over the repeats: on a shared machine, the least disturbed) and writes
benchmarks/results/cold_run.json. Not a test.

    .venv/bin/python benchmarks/cold_run.py [--repeats 3] [--keep outputs/bench]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil
import snapshot
from rich.console import Console
from rich.table import Table

from tidlq.core import files

ROOT = Path(__file__).resolve().parents[1]
TIDLQ = str(Path(sys.executable).with_name("tidlq"))
MODES = {"ptq": [], "qat": ["--set", "quant.mode=qat"]}
STAGE_ORDER = ("prepare_data", "float_model", "evaluate_float", "baseline_ort", "calibrate", "train_qat", "convert",
               "export_qdq", "verify_onnx", "sensitivity", "tidl_bundle")


def tree_rss(proc: psutil.Process) -> int:
    """Bytes resident in `proc` and all its descendants right now (processes that vanish count as 0)."""
    total = 0
    with contextlib.suppress(psutil.Error):
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
    return total


def run_job(code: Path, env: dict[str, str], tmp: Path, extra: list[str], model: str = "mobilenet_v2_tiny") -> dict:
    """One cold `tidlq run` of the code in `code` in its own process: wall seconds, per-stage seconds, peak memory
    (MiB). `model`: the model name the params give (where its summary.json lands)."""
    log = tmp / "log.txt"
    with log.open("wb") as sink:
        started = time.perf_counter()
        proc = subprocess.Popen([TIDLQ, "run", "-p", "params.yaml", "--set", f"output_dir={tmp / 'out'}", *extra],
                                cwd=code, env=env, stdout=sink, stderr=subprocess.STDOUT)
        watched, tree_peak = psutil.Process(proc.pid), 0
        while True:  # reap with wait4 ourselves: it returns this child's rusage (Popen.wait would drop it)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            tree_peak = max(tree_peak, tree_rss(watched))
            time.sleep(0.05)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"tidlq run {' '.join(extra)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    summary = json.loads((tmp / "out" / model / "summary.json").read_text())
    return {"wall": wall, "stages": {k: v["seconds"] for k, v in summary["stages"].items()},
            "cached": sum(v["cached"] for v in summary["stages"].values()),
            "max_process_rss_mib": usage.ru_maxrss / 1024, "tree_peak_rss_mib": tree_peak / 2**20}


def summarize(runs: list[dict], pick: Callable[[Iterable[float]], float]) -> dict:
    """`pick` (median, min) over repeats of: wall, each stage, the stages' sum, both memory peaks."""
    names = list(runs[0]["stages"])
    return {"wall": pick(r["wall"] for r in runs),
            "stages": {n: pick(r["stages"][n] for r in runs) for n in names},
            "stages_total": pick(sum(r["stages"].values()) for r in runs),
            "max_process_rss_mib": pick(r["max_process_rss_mib"] for r in runs),
            "tree_peak_rss_mib": pick(r["tree_peak_rss_mib"] for r in runs)}


def print_tables(med: dict[str, dict], fastest: dict[str, dict], repeats: int, machine: str) -> None:
    """Per-stage seconds side by side, median and minimum over the repeats, row by row (a stage a mode does not run
    is blank), then wall time and memory. The minimum is the least disturbed by other load on a shared machine."""
    console = Console(width=max(Console().width, 100))
    stages = Table(title=f"cold run of the default job, seconds per stage, {repeats} repeats ({machine})")
    stages.add_column("stage")
    for mode in med:
        stages.add_column(f"{mode} median", justify="right")
        stages.add_column(f"{mode} min", justify="right")
    found = {n for m in med.values() for n in m["stages"]}
    for name in [n for n in STAGE_ORDER if n in found] + sorted(found - set(STAGE_ORDER)):
        cells = []
        for mode in med:
            s = med[mode]["stages"].get(name)
            cells += ["", ""] if s is None else [f"{s:.2f}", f"{fastest[mode]['stages'][name]:.2f}"]
        stages.add_row(name, *cells)
    for label, key, fmt in (("all stages", "stages_total", ".2f"), ("whole command (wall)", "wall", ".1f")):
        stages.add_row(label, *[f"{m[key]:{fmt}}" for mode in med for m in (med[mode], fastest[mode])])
    console.print(stages)
    memory = Table(title=f"peak memory of the command (MiB), median of {repeats}")
    for col in ("", *med):
        memory.add_column(col, justify="right")
    memory.add_row("largest process (ru_maxrss)", *[f"{m['max_process_rss_mib']:.0f}" for m in med.values()])
    memory.add_row("whole process tree (sampled)", *[f"{m['tree_peak_rss_mib']:.0f}" for m in med.values()])
    console.print(memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="copy the last PTQ run's model folder here (for ort_latency.py)")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as frozen:
        code, env = snapshot.take(Path(frozen))
        for _ in range(args.repeats):  # modes alternate, so that a burst of load hits both
            for mode, extra in MODES.items():
                with tempfile.TemporaryDirectory() as tmp, \
                        snapshot.prefect_home(code, env, Path(tmp) / "prefect") as job_env:
                    runs[mode].append(run_job(code, job_env, Path(tmp), extra))
                    if args.keep and mode == "ptq":
                        shutil.rmtree(args.keep, ignore_errors=True)
                        shutil.copytree(Path(tmp) / "out" / "mobilenet_v2_tiny", args.keep)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    med = {mode: summarize(r, statistics.median) for mode, r in runs.items()}
    fastest = {mode: summarize(r, min) for mode, r in runs.items()}
    print_tables(med, fastest, args.repeats, machine)
    out = ROOT / "benchmarks" / "results" / "cold_run.json"
    out.parent.mkdir(exist_ok=True)
    files.write_json(out, {"machine": machine, "repeats": args.repeats, "median": med, "fastest": fastest,
                            "runs": runs})


if __name__ == "__main__":
    main()
