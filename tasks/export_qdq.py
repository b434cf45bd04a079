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

import onnx
import onnxslim
import torch
from prefect import task

from tasks import cache, files, qconfig
from tasks.convert import load_int8
from tasks.params import ExportParams

# Leftovers of the exporter that must not survive the cleanup (TIDL accepts Cast only at the graph's ends).
FORBIDDEN_OPS = ("Cast", "Identity", "ConstantOfShape", "Constant")


def run(export: ExportParams, int8_dir: Path, prepared_dir: Path, model_dir: Path, out: Path) -> dict:
    """Export the converted int8 model to a clean, checked QDQ ONNX model."""
    spec = files.read_json(Path(model_dir) / "model.json")
    info = files.read_json(Path(prepared_dir) / "prepared.json")
    with qconfig.quantized_engine(info["engine"]):
        int8 = load_int8(model_dir, prepared_dir, int8_dir)
        raw = export_onnx(int8, spec["input_shape"], export.opset)
    model = clean(raw)
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
    }
    files.write_json(out / "export.json", result)
    return result


@task(name="export_qdq", **cache.TASK_OPTIONS)
def export_qdq_task(root: Path, export: ExportParams, int8: cache.Manifest, prepared: cache.Manifest,
                    model: cache.Manifest) -> cache.Manifest:
    """Prefect task: `run` through the stage cache."""
    return cache.build(root, "export_qdq", __name__, [export, int8, prepared, model],
                       lambda out: run(export, int8.dir, prepared.dir, model.dir, out))


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
