"""torch.ao FX graph mode around a recipe: the QConfigMapping of a recipe, prepare_fx / prepare_qat_fx, a prepared or
converted model rebuilt from its stage folders, convert_fx, and the process-wide lock torch's quantized engine and FX
tracing need.

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
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import (
    FakeQuantize,
    FusedMovingAvgObsFakeQuantize,
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

from tidlq.core import files
from tidlq.core.errors import UserError
from tidlq.models import networks
from tidlq.quant import observers
from tidlq.quant.recipes import Recipe


def qconfig_mapping(recipe: Recipe, qat: bool) -> QConfigMapping:
    """torch's default mapping of the preset's backend (it handles sigmoid, layer norm, ...) with the recipe's qconfig
    as the global one."""
    backend = recipe.spec.backend
    base = get_default_qat_qconfig_mapping(backend) if qat else get_default_qconfig_mapping(backend)
    return base.set_global(QConfig(activation=_activation(recipe, qat), weight=_weight(recipe, qat)))


def _activation(recipe: Recipe, qat: bool) -> Any:
    reduce_range = recipe.spec.reduce_range
    common = {"dtype": torch.quint8, "qscheme": torch.per_tensor_affine, "reduce_range": reduce_range}
    if qat:
        # FakeQuantize, not the fused kernel: the fused kernel computes qparams in C++ and ignores output ranges.
        observer = observers.ACTIVATION_OBSERVERS["moving_average"][recipe.power_of_2]
        return FakeQuantize.with_args(observer=observer, quant_min=0, quant_max=127 if reduce_range else 255,
                                      **common)
    observer = observers.ACTIVATION_OBSERVERS[recipe.observer][recipe.power_of_2]
    extra = {"percentile": recipe.percentile} if recipe.observer == "percentile" else {}
    return observer.with_args(**common, **extra)


def _weight(recipe: Recipe, qat: bool) -> Any:
    per_channel = recipe.spec.per_channel
    qrange = dict(zip(("quant_min", "quant_max"), recipe.spec.weight_range, strict=True))
    common = {"dtype": torch.qint8,
              "qscheme": torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric, **qrange}
    if qat:
        if recipe.power_of_2:
            return FakeQuantize.with_args(observer=observers.PowerOf2MovingAveragePerChannelMinMaxObserver, ch_axis=0,
                                          **common)
        observer = MovingAveragePerChannelMinMaxObserver if per_channel else MovingAverageMinMaxObserver
        return FusedMovingAvgObsFakeQuantize.with_args(observer=observer, **common)
    if recipe.power_of_2:
        return observers.PowerOf2PerChannelMinMaxObserver.with_args(**common)
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
            _forget_models()


def _forget_models() -> None:
    """torch 2.13 wraps torch.ao's `assert_and_get_unique_device` in functools.cache, keyed by the module: every
    model prepare_fx or convert_fx sees would stay alive for the life of the process (measured: +300 MiB per
    autopilot recipe on resnet18). Clear that cache when the torch work is done."""
    from torch.ao.quantization.fx import utils

    clear = getattr(utils.assert_and_get_unique_device, "cache_clear", None)
    if clear is not None:
        clear()


def prepare(model: nn.Module, recipe: Recipe, qat: bool, input_shape: list[int], source: str) -> torch.fx.GraphModule:
    """prepare_fx (PTQ, eval mode) or prepare_qat_fx (QAT, train mode) on a copy of `model`."""
    model = copy.deepcopy(model)
    example = (torch.zeros(input_shape),)
    mapping = qconfig_mapping(recipe, qat)
    try:
        prepare_fn = prepare_qat_fx if qat else prepare_fx
        prepared = prepare_fn(model.train(qat), mapping, example, backend_config=backend_config())
    except Exception as exc:  # noqa: BLE001 - FX raises many types; all mean the model cannot be prepared
        raise UserError(networks.explain_trace_failure(exc, source)) from None
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


def load_prepared(model_dir: Path, prepared_dir: Path) -> torch.fx.GraphModule:
    """Rebuild the prepared (observed or QAT) model of a calibrate / train_qat folder, in eval mode."""
    spec = files.read_json(Path(model_dir) / "model.json")
    info = files.read_json(Path(prepared_dir) / "prepared.json")
    prepared = prepare(networks.load(model_dir), Recipe(**info["recipe"]), info["mode"] == "qat", spec["input_shape"],
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


def load_int8(model_dir: Path, prepared_dir: Path, int8_dir: Path) -> torch.fx.GraphModule:
    """Rebuild the converted int8 model of a convert folder (call inside `quantized_engine`)."""
    int8 = convert(load_prepared(model_dir, prepared_dir))
    int8.load_state_dict(torch.load(Path(int8_dir) / "int8.pt", weights_only=True))
    return int8
