"""Empirical bias correction (as TI and AIMET do): after calibration, shift each Conv/Linear bias by the mean
per-channel error quantization adds to its output, layer by layer."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from tidlq.quant import fx
from tidlq.quant.recipes import measuring_engine


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
    # A layer quantized over its activation's range (tidlq.quant.observers, _OutputRange) is compared inside that range.
    float_means = _channel_means(copy.deepcopy(prepared), layers, batches, _output_ranges(prepared, layers))
    shifts = {}
    with fx.quantized_engine(measuring_engine()), torch.no_grad():
        for name in layers:
            int8 = fx.convert(prepared)
            if name not in dict(int8.named_modules()):
                continue
            delta = float_means[name] - _channel_means(int8, [name], batches)[name]
            modules[name].bias += delta
            shifts[name] = float(delta.abs().mean())
    return shifts


def _output_ranges(prepared: torch.fx.GraphModule, layers: list[str]) -> dict[str, torch.Tensor]:
    """The output range given to each layer's output observer (see fx.clamp_shared_ranges)."""
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

    def hook(name: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
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
