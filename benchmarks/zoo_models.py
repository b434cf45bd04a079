"""Architectures this project did not write, for benchmarks only: torchvision's model definitions (pure Python), used
as `model.source: zoo_models:<name>` with `model.kwargs: {num_classes: 10}` and the weights `benchmarks/zoo.py`
trains, as a user would bring them (`model.weights`).

torchvision is not a dependency of tidlq: `make zoo-deps` installs it with `--no-deps`, because the wheel on the
package index is a CUDA build whose C ops do not load against the CPU torch (../shared/reference/measured.md).
Importing `torchvision.models` needs those ops only for its meta registrations, which an empty module stands in for.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from torch import nn

# name -> (torchvision builder, its keyword arguments besides num_classes, what it brings that ours do not,
#          (float training epochs, learning rate) that benchmarks/zoo.py trains it with)
ZOO: dict[str, tuple[str, dict[str, Any], str, tuple[int, float]]] = {
    "resnet18": ("resnet18", {}, "residual adds, max pool", (12, 0.05)),
    "mobilenet_v2_w05": ("mobilenet_v2", {"width_mult": 0.5}, "inverted residuals, ReLU6", (20, 0.02)),
    "mobilenet_v3_small": ("mobilenet_v3_small", {}, "SE blocks, Hardswish, Hardsigmoid", (16, 0.05)),
    "shufflenet_v2_x0_5": ("shufflenet_v2_x0_5", {}, "channel shuffle, channel split", (16, 0.05)),
}


def torchvision_models() -> types.ModuleType:
    """`torchvision.models`, importable against the CPU torch (see the module docstring)."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    return importlib.import_module("torchvision.models")


def build(name: str, num_classes: int = 10) -> nn.Module:
    """A zoo model with `num_classes` outputs, random init."""
    builder, kwargs, _, _ = ZOO[name]
    return getattr(torchvision_models(), builder)(num_classes=num_classes, **kwargs)


def resnet18(num_classes: int = 10) -> nn.Module:
    return build("resnet18", num_classes)


def mobilenet_v2_w05(num_classes: int = 10) -> nn.Module:
    return build("mobilenet_v2_w05", num_classes)


def mobilenet_v3_small(num_classes: int = 10) -> nn.Module:
    return build("mobilenet_v3_small", num_classes)


def shufflenet_v2_x0_5(num_classes: int = 10) -> nn.Module:
    return build("shufflenet_v2_x0_5", num_classes)
