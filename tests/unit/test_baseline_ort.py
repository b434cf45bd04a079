"""baseline_ort on real data and a small trained model: onnxruntime's quantize_static with each calibration method,
fed our PTQ's calibration images, scored on val against float; the best model written as TIDL-typed QDQ ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.unit.conftest import stage
from tidlq.core import files
from tidlq.core.params import QuantParams
from tidlq.data.dataset import load_split
from tidlq.eval import metrics
from tidlq.models import training
from tidlq.stages import baseline_ort

# Three quantized variants of a ~95-99 % model on ~360 val images: each may lose a few images, not more.
MAX_DROP = 3.0
MIN_SQNR_DB = 15.0
QUANT = QuantParams()


@pytest.fixture(scope="module")
def baseline(base: dict[str, Path]) -> Path:
    return stage(base["tmp"], "baseline", baseline_ort.run, QUANT.batch_size, QUANT.calibration_batches, base["float"],
                 base["data"])


def float_accuracy(base: dict[str, Path]) -> float:
    _, y_val = load_split(base["data"], "val")
    return training.accuracy(np.load(base["float"] / "float_val_logits.npy"), y_val)


def test_every_method_is_close_to_float(base: dict[str, Path], baseline: Path) -> None:
    result = files.read_json(baseline / "baseline.json")
    reference = float_accuracy(base)
    assert 90.0 <= reference <= 100.0  # the case is what the thresholds below assume
    assert result["float"]["accuracy"] == pytest.approx(reference)
    assert set(result["methods"]) == {"MinMax", "Entropy", "Percentile"}
    for name, m in result["methods"].items():
        assert abs(m["accuracy"] - reference) <= MAX_DROP, name
        assert m["accuracy_drop"] == pytest.approx(reference - m["accuracy"]), name
        assert m["sqnr_db"] > MIN_SQNR_DB, name
        assert m["agreement"] >= 100.0 - MAX_DROP, name


def test_best_is_the_highest_sqnr_and_the_written_model(base: dict[str, Path], baseline: Path) -> None:
    result = files.read_json(baseline / "baseline.json")
    methods = result["methods"]
    assert methods[result["best"]]["sqnr_db"] == max(m["sqnr_db"] for m in methods.values())
    for key in ("accuracy", "agreement", "sqnr_db", "accuracy_drop"):
        assert result[key] == methods[result["best"]][key]
    x_val, y_val = load_split(base["data"], "val")
    float_logits = np.load(base["float"] / "float_val_logits.npy")
    rescored = metrics.compare(float_logits, metrics.onnx_logits(baseline / "model_ort_qdq.onnx", x_val), y_val)
    assert rescored["sqnr_db"] == pytest.approx(result["sqnr_db"])
    assert rescored["accuracy"] == pytest.approx(result["accuracy"])


def test_entropy_with_onnxruntime_defaults_is_minmax(baseline: Path) -> None:
    """onnxruntime 1.32's Entropy calibrator histograms into 128 bins and searches 128 quantized bins: one candidate,
    the full range, i.e. MinMax (quantize_static cannot change num_bins). If this fails, onnxruntime changed its
    Entropy calibration and the baseline's meaning with it: re-read calibrate.py before updating the test."""
    methods = files.read_json(baseline / "baseline.json")["methods"]
    for key in ("accuracy", "agreement", "sqnr_db"):
        assert methods["Entropy"][key] == methods["MinMax"][key]


def test_calibration_uses_our_ptq_images(base: dict[str, Path], baseline: Path) -> None:
    x_calib, _ = load_split(base["data"], "calib")
    quant = QuantParams()
    expected = min(len(x_calib), quant.calibration_batches * quant.batch_size)
    assert files.read_json(baseline / "baseline.json")["calibration_images"] == expected
    images = baseline_ort.calibration_images(quant.batch_size, quant.calibration_batches, base["data"])
    np.testing.assert_array_equal(images, x_calib[:expected])
    # 4 batches of 100: more than the split holds, so all of it
    np.testing.assert_array_equal(baseline_ort.calibration_images(100, 4, base["data"]), x_calib)


def test_reader_feeds_one_image_at_a_time() -> None:
    images = np.arange(5 * 4, dtype=np.float32).reshape(5, 1, 2, 2)
    fed = list(baseline_ort.CalibrationImages("input", images))
    assert len(fed) == 5
    assert all(set(f) == {"input"} and f["input"].shape == (1, 1, 2, 2) for f in fed)
    np.testing.assert_array_equal(np.concatenate([f["input"] for f in fed]), images)
    reader = baseline_ort.CalibrationImages("input", images)
    reader.set_range(1, 3)
    assert [float(f["input"][0, 0, 0, 0]) for f in reader] == [4.0, 8.0]


def test_written_model_is_tidl_typed_qdq(baseline: Path) -> None:
    model = onnx.load(baseline / "model_ort_qdq.onnx")
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    inits = {i.name: i for i in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    weighted = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert weighted
    for node in weighted:
        dq = producer[node.input[1]]
        assert dq.op_type == "DequantizeLinear", node.name
        weight, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert weight.data_type == onnx.TensorProto.INT8, node.name
        if node.op_type == "Conv":  # per-channel: one scale per output channel
            assert list(scale.dims) == [weight.dims[0]], node.name
    activation_zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activation_zero_points
    assert all(z.data_type == onnx.TensorProto.UINT8 for z in activation_zero_points)


def test_same_inputs_give_the_same_files(base: dict[str, Path], baseline: Path) -> None:
    again = base["tmp"] / "baseline_again"
    again.mkdir()
    baseline_ort.run(QUANT.batch_size, QUANT.calibration_batches, base["float"], base["data"], again)
    for name in ("model_ort_qdq.onnx", "baseline.json"):
        assert files.sha256_file(again / name) == files.sha256_file(baseline / name)


def test_pick_best_breaks_ties_by_accuracy_then_order() -> None:
    methods = {"MinMax": {"sqnr_db": 30.0, "accuracy": 97.0}, "Entropy": {"sqnr_db": 30.0, "accuracy": 98.0},
               "Percentile": {"sqnr_db": 29.0, "accuracy": 99.0}}
    assert baseline_ort.pick_best(methods) == "Entropy"
    methods["Entropy"]["accuracy"] = 97.0
    assert baseline_ort.pick_best(methods) == "MinMax"
    methods["Percentile"]["sqnr_db"] = 31.0
    assert baseline_ort.pick_best(methods) == "Percentile"
