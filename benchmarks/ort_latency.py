"""onnxruntime CPU latency of the QDQ model against the float model of the same run.

Takes `model_qdq.onnx` and `float.onnx` from a run's output folder (`--run-dir outputs/mobilenet_v2_tiny`), or, without
`--run-dir`, runs the default job (`tidlq run`, sensitivity and the onnxruntime baseline off) into a temporary folder
first. Both models are exported with a static batch-1 input (TIDL refuses dynamic shapes); for batch 32 the batch
dimension of a copy is made symbolic (the graphs flatten with Flatten, not a fixed Reshape). Times
`InferenceSession.run` on the CPU provider with 1 and 2 intra-op threads, batch 1 and 32, median over `--runs` after
warm-up, models interleaved. Writes benchmarks/results/ort_latency.json.

This checks that the QDQ model runs, and what onnxruntime makes of it on this CPU; it is not TIDL's latency. On x86,
onnxruntime fuses DequantizeLinear -> op -> QuantizeLinear into int8 kernels where it has them (QLinearConv ...) and
runs the rest as float between Q/DQ pairs; TIDL compiles the model for the C7x/MMA and runs something else entirely.

    .venv/bin/python benchmarks/ort_latency.py [--run-dir outputs/mobilenet_v2_tiny] [--runs 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import snapshot
from rich.console import Console
from rich.table import Table

from tidlq.core import files

ROOT = Path(__file__).resolve().parents[1]
TIDLQ = str(Path(sys.executable).with_name("tidlq"))
MODELS = {"float": "float.onnx", "qdq": "model_qdq.onnx"}


def run_default_job(tmp: Path) -> Path:
    """`tidlq run` with the default params into `tmp` (a copy of the code, fresh PREFECT_HOME and its local Prefect
    server, stopped after); the model folder."""
    code, env = snapshot.take(tmp / "code")
    with snapshot.prefect_home(code, env, tmp / "prefect") as job_env:
        done = subprocess.run([TIDLQ, "run", "-p", "params.yaml", "--set", f"output_dir={tmp / 'out'}",
                               "--set", "sensitivity.enabled=false", "--set", "verify.baseline=none"],
                              cwd=code, env=job_env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tidlq run failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return tmp / "out" / "mobilenet_v2_tiny"


def with_batch(path: Path, batch: int) -> bytes:
    """The model, serialized, with a symbolic batch dimension when `batch` > 1 (and stale shape info dropped)."""
    model = onnx.load(path)
    if batch > 1:
        for value in (*model.graph.input, *model.graph.output):
            value.type.tensor_type.shape.dim[0].dim_param = "N"
        del model.graph.value_info[:]
    return model.SerializeToString()


def session(model: bytes, threads: int) -> ort.InferenceSession:
    """A CPU session with `threads` intra-op threads, one inter-op thread, all graph optimizations."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def optimized_ops(model: bytes) -> dict[str, int]:
    """Node types of the graph onnxruntime actually runs (after its optimizations, CPU provider), by count."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return dict(ops.most_common())


def latencies(sessions: dict[str, ort.InferenceSession], x: np.ndarray, runs: int, warmup: int) -> dict[str, list]:
    """Seconds per run of each session on `x`, interleaved run by run so that load changes hit both alike."""
    feeds = {name: {s.get_inputs()[0].name: x} for name, s in sessions.items()}
    for _ in range(warmup):
        for name, s in sessions.items():
            s.run(None, feeds[name])
    times: dict[str, list] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, s in sessions.items():
            started = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append(time.perf_counter() - started)
    return times


def measure(run_dir: Path, runs: int, warmup: int) -> list[dict]:
    """One row per (threads, batch): median ms of both models and the ratio qdq / float."""
    shape = [d.dim_value for d in onnx.load(run_dir / MODELS["float"]).graph.input[0].type.tensor_type.shape.dim]
    rows = []
    for threads in (1, 2):
        for batch in (1, 32):
            x = np.random.default_rng(0).standard_normal([batch, *shape[1:]]).astype(np.float32)
            sessions = {name: session(with_batch(run_dir / f, batch), threads) for name, f in MODELS.items()}
            times = latencies(sessions, x, runs, warmup)
            ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
            rows.append({"intra_op_threads": threads, "batch": batch, "float_ms": ms["float"], "qdq_ms": ms["qdq"],
                         "ratio_qdq_float": ms["qdq"] / ms["float"],
                         "qdq_images_per_s": 1000 * batch / ms["qdq"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, help="a run's output folder (default: run the default job first)")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    ort.set_default_logger_severity(3)  # not the warning that a saved optimized model is hardware-specific
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or run_default_job(Path(tmp))
        rows = measure(run_dir, args.runs, args.warmup)
        ops = {name: optimized_ops(with_batch(run_dir / f, 1)) for name, f in MODELS.items()}
        source = str(args.run_dir) if args.run_dir else "a fresh default run"
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "onnxruntime": ort.__version__, "runs": args.runs, "warmup": args.warmup, "models_from": source,
              "rows": rows, "optimized_ops": ops}
    table = Table(title=f"onnxruntime {ort.__version__} CPU latency, median of {args.runs} runs ({source})")
    for col in ("intra-op threads", "batch", "float ms", "QDQ ms", "QDQ / float", "QDQ images/s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["intra_op_threads"]), str(r["batch"]), f"{r['float_ms']:.3f}", f"{r['qdq_ms']:.3f}",
                      f"{r['ratio_qdq_float']:.2f}x", f"{r['qdq_images_per_s']:,.0f}")
    Console().print(table)
    for name, counts in ops.items():
        print(f"{name} model as onnxruntime runs it: " + ", ".join(f"{op} {n}" for op, n in counts.items()))
    print("onnxruntime on this x86 CPU, not TIDL: a check that the QDQ model runs, not a device latency.")
    out = ROOT / "benchmarks" / "results" / "ort_latency.json"
    out.parent.mkdir(exist_ok=True)
    files.write_json(out, result)


if __name__ == "__main__":
    main()
