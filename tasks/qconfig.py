"""The qconfig presets and the FX graph mode steps around them: prepare, rebuild a prepared model, convert.

Presets (params `quant.qconfig`):
- `qnnpack`: torch's qnnpack defaults, the qconfig TI's PyTorch page recommends (per-tensor weights).
- `x86`: torch's x86 defaults (per-channel weights, activations in 7 bits: `reduce_range`).
- `tidl`: TI's WC8_AT8: int8 per-channel symmetric weights, uint8 per-tensor affine activations over the full range,
  histogram calibration for PTQ and moving-average fake-quant for QAT (tidl.md §4).

A prepared model is never pickled: it is rebuilt by running prepare_fx / prepare_qat_fx again on the float model and
loading the saved state_dict (observer statistics, fake-quant parameters, QAT weights).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.ao.quantization import (
    FusedMovingAvgObsFakeQuantize,
    HistogramObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
    get_default_qat_qconfig_mapping,
    get_default_qconfig_mapping,
)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

from tasks import files, models
from tasks.errors import UserError

PRESETS = ("qnnpack", "x86", "tidl")


def qconfig_mapping(preset: str, qat: bool) -> QConfigMapping:
    """The QConfigMapping of a preset, for PTQ (observers) or QAT (fake-quantize modules)."""
    if preset in ("qnnpack", "x86"):
        return get_default_qat_qconfig_mapping(preset) if qat else get_default_qconfig_mapping(preset)
    if preset == "tidl":
        return QConfigMapping().set_global(_tidl_qat_qconfig() if qat else _tidl_ptq_qconfig())
    raise ValueError(f"unknown qconfig preset {preset!r}; expected one of {PRESETS}")


def _tidl_ptq_qconfig() -> QConfig:
    return QConfig(
        activation=HistogramObserver.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                                               reduce_range=False),
        weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    )


def _tidl_qat_qconfig() -> QConfig:
    return QConfig(
        activation=FusedMovingAvgObsFakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
            qscheme=torch.per_tensor_affine, reduce_range=False),
        weight=FusedMovingAvgObsFakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric, ch_axis=0),
    )


def engine_for(preset: str) -> str:
    """The torch quantized engine used to convert and run a preset's int8 model in torch (the cross-check).

    `qnnpack` runs on qnnpack, as TI's page does (its kernels are wrong for Conv+ReLU6 on x86, see measured.md: the
    cross-check then disagrees with onnxruntime and says so). The others run on x86 where it exists.
    """
    supported = torch.backends.quantized.supported_engines
    if preset == "qnnpack" or "x86" not in supported:
        return "qnnpack"
    return "x86"


@contextlib.contextmanager
def quantized_engine(name: str) -> Iterator[None]:
    """Use torch quantized engine `name` inside the block, and quiet torch.ao's deprecation warnings."""
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


def prepare(model: nn.Module, preset: str, qat: bool, input_shape: list[int], source: str) -> torch.fx.GraphModule:
    """prepare_fx (PTQ, eval mode) or prepare_qat_fx (QAT, train mode) on a copy of `model`."""
    model = copy.deepcopy(model)
    example = (torch.zeros(input_shape),)
    mapping = qconfig_mapping(preset, qat)
    try:
        if qat:
            return prepare_qat_fx(model.train(), mapping, example)
        return prepare_fx(model.eval(), mapping, example)
    except Exception as exc:  # noqa: BLE001 - FX raises many types; all mean the model cannot be prepared
        raise UserError(models.explain_trace_failure(exc, source)) from None


def load_prepared(model_dir: Path, prepared_dir: Path) -> torch.fx.GraphModule:
    """Rebuild the prepared (observed or QAT) model of a calibrate / train_qat folder, in eval mode."""
    spec = files.read_json(Path(model_dir) / "model.json")
    info = files.read_json(Path(prepared_dir) / "prepared.json")
    prepared = prepare(models.load(model_dir), info["qconfig"], info["mode"] == "qat", spec["input_shape"],
                       spec["source"])
    prepared.load_state_dict(torch.load(Path(prepared_dir) / "prepared.pt", weights_only=True))
    return prepared.eval()


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """convert_fx on a copy of a prepared model (eval mode)."""
    return convert_fx(copy.deepcopy(prepared).eval())
