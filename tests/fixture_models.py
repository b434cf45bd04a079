"""Small user models for the tests, importable as `tests.fixture_models:<name>` (model.source)."""

from __future__ import annotations

import torch
from torch import nn


class Tiny(nn.Module):
    """Conv-BN-ReLU, a residual add, pooling and a linear head: the shapes the exporter must handle."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        y = torch.relu(y + self.conv2(y))
        return self.fc(torch.flatten(self.pool(y), 1))


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: FX cannot trace this
            return torch.relu(x)
        return x


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.gate = DataDependent()
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.gate(self.stem(x)), 1), 1))


class TupleOut(Tiny):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return super().forward(x), x


def tiny(num_classes: int = 10) -> nn.Module:
    return Tiny(num_classes)


def branchy() -> nn.Module:
    return Branchy()


def tuple_out() -> nn.Module:
    return TupleOut()


def flat_mlp() -> nn.Module:
    """Expects 8x8 inputs: rejects the default 32x32."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def not_a_module() -> str:
    return "hello"
