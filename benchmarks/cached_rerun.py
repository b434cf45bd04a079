"""Cold run vs fully cached rerun of the default job (`tidlq run -p params.yaml`), as a user runs it.

Each repeat starts from nothing (fresh output folder, fresh PREFECT_HOME: no cached results) and runs the job twice.
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

from rich.console import Console
from rich.table import Table

from tasks import files

ROOT = Path(__file__).resolve().parents[1]
TIDLQ = str(Path(sys.executable).with_name("tidlq"))


def run_job(out: Path, prefect_home: Path) -> dict:
    """One `tidlq run` in its own process; wall time and the per-stage times from its summary.json."""
    env = os.environ | {"PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)  # ephemeral mode, as `make run`
    started = time.perf_counter()
    subprocess.run([TIDLQ, "run", "-p", "params.yaml", "--set", f"output_dir={out}"], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    wall = time.perf_counter() - started
    summary = json.loads((out / "mobilenet_v2_tiny" / "summary.json").read_text())
    stages = summary["stages"]
    return {"wall": wall, "stages": sum(t["seconds"] for t in stages.values()),
            "cached": sum(t["cached"] for t in stages.values()), "n": len(stages)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cold, warm = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cold.append(run_job(Path(tmp) / "out", Path(tmp) / "prefect"))
            warm.append(run_job(Path(tmp) / "out", Path(tmp) / "prefect"))
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
