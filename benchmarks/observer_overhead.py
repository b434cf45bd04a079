"""Calibration throughput against plain float inference on the same batches: what each PTQ observer costs.

Trains the default float model (prepare_data and float_model stages at the default params, in a temporary folder),
then for each observer (histogram, minmax, moving_average, percentile) prepares it as the calibrate stage does
(`recipes.recipe_for`, `fx.prepare` under the recipe's quantized engine) and times one pass of the calibration
batches through the fresh observing model: the calibrate stage's work, without bias correction. The float model runs
each batch right before or after it (alternating), so that bursts of load on a shared machine hit both alike. Each
repeat prepares a fresh model: every timed pass is a first calibration, as in the pipeline. prepare_fx folds BatchNorm
into the convolutions, so the observing model does a little less float work than the float model. Prints images/s
and the median of the per-repeat ratios observing / float, and writes benchmarks/results/observer_overhead.json.
Not a test: the numbers depend on the machine and its load.

    .venv/bin/python benchmarks/observer_overhead.py [--repeats 15] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from tidlq.core import files
from tidlq.core.params import Params, load_params
from tidlq.data.dataset import calibration_batches, load_split
from tidlq.models import networks
from tidlq.quant import fx, recipes
from tidlq.stages import float_model
from tidlq.stages.prepare_data import run as prepare

ROOT = Path(__file__).resolve().parents[1]


def timed_pass(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Seconds for one no-grad pass of `batches` through `model`."""
    with torch.no_grad():
        started = time.perf_counter()
        for batch in batches:
            model(batch)
        return time.perf_counter() - started


def paired_pass(net: nn.Module, prepared: nn.Module, batches: list[torch.Tensor]) -> tuple[float, float]:
    """One pass of `batches` through both models, batch by batch, the order alternating (so that a burst of load on
    a shared machine hits both alike); (float seconds, observing seconds)."""
    spent = [0.0, 0.0]
    with torch.no_grad():
        for i, batch in enumerate(batches):
            for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                started = time.perf_counter()
                (net, prepared)[which](batch)
                spent[which] += time.perf_counter() - started
    return spent[0], spent[1]


def measure(p: Params, observer: str, model_dir: Path, batches: list[torch.Tensor], repeats: int) -> dict:
    """Per repeat: a fresh prepare (untimed), then its calibration pass paired with the float model's; seconds."""
    net = networks.load(model_dir)
    spec = files.read_json(model_dir / "model.json")
    recipe = recipes.recipe_for(p.quant.model_copy(update={"observer": observer}), p.tidl.target_device)
    float_s, observed_s = [], []
    with fx.quantized_engine(recipe.spec.engine):
        for _ in range(repeats):
            prepared = fx.prepare(net, recipe, False, spec["input_shape"], spec["source"])
            f, o = paired_pass(net, prepared, batches)
            float_s.append(f)
            observed_s.append(o)
    return {"float_s": float_s, "observed_s": observed_s}


def summarize(observer: str, runs: dict, images: int) -> dict:
    """Medians: images/s of both, and the median of the per-repeat ratios (paired, so drift in load cancels)."""
    ratios = [o / f for o, f in zip(runs["observed_s"], runs["float_s"], strict=True)]
    return {"observer": observer,
            "float_images_per_s": images / statistics.median(runs["float_s"]),
            "observed_images_per_s": images / statistics.median(runs["observed_s"]),
            "time_ratio_median": statistics.median(ratios), "time_ratio_min": min(ratios),
            "time_ratio_max": max(ratios)} | runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, as the calibrate stage)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    p = load_params(ROOT / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        data, model = Path(tmp) / "data", Path(tmp) / "model"
        data.mkdir()
        model.mkdir()
        prepare(p.data, data)
        float_model.run(p.model, p.float_train, data, model)
        x, _ = load_split(data, "calib")
        batches = [torch.from_numpy(np.ascontiguousarray(b))
                   for b in calibration_batches(x, p.quant.batch_size, p.quant.calibration_batches)]
        images = sum(len(b) for b in batches)
        timed_pass(networks.load(model), batches)  # warm-up: torch's first call allocates
        rows = [summarize(o, measure(p, o, model, batches, args.repeats), images) for o in recipes.OBSERVERS]
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
              "model": p.model.display_name, "target_device": p.tidl.target_device,
              "calibration_images": images, "batch_size": p.quant.batch_size, "observers": rows}
    table = Table(title=f"{p.model.display_name}: one calibration pass ({images} images, batches of "
                        f"{p.quant.batch_size}) vs float inference, median of {args.repeats}, "
                        f"{result['torch_threads']} torch threads")
    for col in ("observer", "float images/s", "observing images/s", "time observing / float", "(min-max)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["observer"], f"{r['float_images_per_s']:,.0f}", f"{r['observed_images_per_s']:,.0f}",
                      f"{r['time_ratio_median']:.2f}x", f"{r['time_ratio_min']:.2f}-{r['time_ratio_max']:.2f}")
    Console(width=max(Console().width, 120)).print(table)
    out = ROOT / "benchmarks" / "results" / "observer_overhead.json"
    out.parent.mkdir(exist_ok=True)
    files.write_json(out, result)


if __name__ == "__main__":
    main()
