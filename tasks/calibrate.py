"""Stage calibrate (PTQ): prepare_fx with the recipe's QConfigMapping, feed calibration batches to the observers,
and optionally correct each layer's bias for the mean error quantization adds to its output (as TI and AIMET do).

Outputs: `prepared.pt` (state_dict of the observed model) and `prepared.json` (recipe, engine, what was fed).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from prefect import task
from torch import nn

from tasks import cache, files, models, qconfig
from tasks.params import QuantParams
from tasks.prepare_data import load_split


def run(quant: QuantParams, target_device: str, model_dir: Path, data_dir: Path, out: Path) -> dict:
    """Prepare the float model for PTQ with the recipe for `target_device` and calibrate it on the calib split."""
    spec = files.read_json(Path(model_dir) / "model.json")
    recipe = qconfig.recipe_for(quant, target_device)
    engine = qconfig.engine_for(recipe.preset)
    x, _ = load_split(data_dir, "calib")
    batches = list(calibration_batches(x, quant.batch_size, quant.calibration_batches))
    with qconfig.quantized_engine(engine):  # also the lock that keeps torch.fx tracing to one thread
        prepared = qconfig.prepare(models.load(model_dir), recipe, False, spec["input_shape"], spec["source"])
        with torch.no_grad():
            for batch in batches:
                prepared(torch.from_numpy(batch))
        corrected = correct_bias(prepared, batches) if quant.bias_correction else {}
        torch.save(prepared.state_dict(), out / "prepared.pt")
    info = qconfig.recipe_record(recipe, "ptq", engine) | {
        "calibration_images": int(sum(len(b) for b in batches)), "calibration_batches": len(batches),
        "bias_correction": corrected}
    files.write_json(out / "prepared.json", info)
    return {k: v for k, v in info.items() if k != "bias_correction"}


@task(name="calibrate", **cache.TASK_OPTIONS)
def calibrate_task(root: Path, quant: QuantParams, target_device: str, model: cache.Manifest,
                   data: cache.Manifest) -> cache.Manifest:
    """Prefect task: `run` through the stage cache."""
    return cache.build(root, "calibrate", __name__, [quant, target_device, model, data],
                       lambda out: run(quant, target_device, model.dir, data.dir, out))


def calibration_batches(x: np.ndarray, batch_size: int, batches: int) -> Iterator[np.ndarray]:
    """Up to `batches` consecutive batches of the calib split (fewer when the split is smaller)."""
    for i in range(batches):
        batch = x[i * batch_size:(i + 1) * batch_size]
        if len(batch) == 0:
            return
        yield batch


def correct_bias(prepared: torch.fx.GraphModule, batches: list[np.ndarray]) -> dict[str, float]:
    """Empirical bias correction, layer by layer in graph order: add to each plain Conv/Linear bias the mean
    per-channel difference between its float output and its int8 output on the calibration batches, measured after
    the layers before it were corrected. Returns {layer: mean |shift|}.

    Int8 outputs come from torch's int8 kernels on the engine whose numerics match the exported QDQ model here.
    Layers fused with their activation (Conv+ReLU) are left alone: their pre-activation int8 output is not visible.
    """
    modules = dict(prepared.named_modules())
    order = [n.target for n in prepared.graph.nodes if n.op == "call_module"]
    layers = [n for n in order if type(modules.get(n)) in (nn.Conv2d, nn.Linear) and modules[n].bias is not None]
    # A layer quantized over its activation's range (qconfig._OutputRange) is compared inside that range.
    float_means = _channel_means(copy.deepcopy(prepared), layers, batches, _output_ranges(prepared, layers))
    shifts = {}
    with qconfig.quantized_engine(qconfig.measuring_engine()), torch.no_grad():
        for name in layers:
            int8 = qconfig.convert(prepared)
            if name not in dict(int8.named_modules()):
                continue
            delta = float_means[name] - _channel_means(int8, [name], batches)[name]
            modules[name].bias += delta
            shifts[name] = float(delta.abs().mean())
    return shifts


def _output_ranges(prepared: torch.fx.GraphModule, layers: list[str]) -> dict[str, torch.Tensor]:
    """The output range given to each layer's output observer (see qconfig.clamp_shared_ranges)."""
    modules = dict(prepared.named_modules(remove_duplicate=False))
    ranges = {}
    for node in prepared.graph.nodes:
        users = list(node.users)
        if node.op == "call_module" and node.target in layers and len(users) == 1 and users[0].op == "call_module":
            observer = modules[str(users[0].target)]
            if hasattr(observer, "output_range"):
                ranges[str(node.target)] = observer.output_range
    return ranges


def _channel_means(model: nn.Module, names: list[str], batches: list[np.ndarray],
                   ranges: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Mean output per channel (dimension 1) of the named modules over all batches, each output clamped to its
    `ranges` entry when it has one; quantized outputs dequantized."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    ranges = ranges or {}

    def hook(name: str):  # noqa: ANN202 - a forward hook factory
        def record(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            out = (output.dequantize() if output.is_quantized else output).float()
            if name in ranges:
                out = torch.clamp(out, float(ranges[name][0]), float(ranges[name][1]))
            sums[name] = sums.get(name, 0) + out.sum(dim=[d for d in range(out.dim()) if d != 1])
            counts[name] = counts.get(name, 0) + out.numel() // out.shape[1]
        return record

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            for batch in batches:
                model(torch.from_numpy(batch))
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / counts[name] for name in sums}
