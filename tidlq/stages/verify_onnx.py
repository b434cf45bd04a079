"""Stage verify_onnx: the QDQ model in onnxruntime on the val split, against float, and the quality gate.

The accuracy that counts is the QDQ model's in onnxruntime (it is the file TIDL imports); the torch int8 model is a
cross-check, and a disagreement between the two is reported, never hidden (measured.md: qnnpack kernels on x86).

Outputs: `verify.json` (metrics, gate, warnings, confusion matrix) and `int8_val_logits.npy` (onnxruntime logits).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from tidlq.core import files
from tidlq.core.errors import UserError
from tidlq.data.dataset import load_split
from tidlq.eval import metrics
from tidlq.models import training

if TYPE_CHECKING:
    from tidlq.core.params import VerifyParams

# Below this top-1 agreement (percent) between torch int8 and onnxruntime the run carries a warning.
CROSS_CHECK_AGREEMENT = 99.0


def run(verify: VerifyParams, qdq_dir: Path, float_dir: Path, int8_dir: Path, data_dir: Path, out: Path) -> dict:
    """Measure the QDQ model on val and apply the gate; the result is written even when the gate fails."""
    x_val, y_val = load_split(data_dir, "val")
    float_logits = np.load(Path(float_dir) / "float_val_logits.npy", allow_pickle=False)
    torch_logits = np.load(Path(int8_dir) / "int8_val_logits.npy", allow_pickle=False)
    ort_logits = metrics.onnx_logits(loadable(Path(qdq_dir) / "model_qdq.onnx"), x_val)
    int8 = metrics.compare(float_logits, ort_logits, y_val)
    float_accuracy = training.accuracy(float_logits, y_val)
    convert = files.read_json(Path(int8_dir) / "convert.json")
    result = {
        "float": {"accuracy": float_accuracy},
        "int8": {k: int8[k] for k in ("accuracy", "agreement", "sqnr_db")},
        "accuracy_drop": float_accuracy - int8["accuracy"],
        "torch_int8": {"accuracy": training.accuracy(torch_logits, y_val), "engine": convert["torch_int8"]["engine"]},
        "torch_vs_ort": {"agreement": metrics.agreement(torch_logits, ort_logits),
                         "sqnr_db": metrics.sqnr_db(ort_logits, torch_logits)},
        "val_images": int(len(y_val)),
        "confusion_matrix": metrics.confusion_matrix(ort_logits, y_val, float_logits.shape[1]),
    }
    result["gate"] = gate(verify, result)
    result["warnings"] = cross_check_warnings(result)
    np.save(out / "int8_val_logits.npy", ort_logits)
    files.write_json(out / "verify.json", result)
    return {"gate": result["gate"], "int8": result["int8"], "accuracy_drop": result["accuracy_drop"]}


def loadable(path: Path) -> ort.InferenceSession:
    """An onnxruntime session of the ONNX model at `path`; a UserError naming the file when it cannot be loaded."""
    try:
        return metrics.session(path)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types (InvalidProtobuf, Fail, InvalidGraph)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} cannot be loaded by onnxruntime ({reason}). It is the export_qdq stage's output: "
                        "rebuild it (`dvc repro export_qdq`, or delete the folder and run again).") from None


def gate(verify: VerifyParams, result: dict) -> dict:
    """Pass when the accuracy drop and the logit SQNR are within the params' bounds; say why when not."""
    reasons = []
    if result["accuracy_drop"] > verify.max_accuracy_drop:
        reasons.append(f"accuracy drop {result['accuracy_drop']:.2f} points > verify.max_accuracy_drop "
                       f"{verify.max_accuracy_drop}")
    if result["int8"]["sqnr_db"] < verify.min_sqnr_db:
        reasons.append(f"logit SQNR {result['int8']['sqnr_db']:.1f} dB < verify.min_sqnr_db {verify.min_sqnr_db}")
    return {"passed": not reasons, "reasons": reasons, "max_accuracy_drop": verify.max_accuracy_drop,
            "min_sqnr_db": verify.min_sqnr_db}


def cross_check_warnings(result: dict) -> list[str]:
    """A warning when the torch int8 model and the QDQ model in onnxruntime disagree."""
    agree = result["torch_vs_ort"]["agreement"]
    if agree >= CROSS_CHECK_AGREEMENT:
        return []
    engine = result["torch_int8"]["engine"]
    known = ""
    if engine == "qnnpack":
        known = (" torch's qnnpack kernels are known to compute Conv+ReLU6 wrongly on x86 CPUs; the QDQ model in "
                 "onnxruntime is what TIDL imports, and its numbers are the ones that count.")
    return [f"torch int8 ({engine} engine, {result['torch_int8']['accuracy']:.2f} %) agrees with the QDQ model in "
            f"onnxruntime ({result['int8']['accuracy']:.2f} %) on only {agree:.1f} % of val images.{known}"]
