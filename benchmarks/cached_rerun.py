"""Cold runs, a no-op rerun and a forced cached rerun of the default job (`tidlq run -p params.yaml`), as a user runs
them, and `tidlq --help`.

Runs a copy of the code taken at the start (benchmarks/snapshot.py: the checkout may change meanwhile). Each repeat
starts from nothing (fresh output folder, fresh PREFECT_HOME: no cached results, no local Prefect server) and runs
the job four times: cold (the run starts the local Prefect server), again with nothing changed (the up-to-date
check answers; no flow), with `--force` (the flow, every stage cached), and cold again into a fresh output folder
with the server already running (a user's usual cold run); then `tidlq server stop`. Prints medians over the repeats
and writes benchmarks/results/cached_rerun.json. Not a test: the numbers depend on the machine and its load; quote
medians and ratios from one run of this script.

    .venv/bin/python benchmarks/cached_rerun.py [--repeats 5]
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


def run_job(code: Path, env: dict[str, str], out: Path, *extra: str) -> dict:
    """One `tidlq run` of the code in `code` in its own process; wall time and the per-stage times from its
    summary.json (for a no-op run, the matched run's)."""
    started = time.perf_counter()
    done = subprocess.run([TIDLQ, "run", "-p", "params.yaml", "--set", f"output_dir={out}", *extra], cwd=code,
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"tidlq run failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    summary = json.loads((out / "mobilenet_v2_tiny" / "summary.json").read_text())
    stages = summary["stages"]
    return {"wall": wall, "stages": sum(t["seconds"] for t in stages.values()),
            "cached": sum(t["cached"] for t in stages.values()), "n": len(stages),
            "up_to_date": "up to date: nothing changed" in done.stdout}


def help_wall(code: Path, env: dict[str, str]) -> float:
    """Wall time of `tidlq --help`."""
    started = time.perf_counter()
    subprocess.run([TIDLQ, "--help"], cwd=code, env=env, capture_output=True, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"cold": [], "no-op": [], "forced": [], "cold, server up": []}
    helps = []
    with tempfile.TemporaryDirectory() as frozen:
        code, env = snapshot.take(Path(frozen))
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp, \
                    snapshot.prefect_home(code, env, Path(tmp) / "prefect") as job_env:
                job = (code, job_env, Path(tmp) / "out")
                runs["cold"].append(run_job(*job))
                runs["no-op"].append(run_job(*job))
                runs["forced"].append(run_job(*job, "--force"))
                runs["cold, server up"].append(run_job(code, job_env, Path(tmp) / "out2"))
                helps.append(help_wall(code, job_env))
    if not all(r["up_to_date"] for r in runs["no-op"]) or any(r["up_to_date"] for r in runs["forced"]):
        raise RuntimeError("a rerun with nothing changed did not answer 'up to date', or --force did not run the flow")
    med = {k: {m: statistics.median(r[m] for r in rs) for m in ("wall", "stages")} for k, rs in runs.items()}
    cold = med["cold"]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "repeats": args.repeats,
        "median": med,
        "outside_stages": {k: statistics.median(r["wall"] - r["stages"] for r in runs[k])
                           for k in ("cold", "cold, server up")},
        "help": statistics.median(helps),
        "ratio_to_cold": {k: med[k]["wall"] / cold["wall"] for k in runs},
        "forced_cached_stages": [r["cached"] for r in runs["forced"]],
        "stages_per_run": runs["cold"][0]["n"],
    }
    table = Table(title=f"default job, median of {args.repeats} ({result['machine']})")
    for col in ("command", "wall (s)", "in the stages (s)", "outside the stages (s)", "wall / first cold run"):
        table.add_column(col, justify="right")
    labels = {"cold": "tidlq run, cold (starts the local server)", "no-op": "tidlq run, nothing changed",
              "forced": "tidlq run --force, every stage cached", "cold, server up": "tidlq run, cold, server up"}
    for key, label in labels.items():
        outside = result["outside_stages"].get(key)
        table.add_row(label, f"{med[key]['wall']:.2f}", "-" if key == "no-op" else f"{med[key]['stages']:.2f}",
                      "-" if outside is None else f"{outside:.2f}", f"{result['ratio_to_cold'][key]:.1%}")
    table.add_row("tidlq --help", f"{result['help']:.2f}", "-", "-", "-")
    Console(width=140).print(table)
    print(f"stages cached on the forced rerun: {result['forced_cached_stages']} of {result['stages_per_run']}")
    out = ROOT / "benchmarks" / "results" / "cached_rerun.json"
    out.parent.mkdir(exist_ok=True)
    files.write_json(out, result)


if __name__ == "__main__":
    main()
