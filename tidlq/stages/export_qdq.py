"""Stage export_qdq: the int8 model as a QDQ ONNX model TIDL can import with `prequantized_model: 1`.

The TorchScript exporter, opset from params, a static batch-1 input, constant folding, then the cleanup, shape
inference and `onnx.checker` with full checks (`tidlq.quant.onnx_export`); for devices that take only symmetric
scales, uint8 zero point 128 rewritten as int8 zero point 0.

Outputs: `model_qdq.onnx` and `export.json` (operator counts before and after the cleanup).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from tidlq.core import files
from tidlq.quant import fx, onnx_export
from tidlq.tidl.devices import device

if TYPE_CHECKING:
    from tidlq.core.params import ExportParams


def run(export: ExportParams, target_device: str, int8_dir: Path, prepared_dir: Path, model_dir: Path,
        out: Path) -> dict:
    """Export the converted int8 model to a clean, checked QDQ ONNX model for `target_device`."""
    spec = files.read_json(Path(model_dir) / "model.json")
    info = files.read_json(Path(prepared_dir) / "prepared.json")
    with fx.quantized_engine(info["engine"]):
        int8 = fx.load_int8(model_dir, prepared_dir, int8_dir)
        raw = onnx_export.export_onnx(int8, spec["input_shape"], export.opset)
    model = onnx_export.clean(raw)
    rewritten = 0
    if device(target_device).power_of_2:
        model, rewritten = onnx_export.symmetric_int8(model)
    leftovers = [f"{n.op_type} {n.name or n.output[0]!r}" for n in model.graph.node
                 if n.op_type in onnx_export.FORBIDDEN_OPS]
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
        "ops": onnx_export.op_counts(model),
        "nodes": len(model.graph.node),
        "uint8_to_int8_zero_points": rewritten,
    }
    files.write_json(out / "export.json", result)
    return result
