"""Quantization recipes: the presets (what a `quant.qconfig` value means for torch and for TIDL) and the recipe a
params `quant` section describes for a target device.

Presets, each for PTQ (observers) and QAT (fake-quantize modules):
- `tidl`: TI's WC8_AT8: int8 per-channel symmetric weights (restricted to [-127, 127]), uint8 per-tensor affine
  activations over the full range (tidl.md §4). It follows the device: on tda4vm / am68pa, whose TIDL takes only
  symmetric power-of-2 scales, it becomes TI's WC8SYMP2_AT8SYMP2: every scale rounded up to a power of two, weights
  symmetric, activations unsigned with zero point 0 when they are never negative and symmetric otherwise.
- `qnnpack`: torch's qnnpack defaults, the qconfig of TI's PyTorch page (per-tensor symmetric weights).
- `x86`: torch's x86 defaults (per-channel weights, activations in 7 bits: `reduce_range`).
The activation observer for PTQ comes from `quant.observer` (`tidlq.quant.observers`); QAT always uses moving-average
min/max fake-quantization.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from tidlq.tidl.devices import device

OBSERVERS = ("histogram", "minmax", "moving_average", "percentile")


@dataclass(frozen=True)
class Preset:
    """What a `quant.qconfig` preset means: the torch defaults it starts from, its weights and activations, and the
    engine its torch int8 model runs on (the cross-check)."""

    name: str
    backend: str  # torch's default QConfigMapping it starts from (sigmoid, layer norm, ... stay torch's)
    per_channel: bool  # weights per output channel, else per tensor
    weight_range: tuple[int, int]  # int8 weight levels
    reduce_range: bool  # activations in 7 bits
    follows_device: bool  # power-of-2 symmetric scales on devices that need them (tidlq.tidl.devices)
    cross_check_engine: str  # the torch engine for the int8 cross-check, where it exists

    @property
    def engine(self) -> str:
        """The torch quantized engine used to convert and run the preset's int8 model in torch (the cross-check).

        `qnnpack` runs on qnnpack, as TI's page does (its kernels are wrong for Conv+ReLU6 on x86, see measured.md:
        the cross-check then disagrees with onnxruntime and says so). The others run on x86 where it exists.
        """
        if self.cross_check_engine in torch.backends.quantized.supported_engines:
            return self.cross_check_engine
        return "qnnpack"


PRESETS: dict[str, Preset] = {p.name: p for p in (
    # tidl: the symmetric restricted range [-127, 127] (scale = max|w| / 127), as TFLite and onnxruntime do; torch's
    # [-128, 127] with scale max|w| / 127.5 rounds the largest positive weight of each channel past 127 and clips it.
    Preset("tidl", backend="qnnpack", per_channel=True, weight_range=(-127, 127), reduce_range=False,
           follows_device=True, cross_check_engine="x86"),
    Preset("qnnpack", backend="qnnpack", per_channel=False, weight_range=(-128, 127), reduce_range=False,
           follows_device=False, cross_check_engine="qnnpack"),
    Preset("x86", backend="x86", per_channel=True, weight_range=(-128, 127), reduce_range=True,
           follows_device=False, cross_check_engine="x86"),
)}


@dataclass(frozen=True)
class Recipe:
    """Everything that decides how a model is quantized, recorded in prepared.json."""

    preset: str = "tidl"
    observer: str = "histogram"
    percentile: float = 99.999
    power_of_2: bool = False

    @property
    def spec(self) -> Preset:
        """The preset this recipe uses."""
        return PRESETS[self.preset]


def recipe_for(quant: Any, target_device: str) -> Recipe:
    """The recipe of a params `quant` section for a TIDL target device."""
    preset = PRESETS[quant.qconfig]
    return Recipe(preset=preset.name, observer=quant.observer, percentile=quant.percentile,
                  power_of_2=preset.follows_device and device(target_device).power_of_2)


def recipe_record(recipe: Recipe, mode: str, engine: str) -> dict[str, Any]:
    """What prepared.json records so that the prepared model can be rebuilt."""
    return {"mode": mode, "qconfig": recipe.preset, "engine": engine, "recipe": asdict(recipe)}


def measuring_engine() -> str:
    """The engine whose int8 kernels match the exported QDQ model's numerics on this machine (x86 where it exists)."""
    return "x86" if "x86" in torch.backends.quantized.supported_engines else "qnnpack"
