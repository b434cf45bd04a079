"""Cold run vs fully cached rerun of the default job (`tidlq run -p params.yaml`), as a user runs it.

Runs a copy of the code taken at the start (benchmarks/snapshot.py: the checkout may change meanwhile). Each repeat
starts from nothing (fresh output folder, fresh PREFECT_HOME: no cached results) and runs the job twice.
Prints medians over the repeats and writes benchmarks/results/cached_rerun.json. Not a test: the numbers depend on
the machine and its load; quote medians and ratios from one run of this script.

    .venv/bin/python benchmarks/cached_rerun.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import snapshot
from rich.console import Console
from rich.table import Table

from tidlq.core import files

ROOT = Path(__file__).resolve().parents[1]
TIDLQ = str(Path(sys.executable).with_name("tidlq"))


def run_job(code: Path, env: dict[str, str], out: Path, prefect_home: Path) -> dict:
    """One `tidlq run` of the code in `code` in its own process; wall time and the per-stage times from its
    summary.json."""
    started = time.perf_counter()
    done = subprocess.run([TIDLQ, "run", "-p", "params.yaml", "--set", f"output_dir={out}"], cwd=code,
                          env=env | {"PREFECT_HOME": str(prefect_home)}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"tidlq run failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    summary = json.loads((out / "mobilenet_v2_tiny" / "summary.json").read_text())
    stages = summary["stages"]
    return {"wall": wall, "stages": sum(t["seconds"] for t in stages.values()),
            "cached": sum(t["cached"] for t in stages.values()), "n": len(stages)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cold, warm = [], []
    with tempfile.TemporaryDirectory() as frozen:
        code, env = snapshot.take(Path(frozen))
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                cold.append(run_job(code, env, Path(tmp) / "out", Path(tmp) / "prefect"))
                warm.append(run_job(code, env, Path(tmp) / "out", Path(tmp) / "prefect"))
    med = {k: {m: statistics.median(r[m] for r in runs) for m in ("wall", "stages")}
           for k, runs in (("cold", cold), ("cached", warm))}
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "repeats": args.repeats,
        "median": med,
        "ratio": {m: med["cached"][m] / med["cold"][m] for m in ("wall", "stages")},
        "cached_stages": [r["cached"] for r in warm],
        "stages_per_run": cold[0]["n"],
    }
    table = Table(title=f"default job, median of {args.repeats} ({result['machine']})")
    for col in ("", "cold run (s)", "cached rerun (s)", "cached / cold"):
        table.add_column(col, justify="right")
    table.add_row("wall time, whole command", f"{med['cold']['wall']:.1f}", f"{med['cached']['wall']:.1f}",
                  f"{result['ratio']['wall']:.1%}")
    table.add_row("time in the stages", f"{med['cold']['stages']:.2f}", f"{med['cached']['stages']:.2f}",
                  f"{result['ratio']['stages']:.1%}")
    Console().print(table)
    print(f"stages reported cached on the rerun: {result['cached_stages']} of {result['stages_per_run']}")
    out = ROOT / "benchmarks" / "results" / "cached_rerun.json"
    out.parent.mkdir(exist_ok=True)
    files.write_json(out, result)


if __name__ == "__main__":
    main()
