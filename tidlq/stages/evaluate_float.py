"""Stage evaluate_float: accuracy and loss of the float model in torch; float ONNX export checked in onnxruntime.

Outputs: `float.onnx`, `float_metrics.json`, and `float_val_logits.npy` (the reference for SQNR and agreement).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tidlq.core import files
from tidlq.data.dataset import load_split
from tidlq.eval import metrics
from tidlq.models import networks, training
from tidlq.quant.onnx_export import export_float

if TYPE_CHECKING:
    from tidlq.core.params import ExportParams

# The float ONNX model must reproduce torch's logits to float32 rounding; anything more is an exporter problem.
ONNX_TOLERANCE = 1e-3


def run(export: ExportParams, model_dir: Path, data_dir: Path, out: Path) -> dict:
    """Evaluate the float model on val in torch and as ONNX; write the float ONNX model and the reference logits."""
    net = networks.load(model_dir)
    spec = files.read_json(Path(model_dir) / "model.json")
    x_val, y_val = load_split(data_dir, "val")
    logits = training.predict(net, x_val)
    export_float(net, spec["input_shape"], export.opset, out / "float.onnx")
    onnx_check = metrics.compare(logits, metrics.onnx_logits(out / "float.onnx", x_val), y_val)
    if onnx_check["max_abs_diff"] > ONNX_TOLERANCE * max(1.0, float(np.abs(logits).max())):
        raise RuntimeError(f"the float ONNX export differs from torch by {onnx_check['max_abs_diff']:.3g} "
                           "(exporter problem); the model cannot be checked against it")
    np.save(out / "float_val_logits.npy", logits)
    result = {
        "accuracy": training.accuracy(logits, y_val),
        "loss": training.cross_entropy(logits, y_val),
        "onnx": {"accuracy": onnx_check["accuracy"], "max_abs_diff": onnx_check["max_abs_diff"]},
    }
    files.write_json(out / "float_metrics.json", result)
    return result
