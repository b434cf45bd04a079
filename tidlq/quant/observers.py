"""Calibration observers: torch's, with an output range (a Conv quantized over the range of the ReLU/ReLU6 after it)
and with power-of-2 symmetric scales for TIDL devices that need them, plus a percentile observer."""

from __future__ import annotations

from typing import Any

import torch
from torch.ao.quantization import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)


class PercentileObserver(MinMaxObserver):
    """Range at the `percentile` of |x| (clamped to the observed min and max), as onnxruntime's and TensorRT's
    percentile calibration: only 100 - percentile % of the values seen, the largest in magnitude, are clipped.

    Its own histogram of |x| over [0, max |x| seen] in `bins` bins; a batch with a larger magnitude widens the
    range and re-bins what was seen (each old bin's count goes to the new bin its centre falls into). torch's
    HistogramObserver is not used for this: it clips each tail at the percentile separately and its histogram
    merges are coarse."""

    def __init__(self, percentile: float = 99.999, bins: int = 2048, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.percentile, self.bins = percentile, bins
        self.register_buffer("histogram", torch.zeros(bins))
        self.register_buffer("magnitude", torch.zeros(()))

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach().float().abs()
        top = x.max()
        if top > self.magnitude:
            if self.histogram.sum() > 0:
                centres = (torch.arange(self.bins) + 0.5) * (self.magnitude / self.bins)
                index = torch.clamp((centres / top * self.bins).long(), max=self.bins - 1)
                self.histogram.copy_(torch.zeros(self.bins).index_add_(0, index, self.histogram))
            self.magnitude.copy_(top)
        if self.magnitude > 0:
            self.histogram += torch.histc(x, self.bins, 0, float(self.magnitude))
        return super().forward(x_orig)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min_val == float("inf") or self.histogram.sum() == 0:
            return super().calculate_qparams()
        cdf = torch.cumsum(self.histogram, 0) / self.histogram.sum()
        index = min(int(torch.searchsorted(cdf, torch.tensor(self.percentile / 100))), self.bins - 1)
        threshold = (index + 1) * self.magnitude / self.bins  # the bin's upper edge
        low, high = torch.clamp(-threshold, min=self.min_val), torch.clamp(threshold, max=self.max_val)
        return self._calculate_qparams(torch.min(low, torch.zeros(())), torch.max(high, torch.zeros(())))


class _OutputRange:
    """Mixin for activation observers: qparams over the observed range clamped to `output_range`.

    `clamp_shared_ranges` sets it on the observer of a ReLU / ReLU6 / hardtanh input: the input (a Conv's output,
    say) is then quantized over the activation's output range, so that the quantization itself applies the clamp
    and no level is spent on values the activation discards (zero point 0 before a ReLU6). This is what
    onnxruntime's quantizer and TIDL's Conv+Clip fusion do; torch's ReLU6 shares its input's unclamped qparams.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("output_range", torch.tensor([float("-inf"), float("inf")]))

    def _calculate_qparams(self, min_val: torch.Tensor, max_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self.output_range
        min_val, max_val = torch.clamp(min_val, low, high), torch.clamp(max_val, low, high)
        return super()._calculate_qparams(min_val, max_val)


class _PowerOf2:
    """Mixin for observers: scales rounded up to a power of two (the range widens, never clips more), symmetric:
    int8 weights with zero point 0; uint8 activations with zero point 0 when never negative, else 128."""

    def _calculate_qparams(self, min_val: torch.Tensor, max_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amax = torch.max(-torch.min(min_val, torch.zeros_like(min_val)), torch.max(max_val, torch.zeros_like(max_val)))
        unsigned = self.dtype == torch.quint8 and bool(torch.all(min_val >= 0))
        scale = amax / (255.0 if unsigned else (self.quant_max - self.quant_min) / 2)
        scale = torch.exp2(torch.ceil(torch.log2(torch.clamp(scale, min=2.0 ** -24))))
        zero = 0 if self.dtype == torch.qint8 or unsigned else 128
        return scale.reshape(-1).float(), torch.full_like(scale.reshape(-1), zero, dtype=torch.int64)


class ActivationHistogramObserver(_OutputRange, HistogramObserver):
    """torch's histogram observer (MSE range search) with an output range."""


class ActivationMinMaxObserver(_OutputRange, MinMaxObserver):
    """Min/max observer with an output range."""


class ActivationMovingAverageObserver(_OutputRange, MovingAverageMinMaxObserver):
    """Moving-average min/max observer with an output range (also QAT activations)."""


class ActivationPercentileObserver(_OutputRange, PercentileObserver):
    """Percentile observer with an output range."""


class PowerOf2HistogramObserver(_OutputRange, _PowerOf2, HistogramObserver):
    """Histogram observer with an output range and power-of-2 symmetric qparams."""


class PowerOf2MinMaxObserver(_OutputRange, _PowerOf2, MinMaxObserver):
    """Min/max observer with an output range and power-of-2 symmetric qparams."""


class PowerOf2MovingAverageMinMaxObserver(_OutputRange, _PowerOf2, MovingAverageMinMaxObserver):
    """Moving-average min/max observer with an output range and power-of-2 symmetric qparams (QAT activations)."""


class PowerOf2PercentileObserver(_OutputRange, _PowerOf2, PercentileObserver):
    """Percentile observer with an output range and power-of-2 symmetric qparams."""


class PowerOf2PerChannelMinMaxObserver(_PowerOf2, PerChannelMinMaxObserver):
    """Per-channel weight observer with power-of-2 symmetric scales."""


class PowerOf2MovingAveragePerChannelMinMaxObserver(_PowerOf2, MovingAveragePerChannelMinMaxObserver):
    """Per-channel moving-average weight observer with power-of-2 scales (QAT weights)."""


ACTIVATION_OBSERVERS = {  # (plain, power-of-2) per quant.observer
    "histogram": (ActivationHistogramObserver, PowerOf2HistogramObserver),
    "minmax": (ActivationMinMaxObserver, PowerOf2MinMaxObserver),
    "moving_average": (ActivationMovingAverageObserver, PowerOf2MovingAverageMinMaxObserver),
    "percentile": (ActivationPercentileObserver, PowerOf2PercentileObserver),
}
