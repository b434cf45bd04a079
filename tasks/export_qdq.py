"""Stage export_qdq: the int8 model as a QDQ ONNX model TIDL can import with `prequantized_model: 1`.

The TorchScript exporter (`dynamo=False`; the dynamo exporter fails on FX-converted models), opset from params, a
static batch-1 input, constant folding, then onnxslim to fold the Constant/Cast/ConstantOfShape chains the exporter
leaves (TIDL runs interior Casts on the Arm cores), shape inference and `onnx.checker` with full checks.

Outputs: `model_qdq.onnx` and `export.json` (operator counts before and after the cleanup).
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxslim
import torch
from onnx import numpy_helper
from prefect import task

from tasks import cache, files, metrics, qconfig
from tasks.convert import load_int8
from tasks.params import POWER_OF_2_DEVICES, ExportParams

# Leftovers of the exporter that must not survive the cleanup (TIDL accepts Cast only at the graph's ends).
FORBIDDEN_OPS = ("Cast", "Identity", "ConstantOfShape", "Constant")


def run(export: ExportParams, target_device: str, int8_dir: Path, prepared_dir: Path, model_dir: Path,
        out: Path) -> dict:
    """Export the converted int8 model to a clean, checked QDQ ONNX model for `target_device`."""
    spec = files.read_json(Path(model_dir) / "model.json")
    info = files.read_json(Path(prepared_dir) / "prepared.json")
    with qconfig.quantized_engine(info["engine"]):
        int8 = load_int8(model_dir, prepared_dir, int8_dir)
        raw = export_onnx(int8, spec["input_shape"], export.opset)
    model = clean(raw)
    rewritten = 0
    if target_device in POWER_OF_2_DEVICES:
        model, rewritten = symmetric_int8(model)
    leftovers = [f"{n.op_type} {n.name or n.output[0]!r}" for n in model.graph.node if n.op_type in FORBIDDEN_OPS]
    if leftovers:
        raise RuntimeError(f"the QDQ export still has nodes TIDL cannot take inside the graph: {', '.join(leftovers)}")
    onnx.checker.check_model(model, full_check=True)
    for key, value in {"tidlq.qconfig": info["qconfig"], "tidlq.mode": info["mode"],
                       "tidlq.model": spec["name"]}.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    files.write_bytes(out / "model_qdq.onnx", model.SerializeToString())
    result = {
        "opset": export.opset,
        "input_shape": spec["input_shape"],
        "raw_ops": dict(sorted(Counter(n.op_type for n in raw.graph.node).items())),
        "ops": op_counts(model),
        "nodes": len(model.graph.node),
        "uint8_to_int8_zero_points": rewritten,
    }
    files.write_json(out / "export.json", result)
    return result


@task(name="export_qdq", **cache.TASK_OPTIONS)
def export_qdq_task(root: Path, export: ExportParams, target_device: str, int8: cache.Manifest,
                    prepared: cache.Manifest, model: cache.Manifest) -> cache.Manifest:
    """Prefect task: `run` through the stage cache."""
    return cache.build(root, "export_qdq", __name__, [export, target_device, int8, prepared, model],
                       lambda out: run(export, target_device, int8.dir, prepared.dir, model.dir, out))


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
