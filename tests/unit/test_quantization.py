"""calibrate / train_qat / convert / export_qdq / verify_onnx on real data and small models: the QDQ structure TIDL
needs, onnxruntime against torch, and state that survives the trip through files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tests.unit.conftest import quantize
from tidlq.core import files
from tidlq.core.params import (
    QatParams,
    QuantParams,
    VerifyParams,
)
from tidlq.data.dataset import load_split
from tidlq.eval import metrics
from tidlq.models.builtin import MobileNetV2Tiny
from tidlq.quant import fx, onnx_export
from tidlq.stages import verify_onnx


def test_fx_graph_mode_quantization_still_ships() -> None:
    """Fails loudly the day a torch release removes the API this project is built on."""
    from torch.ao.quantization import quantize_fx

    for name in ("prepare_fx", "prepare_qat_fx", "convert_fx"):
        assert callable(getattr(quantize_fx, name))


def test_quantized_models_do_not_outlive_their_stage() -> None:
    """torch 2.13 caches every module prepare_fx / convert_fx sees (functools.cache on torch.ao's
    assert_and_get_unique_device): without `quantized_engine` clearing it, each autopilot recipe would keep its
    models alive for the whole run."""
    import gc
    import weakref

    from tidlq.quant import recipes

    with fx.quantized_engine("qnnpack"):
        prepared = fx.prepare(MobileNetV2Tiny(), recipes.Recipe(), False, [1, 1, 16, 16], "mobilenet_v2_tiny")
        prepared(torch.rand(2, 1, 16, 16))
        int8 = fx.convert(prepared)
        alive = [weakref.ref(prepared), weakref.ref(int8)]
    del prepared, int8
    gc.collect()
    assert [ref() for ref in alive] == [None, None]


def test_float_onnx_matches_torch(base: dict[str, Path]) -> None:
    m = files.read_json(base["float"] / "float_metrics.json")
    assert m["onnx"]["max_abs_diff"] < 1e-4
    assert m["onnx"]["accuracy"] == pytest.approx(m["accuracy"])
    assert m["accuracy"] > 90.0


def qdq_nodes(path: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    model = onnx.load(path)
    return model, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_tidl_preset_qdq_structure(base: dict[str, Path]) -> None:
    out = quantize(base, QuantParams(qconfig="tidl"))
    model, inits = qdq_nodes(out["qdq"] / "model_qdq.onnx")
    ops = onnx_export.op_counts(model)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in torch.nn.Module.modules(
        MobileNetV2Tiny()))
    assert ops["Conv"] == convs  # BN folded into every conv, none lost
    assert ops["Gemm"] == 1
    assert not set(ops) & set(onnx_export.FORBIDDEN_OPS)
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].dtype == np.int8]
    assert len(weights) == convs + 1
    for n in weights:  # int8, symmetric, per-channel along axis 0
        scale, zero = inits[n.input[1]], inits[n.input[2]]
        assert scale.size == inits[n.input[0]].shape[0] > 1
        assert np.all(zero == 0)
        assert next(a.i for a in n.attribute if a.name == "axis") == 0
    activations = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activations and all(inits[n.input[2]].dtype == np.uint8 and inits[n.input[1]].size == 1
                               for n in activations)
    onnx.checker.check_model(model, full_check=True)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 1, 16, 16]
    report = files.read_json(out["verify"] / "verify.json")
    assert report["accuracy_drop"] < 2.0
    assert report["int8"]["sqnr_db"] > 20.0
    assert report["torch_vs_ort"]["agreement"] > 97.0
    assert report["gate"]["passed"]


def test_qnnpack_preset_is_per_tensor(base: dict[str, Path]) -> None:
    out = quantize(base, QuantParams(qconfig="qnnpack"))
    model, inits = qdq_nodes(out["qdq"] / "model_qdq.onnx")
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].dtype == np.int8]
    assert weights and all(inits[n.input[1]].size == 1 for n in weights)
    report = files.read_json(out["verify"] / "verify.json")
    assert report["accuracy_drop"] < 2.0  # the exported QDQ model is right ...
    assert report["torch_int8"]["engine"] == "qnnpack"
    # ... whatever torch's qnnpack kernels say on this CPU; a disagreement is reported, never hidden
    disagree = report["torch_vs_ort"]["agreement"] < verify_onnx.CROSS_CHECK_AGREEMENT
    assert [("qnnpack" in w) for w in report["warnings"]] == ([True] if disagree else [])


def test_onnxruntime_matches_torch_int8(base: dict[str, Path]) -> None:
    out = quantize(base, QuantParams(qconfig="x86"))
    x_val, _ = load_split(base["data"], "val")
    ort_logits = metrics.onnx_logits(out["qdq"] / "model_qdq.onnx", x_val)
    torch_logits = np.load(out["int8"] / "int8_val_logits.npy")
    assert metrics.sqnr_db(torch_logits, ort_logits) > 25.0
    assert metrics.agreement(torch_logits, ort_logits) > 98.0


def test_prepared_state_survives_the_round_trip(base: dict[str, Path]) -> None:
    out = quantize(base, QuantParams(qconfig="tidl", calibration_batches=2))
    x_val, _ = load_split(base["data"], "val")
    with fx.quantized_engine("x86"):
        rebuilt = fx.load_int8(base["model"], out["prepared"], out["int8"])
        logits = metrics.onnx_logits(out["qdq"] / "model_qdq.onnx", x_val[:50])
        again = fx.convert(fx.load_prepared(base["model"], out["prepared"]))
        with torch.no_grad():
            a = rebuilt(torch.from_numpy(x_val[:50])).numpy()
            b = again(torch.from_numpy(x_val[:50])).numpy()
    assert np.array_equal(a, np.load(out["int8"] / "int8_val_logits.npy")[:50])
    assert np.array_equal(a, b)
    assert metrics.agreement(a, logits) > 95.0
    info = files.read_json(out["prepared"] / "prepared.json")
    assert info["calibration_images"] == 64


def test_qat_trains_and_converts(base: dict[str, Path]) -> None:
    out = quantize(base, QuantParams(qconfig="tidl", mode="qat"), QatParams(epochs=2))
    info = files.read_json(out["prepared"] / "prepared.json")
    assert info["mode"] == "qat" and len(info["history"]) == 2
    assert info["freeze_bn_epoch"] == 1 and info["freeze_observer_epoch"] == 2
    assert all(h["val_accuracy"] > 80.0 for h in info["history"])
    report = files.read_json(out["verify"] / "verify.json")
    assert report["int8"]["accuracy"] > 88.0
    assert report["torch_vs_ort"]["agreement"] > 97.0


def test_gate_fails_with_reasons() -> None:
    verify = VerifyParams(max_accuracy_drop=0.1, min_sqnr_db=90.0)
    result = {"accuracy_drop": 0.3, "int8": {"sqnr_db": 31.0}}
    gate = verify_onnx.gate(verify, result)
    assert not gate["passed"]
    assert gate["reasons"] == ["accuracy drop 0.30 points > verify.max_accuracy_drop 0.1",
                               "logit SQNR 31.0 dB < verify.min_sqnr_db 90.0"]
