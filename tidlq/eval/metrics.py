"""The one verification helper used by the pipeline and by the tests: run an ONNX model in onnxruntime, and compare
logits (accuracy, top-1 agreement, SQNR, largest difference)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


def session(model: Path | bytes) -> ort.InferenceSession:
    """An onnxruntime session on the CPU provider for an ONNX model (a path or serialized bytes); errors only."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


def onnx_logits(model: Path | bytes | ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """Logits of an ONNX model (a path, serialized bytes or a session) with a static batch-1 input, one sample at a
    time."""
    run = model if isinstance(model, ort.InferenceSession) else session(model)
    name = run.get_inputs()[0].name
    return np.concatenate([run.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10 log10(sum ref^2 / sum (ref - test)^2); +inf when identical."""
    noise = float(np.sum((reference.astype(np.float64) - test) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10.0 * float(np.log10(signal / noise))


def agreement(reference: np.ndarray, test: np.ndarray) -> float:
    """Share (in percent) of samples whose top-1 class is the same in both."""
    return float(100.0 * (reference.argmax(1) == test.argmax(1)).mean())


def compare(reference: np.ndarray, test: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy of `test`, its top-1 agreement and SQNR against `reference`, and the largest absolute difference."""
    return {
        "accuracy": float(100.0 * (test.argmax(1) == labels).mean()),
        "agreement": agreement(reference, test),
        "sqnr_db": sqnr_db(reference, test),
        "max_abs_diff": float(np.max(np.abs(reference - test))),
    }


def confusion_matrix(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> list[list[int]]:
    """Counts[true][predicted]."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (labels, logits.argmax(1)), 1)
    return m.tolist()


def numeric_leaves(tree: dict[str, Any]) -> dict[str, float]:
    """Every finite number in a nested dict as a dotted name (booleans as 0/1): metrics for MLflow and DVC."""
    out: dict[str, float] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, bool | int | float) and math.isfinite(float(node)):
            out[prefix] = float(node)

    walk("", tree)
    return out
