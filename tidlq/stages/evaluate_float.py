"""Stage evaluate_float: accuracy and loss of the float model in torch; float ONNX export checked in onnxruntime.

A float model near chance level (BatchNorm statistics that never converged, weights for another normalisation or
another model) stops the run here: quantizing it would report "drop 0.00, gate passed" on a model that predicts
nothing (`verify.min_float_accuracy`).

Outputs: `float.onnx`, `float_metrics.json`, and `float_val_logits.npy` (the reference for SQNR and agreement).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tidlq.core import files
from tidlq.core.errors import UserError
from tidlq.data.dataset import load_split
from tidlq.eval import metrics
from tidlq.models import networks, training
from tidlq.quant.onnx_export import export_float

if TYPE_CHECKING:
    from tidlq.core.params import ExportParams

# The float ONNX model must reproduce torch's logits to float32 rounding; anything more is an exporter problem.
ONNX_TOLERANCE = 1e-3


def run(export: ExportParams, min_accuracy: float | None, model_dir: Path, data_dir: Path, out: Path) -> dict:
    """Evaluate the float model on val in torch and as ONNX; write the float ONNX model and the reference logits.
    Refuse a model whose accuracy is below `min_accuracy` (None: `chance_threshold`)."""
    net = networks.load(model_dir)
    spec = files.read_json(Path(model_dir) / "model.json")
    x_val, y_val = load_split(data_dir, "val")
    logits = training.predict(net, x_val)
    check_above_chance(training.accuracy(logits, y_val), y_val, min_accuracy, spec)
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


def chance_threshold(labels: np.ndarray) -> tuple[float, float]:
    """(chance, threshold) in percent: chance is what always predicting the most frequent class scores; the default
    threshold is a tenth of the way from there to 100."""
    chance = float(100.0 * np.bincount(labels).max() / max(len(labels), 1))
    return chance, chance + (100.0 - chance) / 10


def check_above_chance(accuracy: float, labels: np.ndarray, min_accuracy: float | None, spec: dict) -> None:
    """Raise UserError when the float accuracy is below `min_accuracy` (None: the default threshold)."""
    chance, threshold = chance_threshold(labels)
    threshold = threshold if min_accuracy is None else min_accuracy
    if accuracy >= threshold:
        return
    if spec.get("weights"):
        check = (f"that model.weights ({spec['weights']}) belong to this model.source and were trained on inputs "
                 "normalised as data.json says (mean/std), that the model's BatchNorm running statistics were "
                 "estimated (its accuracy in eval mode, not only in training), and that model.kwargs give the "
                 "number of classes of this data")
    else:
        check = ("that the float training converged (float_model's model.json history: loss and train accuracy; "
                 "try more float_train.epochs or another float_train.lr), or bring trained model.weights")
    raise UserError(f"the float model {spec['name']!r} reaches only {accuracy:.2f} % accuracy on the val split "
                    f"({len(labels)} images), below {threshold:.2f} % (chance level, always the most frequent class: "
                    f"{chance:.2f} %): quantizing it would measure nothing. Check {check}. To quantize it anyway, "
                    "set verify.min_float_accuracy (0 turns the check off).")
