"""The quantization recipe: qconfig presets, calibration observers, power-of-2 scales for TDA4VM, and the FX graph
mode steps around them: prepare, rebuild a prepared model from its files, convert.

Presets (params `quant.qconfig`), each for PTQ (observers) and QAT (fake-quantize modules):
- `tidl`: TI's WC8_AT8: int8 per-channel symmetric weights (restricted to [-127, 127]), uint8 per-tensor affine
  activations over the full range (tidl.md §4). On tda4vm / am68pa, whose TIDL takes only symmetric power-of-2
  scales, it becomes TI's WC8SYMP2_AT8SYMP2: every scale rounded up to a power of two, weights symmetric,
  activations unsigned with zero point 0 when they are never negative and symmetric otherwise.
- `qnnpack`: torch's qnnpack defaults, the qconfig of TI's PyTorch page (per-tensor symmetric weights).
- `x86`: torch's x86 defaults (per-channel weights, activations in 7 bits: `reduce_range`).
The activation observer for PTQ comes from `quant.observer`: histogram (torch's MSE search, the default), minmax,
moving_average (min/max averaged over batches) or percentile (clip at `quant.percentile` of the histogram). QAT
always uses moving-average min/max fake-quantization.

A prepared model is never pickled: it is rebuilt by running prepare_fx / prepare_qat_fx again on the float model with
the recipe recorded in prepared.json, and loading the saved state_dict.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import (
    FakeQuantize,
    FusedMovingAvgObsFakeQuantize,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
    get_default_qat_qconfig_mapping,
    get_default_qconfig_mapping,
)
from torch.ao.quantization.backend_config import BackendConfig, ObservationType, get_native_backend_config
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

from tasks import files, models
from tasks.errors import UserError
from tasks.params import POWER_OF_2_DEVICES

PRESETS = ("qnnpack", "x86", "tidl")
OBSERVERS = ("histogram", "minmax", "moving_average", "percentile")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides how a model is quantized, recorded in prepared.json."""

    preset: str = "tidl"
    observer: str = "histogram"
    percentile: float = 99.99
    power_of_2: bool = False


def recipe_for(quant: Any, target_device: str) -> Recipe:
    """The recipe of a params `quant` section for a TIDL target device."""
    return Recipe(preset=quant.qconfig, observer=quant.observer, percentile=quant.percentile,
                  power_of_2=quant.qconfig == "tidl" and target_device in POWER_OF_2_DEVICES)


class PercentileObserver(HistogramObserver):
    """A histogram observer whose range is clipped at the `percentile` (and 100 - percentile) of what it saw."""

    def __init__(self, percentile: float = 99.99, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.percentile = percentile

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min_val == float("inf"):
            return super().calculate_qparams()
        cdf = torch.cumsum(self.histogram, 0) / self.histogram.sum().clamp(min=1)
        edges = torch.linspace(float(self.min_val), float(self.max_val), self.bins + 1)
        low = edges[int(torch.searchsorted(cdf, (100 - self.percentile) / 100))]
        high = edges[min(int(torch.searchsorted(cdf, self.percentile / 100)) + 1, self.bins)]
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


_ACTIVATION_OBSERVERS = {
    "histogram": (ActivationHistogramObserver, PowerOf2HistogramObserver),
    "minmax": (ActivationMinMaxObserver, PowerOf2MinMaxObserver),
    "moving_average": (ActivationMovingAverageObserver, PowerOf2MovingAverageMinMaxObserver),
    "percentile": (ActivationPercentileObserver, PowerOf2PercentileObserver),
}


def qconfig_mapping(recipe: Recipe, qat: bool) -> QConfigMapping:
    """torch's default mapping of the preset's backend (it handles sigmoid, layer norm, ...) with the recipe's qconfig
    as the global one."""
    backend = "x86" if recipe.preset == "x86" else "qnnpack"
    base = get_default_qat_qconfig_mapping(backend) if qat else get_default_qconfig_mapping(backend)
    return base.set_global(QConfig(activation=_activation(recipe, qat), weight=_weight(recipe, qat)))


def _activation(recipe: Recipe, qat: bool) -> Any:
    reduce_range = recipe.preset == "x86"
    common = {"dtype": torch.quint8, "qscheme": torch.per_tensor_affine, "reduce_range": reduce_range}
    if qat:
        # FakeQuantize, not the fused kernel: the fused kernel computes qparams in C++ and ignores output ranges.
        observer = _ACTIVATION_OBSERVERS["moving_average"][recipe.power_of_2]
        return FakeQuantize.with_args(observer=observer, quant_min=0, quant_max=127 if reduce_range else 255,
                                      **common)
    observer = _ACTIVATION_OBSERVERS[recipe.observer][recipe.power_of_2]
    extra = {"percentile": recipe.percentile} if recipe.observer == "percentile" else {}
    return observer.with_args(**common, **extra)


def _weight(recipe: Recipe, qat: bool) -> Any:
    per_channel = recipe.preset != "qnnpack"
    # tidl: the symmetric restricted range [-127, 127] (scale = max|w| / 127), as TFLite and onnxruntime do; torch's
    # [-128, 127] with scale max|w| / 127.5 rounds the largest positive weight of each channel past 127 and clips it.
    qrange = {"quant_min": -127, "quant_max": 127} if recipe.preset == "tidl" else {"quant_min": -128, "quant_max": 127}
    common = {"dtype": torch.qint8,
              "qscheme": torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric, **qrange}
    if qat:
        if recipe.power_of_2:
            return FakeQuantize.with_args(observer=PowerOf2MovingAveragePerChannelMinMaxObserver, ch_axis=0, **common)
        observer = MovingAveragePerChannelMinMaxObserver if per_channel else MovingAverageMinMaxObserver
        return FusedMovingAvgObsFakeQuantize.with_args(observer=observer, **common)
    if recipe.power_of_2:
        return PowerOf2PerChannelMinMaxObserver.with_args(**common)
    return (PerChannelMinMaxObserver if per_channel else MinMaxObserver).with_args(**common)


# Averaging shrinks the range: a global average pool's output spans a fraction of its input's. torch shares the
# input's qparams across these ops; an observer of their own keeps their 8 bits on the range they produce (the last
# pool of a classifier feeds the logits).
_AVERAGING_OPS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.functional.adaptive_avg_pool2d, nn.functional.avg_pool2d,
                  torch.mean, "mean")


@functools.cache
def backend_config() -> BackendConfig:
    """torch's native backend config, with averaging ops observed on their own output."""
    import torch.ao.quantization.backend_config.utils  # noqa: F401 - torch 2.13 needs it imported first

    native = get_native_backend_config()
    for config in native.configs:
        if config.pattern in _AVERAGING_OPS:
            config.set_observation_type(ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT)
    return BackendConfig("tidlq").set_backend_pattern_configs(native.configs)


def engine_for(preset: str) -> str:
    """The torch quantized engine used to convert and run a preset's int8 model in torch (the cross-check).

    `qnnpack` runs on qnnpack, as TI's page does (its kernels are wrong for Conv+ReLU6 on x86, see measured.md: the
    cross-check then disagrees with onnxruntime and says so). The others run on x86 where it exists.
    """
    if preset == "qnnpack" or "x86" not in torch.backends.quantized.supported_engines:
        return "qnnpack"
    return "x86"


def measuring_engine() -> str:
    """The engine whose int8 kernels match the exported QDQ model's numerics on this machine (x86 where it exists)."""
    return "x86" if "x86" in torch.backends.quantized.supported_engines else "qnnpack"


# The engine, torch.fx tracing (it patches nn.Module.__call__ for the whole process) and the warning filters are
# process-wide: stages running side by side (the autopilot) take turns on this lock for their torch work.
_ENGINE_LOCK = threading.RLock()


@contextlib.contextmanager
def quantized_engine(name: str) -> Iterator[None]:
    """Use torch quantized engine `name` inside the block (one thread at a time), quiet torch.ao's deprecation
    warnings."""
    with _ENGINE_LOCK:
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = name
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", module=r"torch\.ao\.quantization.*")
                warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecated.*")
                warnings.filterwarnings("ignore", message=r".*(quantize_per_tensor|quint8|qint8|qint32).*deprecated.*")
                yield
        finally:
            torch.backends.quantized.engine = previous


def prepare(model: nn.Module, recipe: Recipe, qat: bool, input_shape: list[int], source: str) -> torch.fx.GraphModule:
    """prepare_fx (PTQ, eval mode) or prepare_qat_fx (QAT, train mode) on a copy of `model`."""
    model = copy.deepcopy(model)
    example = (torch.zeros(input_shape),)
    mapping = qconfig_mapping(recipe, qat)
    try:
        prepare_fn = prepare_qat_fx if qat else prepare_fx
        prepared = prepare_fn(model.train(qat), mapping, example, backend_config=backend_config())
    except Exception as exc:  # noqa: BLE001 - FX raises many types; all mean the model cannot be prepared
        raise UserError(models.explain_trace_failure(exc, source)) from None
    clamp_shared_ranges(prepared)
    return prepared


def clamp_shared_ranges(prepared: torch.fx.GraphModule) -> int:
    """Give the observer of each ReLU / ReLU6 / hardtanh input that activation's output range (see `_OutputRange`),
    where the input feeds nothing else: values outside the range are discarded by the activation anyway. Returns how
    many observers were given a range."""
    modules = dict(prepared.named_modules(remove_duplicate=False))
    count = 0
    for node in prepared.graph.nodes:
        bounds = _activation_bounds(node, modules)
        source = node.args[0] if bounds and node.args else None
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue  # the activation's input feeds something else too: it needs its full range
        observer = modules[source.target]
        observer = getattr(observer, "activation_post_process", observer)  # FakeQuantize wraps the observer
        if hasattr(observer, "output_range"):
            observer.output_range.copy_(torch.tensor(bounds, dtype=torch.float32))
            count += 1
    return count


def _activation_bounds(node: torch.fx.Node, modules: dict[str, nn.Module]) -> tuple[float, float] | None:
    """(low, high) of a ReLU / ReLU6 / hardtanh node's output, None for other nodes."""
    inf = float("inf")
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if isinstance(module, nn.ReLU):
            return (0.0, inf)
        if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
            return (float(module.min_val), float(module.max_val))
    if node.op == "call_function":
        if node.target in (torch.relu, nn.functional.relu):
            return (0.0, inf)
        if node.target is nn.functional.relu6:
            return (0.0, 6.0)
        if node.target is nn.functional.hardtanh:
            low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
            high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
            return (float(low), float(high))
    return None


def recipe_record(recipe: Recipe, mode: str, engine: str) -> dict[str, Any]:
    """What prepared.json records so that the prepared model can be rebuilt."""
    return {"mode": mode, "qconfig": recipe.preset, "engine": engine, "recipe": asdict(recipe)}


def load_prepared(model_dir: Path, prepared_dir: Path) -> torch.fx.GraphModule:
    """Rebuild the prepared (observed or QAT) model of a calibrate / train_qat folder, in eval mode."""
    spec = files.read_json(Path(model_dir) / "model.json")
    info = files.read_json(Path(prepared_dir) / "prepared.json")
    prepared = prepare(models.load(model_dir), Recipe(**info["recipe"]), info["mode"] == "qat", spec["input_shape"],
                       spec["source"])
    prepared.load_state_dict(torch.load(Path(prepared_dir) / "prepared.pt", weights_only=True))
    return prepared.eval()


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """convert_fx on a copy of a prepared model (eval mode), averaging ops requantized on their own range."""
    own_ranges = _averaging_output_qparams(prepared)
    int8 = convert_fx(copy.deepcopy(prepared).eval(), backend_config=backend_config())
    _requantize(int8, own_ranges)
    return int8


def _averaging_output_qparams(prepared: torch.fx.GraphModule) -> dict[str, tuple[float, int]]:
    """{node name: (scale, zero point)} of each averaging op's own output observer in a prepared model."""
    modules = dict(prepared.named_modules(remove_duplicate=False))
    found = {}
    for node in prepared.graph.nodes:
        target = type(modules.get(str(node.target))) if node.op == "call_module" else node.target
        users = list(node.users)
        if target in _AVERAGING_OPS and len(users) == 1 and users[0].op == "call_module":
            scale, zero = modules[str(users[0].target)].calculate_qparams()
            found[node.name] = (float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0]))
    return found


def _requantize(int8: torch.fx.GraphModule, qparams: dict[str, tuple[float, int]]) -> None:
    """convert_fx lowers an averaging op to one that keeps its input's qparams, whatever its observer saw; rewrite
    each as dequantize -> the op in float -> quantize with its own qparams (exported as DQ -> op -> Q)."""
    graph = int8.graph
    for node in [n for n in graph.nodes if n.name in qparams]:
        scale, zero = qparams[node.name]
        with graph.inserting_before(node):
            node.update_arg(0, graph.call_method("dequantize", (node.args[0],)))
        with graph.inserting_after(node):
            requantized = graph.call_function(torch.quantize_per_tensor, (node, scale, zero, torch.quint8))
        node.replace_all_uses_with(requantized, delete_user_cb=lambda user, keep=requantized: user is not keep)
    graph.lint()
    int8.recompile()
