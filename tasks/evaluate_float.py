"""Stage evaluate_float: accuracy and loss of the float model in torch; float ONNX export checked in onnxruntime.

Outputs: `float.onnx`, `float_metrics.json`, and `float_val_logits.npy` (the reference for SQNR and agreement).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import torch
from prefect import task

from tasks import cache, files, metrics, models, training
from tasks.params import ExportParams
from tasks.prepare_data import load_split

# The float ONNX model must reproduce torch's logits to float32 rounding; anything more is an exporter problem.
ONNX_TOLERANCE = 1e-3


def run(export: ExportParams, model_dir: Path, data_dir: Path, out: Path) -> dict:
    """Evaluate the float model on val in torch and as ONNX; write the float ONNX model and the reference logits."""
    net = models.load(model_dir)
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


@task(name="evaluate_float", **cache.TASK_OPTIONS)
def evaluate_float_task(root: Path, export: ExportParams, model: cache.Manifest,
                        data: cache.Manifest) -> cache.Manifest:
    """Prefect task: `run` through the stage cache."""
    return cache.build(root, "evaluate_float", __name__, [export, model, data],
                       lambda out: run(export, model.dir, data.dir, out))


def export_float(net: torch.nn.Module, input_shape: list[int], opset: int, path: Path) -> None:
    """Export the float model with a static input shape (TorchScript exporter, as for the QDQ model)."""
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(input_shape),), buffer, dynamo=False, opset_version=opset,
                      input_names=["input"], output_names=["logits"], do_constant_folding=True)
    model = onnx.shape_inference.infer_shapes(onnx.load_from_string(buffer.getvalue()))
    onnx.checker.check_model(model, full_check=True)
    files.write_bytes(path, model.SerializeToString())
