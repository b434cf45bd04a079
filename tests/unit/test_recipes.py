"""The quantization recipe: device presets (power-of-2 symmetric for TDA4VM), calibration observers, bias
correction; checked in the exported QDQ model, scale by scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tests.unit.conftest import quantize
from tidlq.core import files
from tidlq.core.params import QatParams, QuantParams
from tidlq.quant import bias_correction, fx, observers, recipes
from tidlq.tidl import lint


def scales_and_zeros(path: Path) -> list[tuple[str, np.ndarray, np.ndarray, bool]]:
    """(node, scale, zero point, is a weight) of every Q/DQ of the model, int32 bias DQs left out."""
    model = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            weight = node.op_type == "DequantizeLinear" and node.input[0] in inits
            if weight and inits[node.input[0]].dtype == np.int32:
                continue
            out.append((node.name, inits[node.input[1]], inits[node.input[2]], weight))
    return out


@pytest.mark.parametrize(("mode", "device"), [("ptq", "tda4vm"), ("qat", "tda4vm"), ("ptq", "am68pa")])
def test_mmav1_preset_is_power_of_two_and_symmetric(base: dict[str, Path], mode: str, device: str) -> None:
    qat = QatParams(epochs=1) if mode == "qat" else None
    out = quantize(base, QuantParams(qconfig="tidl", mode=mode), qat, device=device)
    found = scales_and_zeros(out["qdq"] / "model_qdq.onnx")
    assert len(found) > 50
    for name, scale, zero, weight in found:
        log2 = np.log2(scale.astype(np.float64))
        assert np.array_equal(log2, np.round(log2)), (name, scale)
        assert np.all(zero == 0), (name, zero)
        assert zero.dtype == (np.int8 if weight else zero.dtype)
    activations = [z for _, _, z, w in found if not w]
    signed = sum(z.dtype == np.int8 for z in activations)
    assert signed > 0 and signed + sum(z.dtype == np.uint8 for z in activations) == len(activations)
    assert files.read_json(out["qdq"] / "export.json")["uint8_to_int8_zero_points"] > 0
    report = files.read_json(out["verify"] / "verify.json")
    assert report["accuracy_drop"] <= 1.5
    model = onnx.load(out["qdq"] / "model_qdq.onnx")
    assert lint.summarize(lint.check(model, device))["reject"] == 0


@pytest.mark.parametrize("device", ["am62a", "am67a", "am68a", "am69a"])
def test_mmav2_preset_is_asymmetric_per_channel(base: dict[str, Path], device: str) -> None:
    out = quantize(base, QuantParams(qconfig="tidl"), device=device)
    found = scales_and_zeros(out["qdq"] / "model_qdq.onnx")
    weights = [(s, z) for _, s, z, w in found if w]
    assert all(s.size > 1 and np.all(z == 0) and z.dtype == np.int8 for s, z in weights)
    activations = [z for _, _, z, w in found if not w]
    assert all(z.dtype == np.uint8 for z in activations)
    assert len({int(z) for z in activations}) > 3  # affine: zero points follow each tensor's range
    non_p2 = [s for _, s, _, _ in found if not np.allclose(np.log2(s), np.round(np.log2(s)))]
    assert non_p2
    assert files.read_json(out["verify"] / "verify.json")["accuracy_drop"] <= 1.0


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile"])
def test_each_observer_calibrates_a_working_model(base: dict[str, Path], observer: str) -> None:
    out = quantize(base, QuantParams(observer=observer, calibration_batches=4))
    info = files.read_json(out["prepared"] / "prepared.json")
    assert info["recipe"]["observer"] == observer
    report = files.read_json(out["verify"] / "verify.json")
    assert report["accuracy_drop"] < 2.0
    assert report["int8"]["sqnr_db"] > 20.0


def test_percentile_observer_clips_outliers() -> None:
    x = torch.cat([torch.linspace(-1, 1, 100_000), torch.tensor([50.0])])
    plain = torch.ao.quantization.HistogramObserver(reduce_range=False)
    minmax = torch.ao.quantization.MinMaxObserver()
    clipped = observers.PercentileObserver(percentile=99.9)
    for observer in (plain, minmax, clipped):
        observer(x)
    clip_scale = float(clipped.calculate_qparams()[0])
    assert clip_scale < float(minmax.calculate_qparams()[0]) / 10  # 50 is ignored, [-1, 1] is kept
    assert clip_scale == pytest.approx(2.0 / 255, rel=0.05)


def test_percentile_observer_takes_the_percentile_of_magnitudes_over_batches() -> None:
    """As onnxruntime's and TensorRT's percentile calibration: the 99.9th percentile of |x| over all batches (later
    batches widen the range, which re-bins the earlier ones), clamped to the observed min and max."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(50_000, generator=gen) * sigma for sigma in (0.5, 1.0, 2.0)]
    observer = observers.PercentileObserver(percentile=99.9)
    for batch in batches:
        observer(batch)
    expected = float(np.percentile(torch.cat(batches).abs().numpy(), 99.9))
    scale, zero = observer.calculate_qparams()
    bin_width = float(observer.magnitude) / observer.bins
    assert float(scale) * 255 / 2 == pytest.approx(expected, abs=bin_width)  # [-threshold, threshold]
    assert int(zero) == 128
    relu = observers.PercentileObserver(percentile=99.99)
    relu(torch.rand(10_000, generator=gen) * 3)  # never negative: [0, threshold], zero point 0
    assert int(relu.calculate_qparams()[1]) == 0


def test_power_of_two_rounds_scales_up() -> None:
    observer = observers.PowerOf2MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    observer(torch.tensor([0.0, 3.0]))
    scale, zero = observer.calculate_qparams()
    assert float(scale) == 2.0 ** -6 and int(zero) == 0  # 3/255 = 0.0118 -> 1/64
    observer(torch.tensor([-5.0]))
    scale, zero = observer.calculate_qparams()
    assert float(scale) == 2.0 ** -4 and int(zero) == 128  # 5/127.5 = 0.039 -> 1/16, now signed
    weights = observers.PowerOf2PerChannelMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    weights(torch.tensor([[0.5, -1.0], [0.1, 0.05]]))
    scale, zero = weights.calculate_qparams()
    assert scale.tolist() == [2.0 ** -6, 2.0 ** -10] and zero.tolist() == [0, 0]


def test_bias_correction_shrinks_the_mean_output_error(base: dict[str, Path]) -> None:
    plain = quantize(base, QuantParams(calibration_batches=4))
    corrected = quantize(base, QuantParams(calibration_batches=4, bias_correction=True))
    shifts = files.read_json(corrected["prepared"] / "prepared.json")["bias_correction"]
    assert len(shifts) >= 5 and all(v > 0 for v in shifts.values())
    with fx.quantized_engine(recipes.measuring_engine()):
        errors = _mean_abs_channel_errors(base, plain["prepared"], corrected["prepared"], list(shifts))
    assert errors["corrected"] < errors["plain"] * 0.5  # measured on val images, not the calibration ones
    a, b = (files.read_json(o["verify"] / "verify.json") for o in (plain, corrected))
    assert b["accuracy_drop"] <= a["accuracy_drop"] + 0.6  # no worse than one val image in 180


def _mean_abs_channel_errors(base: dict[str, Path], plain: Path, corrected: Path, names: list[str]) -> dict:
    """Mean |float - int8| per channel of the corrected layers on val images, for both models; the float reference
    is the uncorrected float model."""
    from tidlq.data.dataset import load_split

    batches = [load_split(base["data"], "val")[0][:128]]
    reference = fx.load_prepared(base["model"], plain)
    ranges = bias_correction._output_ranges(reference, names)
    float_means = bias_correction._channel_means(reference, names, batches, ranges)
    errors = {}
    for tag, folder in (("plain", plain), ("corrected", corrected)):
        int8_means = bias_correction._channel_means(fx.convert(fx.load_prepared(base["model"], folder)), names,
                                              batches)
        errors[tag] = float(np.mean([float((float_means[n] - int8_means[n]).abs().mean()) for n in names]))
    return errors
