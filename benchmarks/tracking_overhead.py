"""What tracking (MLflow server) and publishing (S3) add to a fully cached rerun of the default job.

Starts a throwaway local stack (SeaweedFS, MLflow, Prefect on 127.0.0.1), builds the cache once, then alternates
cached reruns with tracking + S3 on and off (MLflow unreachable with tracking.required: false, no bucket), and
prints medians. Not a test; writes benchmarks/results/tracking_overhead.json.

    .venv/bin/python benchmarks/tracking_overhead.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from infra.local import stack
from tidlq.core import files

ROOT = Path(__file__).resolve().parents[1]


def timed_run(env: dict[str, str], overrides: dict) -> tuple[float, dict]:
    """One in-process flow run with `env` applied; its wall time and summary."""
    from flows.quantize import quantize

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        started = time.perf_counter()
        summary = quantize(str(ROOT / "params.yaml"), overrides)
        return time.perf_counter() - started, summary
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PREFECT_HOME"] = f"{tmp}/prefect-home"
        env = stack.up(Path(tmp) / "stack")
        try:
            off = {"PREFECT_API_URL": env["PREFECT_API_URL"], "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
                   "TIDLQ_S3_BUCKET": ""}
            overrides = {"output_dir": f"{tmp}/out"}
            timed_run(env, overrides)  # cold: fills the stage cache
            on_times, off_times = [], []
            for _ in range(args.repeats):
                on_times.append(timed_run(env, overrides)[0])
                off_times.append(timed_run(off, overrides | {"tracking.required": False})[0])
        finally:
            stack.down(Path(tmp) / "stack")
    on, off_median = statistics.median(on_times), statistics.median(off_times)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "repeats": args.repeats, "cached_rerun_with_tracking_and_s3": on, "cached_rerun_without": off_median,
              "overhead_seconds": on - off_median}
    table = Table(title=f"cached rerun of the default job, median of {args.repeats} ({result['machine']})")
    for col in ("", "seconds"):
        table.add_column(col, justify="right")
    table.add_row("with MLflow server + S3 publish", f"{on:.2f}")
    table.add_row("without (tracking off, no bucket)", f"{off_median:.2f}")
    table.add_row("overhead", f"{on - off_median:.2f}")
    Console().print(table)
    out = ROOT / "benchmarks" / "results" / "tracking_overhead.json"
    out.parent.mkdir(exist_ok=True)
    files.write_json(out, result)


if __name__ == "__main__":
    main()
