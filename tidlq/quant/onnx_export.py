"""ONNX export with the TorchScript exporter (`dynamo=False`: the dynamo exporter fails on FX-converted models), a
static batch-1 input and constant folding, for the float and the int8 model; the cleanup of the int8 export
(onnxslim folds the Constant/Cast/ConstantOfShape chains the exporter leaves; TIDL runs interior Casts on the Arm
cores); and the int8 symmetric form TDA4VM's TIDL takes."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxslim
import torch
from onnx import numpy_helper

from tidlq.core import files
from tidlq.eval import metrics

# Leftovers of the exporter that must not survive the cleanup (TIDL accepts Cast only at the graph's ends).
FORBIDDEN_OPS = ("Cast", "Identity", "ConstantOfShape", "Constant")


def export_float(net: torch.nn.Module, input_shape: list[int], opset: int, path: Path) -> None:
    """Export the float model with a static input shape (TorchScript exporter, as for the QDQ model)."""
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(input_shape),), buffer, dynamo=False, opset_version=opset,
                      input_names=["input"], output_names=["logits"], do_constant_folding=True)
    model = onnx.shape_inference.infer_shapes(onnx.load_from_string(buffer.getvalue()))
    onnx.checker.check_model(model, full_check=True)
    files.write_bytes(path, model.SerializeToString())


def export_onnx(int8: torch.nn.Module, input_shape: list[int], opset: int) -> onnx.ModelProto:
    """torch.onnx.export with the TorchScript exporter, static shape, constant folding."""
    buffer = io.BytesIO()
    torch.onnx.export(int8, (torch.zeros(input_shape),), buffer, dynamo=False, opset_version=opset,
                      input_names=["input"], output_names=["logits"], do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def clean(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants and remove Cast/Identity leftovers (onnxslim), then infer every shape."""
    slim = onnxslim.slim(model)
    return onnx.shape_inference.infer_shapes(slim, check_type=True, strict_mode=True, data_prop=True)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Number of nodes per operator type, sorted by name."""
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def symmetric_int8(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite every uint8 Q/DQ with zero point 128 as int8 with zero point 0: the same real values (q - 128), but
    symmetric in the form TDA4VM's TIDL takes. Checked: the rewritten model's outputs equal the original's exactly.
    Returns the model and the number of zero-point tensors rewritten."""
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    inits = {t.name: t for t in rewritten.graph.initializer}
    names = {n.input[2] for n in rewritten.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
             and len(n.input) > 2 and n.input[2] in inits}
    changed = 0
    for name in names:
        zero = numpy_helper.to_array(inits[name])
        if zero.dtype == np.uint8 and np.all(zero == 128):
            inits[name].CopyFrom(numpy_helper.from_array(np.zeros(zero.shape, dtype=np.int8), name))
            changed += 1
    if changed:
        del rewritten.graph.value_info[:]  # inferred uint8 types of the rewritten tensors are stale
        rewritten = onnx.shape_inference.infer_shapes(rewritten, check_type=True, strict_mode=True, data_prop=True)
        _check_same_outputs(model, rewritten)
    return rewritten, changed


def _check_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    shape = [d.dim_value for d in a.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal([8, *shape[1:]]).astype(np.float32)
    before, after = (metrics.onnx_logits(m.SerializeToString(), x) for m in (a, b))
    if not np.array_equal(before, after):
        raise RuntimeError("rewriting uint8 zero point 128 as int8 zero point 0 changed the model's outputs")
