"""Stage baseline_ort: the peer baseline every run reports beside its own numbers.

What it measures: how well onnxruntime's own static quantizer (`onnxruntime.quantization.quantize_static`) does on
the same float model, fed the same calibration images as our PTQ (`tidlq.data.dataset.calibration_batches`), in the data
types TIDL takes (QDQ format, per-channel QInt8 weights, QUInt8 activations), once per calibration method (MinMax,
Entropy, Percentile). Each quantized model is scored on the val split exactly as verify_onnx scores ours (accuracy,
top-1 agreement and logit SQNR against the torch float logits), and the method with the highest SQNR is the baseline.

Why: a drop of 0.5 points means little on its own. Beside the best that the reference ONNX quantizer reaches with
no tuning, it says whether the torch.ao FX recipe is at least as good as the obvious alternative on this model.

Outputs: `baseline.json` (every method's numbers, the best one, and its numbers at the top level) and
`model_ort_qdq.onnx` (the best method's model). Both are deterministic (byte for byte) for the same inputs.

Measured on onnxruntime 1.32: with the defaults quantize_static uses (128 histogram bins, 128 quantized bins, and no
way to change them through it), Entropy has a single candidate range, the full one, and gives MinMax's model byte for
byte. Percentile (99.999 %, symmetric |x| histogram clamped to the observed min/max) is the one that differs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from tidlq.core import files
from tidlq.data.dataset import calibration_batches, load_split
from tidlq.eval import metrics
from tidlq.models import training

# The methods compared, in the order reported; exact ties go to the earlier one.
METHODS = {
    "MinMax": CalibrationMethod.MinMax,
    "Entropy": CalibrationMethod.Entropy,
    "Percentile": CalibrationMethod.Percentile,
}
# The recipe held fixed across methods: what TIDL imports (per-channel symmetric int8 weights, uint8 activations).
SETTINGS = {"quant_format": "QDQ", "per_channel": True, "activation_type": "QUInt8", "weight_type": "QInt8",
            "reduce_range": False}


class CalibrationImages(CalibrationDataReader):
    """Feeds calibration images to onnxruntime one at a time (the float model's input is static, batch 1)."""

    def __init__(self, input_name: str, images: np.ndarray) -> None:
        self.input_name = input_name
        self.images = images
        self.start, self.end = 0, len(images)
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next image as an input feed, or None when all have been fed."""
        if self.start + self.position >= self.end:
            return None
        i = self.start + self.position
        self.position += 1
        return {self.input_name: self.images[i:i + 1]}

    def __len__(self) -> int:
        return len(self.images)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Restrict the feed to images [start_index, end_index) (onnxruntime's CalibStridedMinMax uses it)."""
        self.start, self.end, self.position = start_index, min(end_index, len(self.images)), 0


def run(batch_size: int, batches: int, float_dir: Path, data_dir: Path, out: Path) -> dict:
    """Quantize the float ONNX model with each onnxruntime calibration method, score each on val, keep the best.
    `batch_size` and `batches` (quant.batch_size, quant.calibration_batches) say which calib images our PTQ feeds
    its observers: the same ones are fed here."""
    images = calibration_images(batch_size, batches, data_dir)
    x_val, y_val = load_split(data_dir, "val")
    float_logits = np.load(Path(float_dir) / "float_val_logits.npy", allow_pickle=False)
    float_accuracy = training.accuracy(float_logits, y_val)
    with tempfile.TemporaryDirectory(prefix="tidlq-baseline-ort-") as tmp:
        prepared = Path(tmp) / "float_preprocessed.onnx"
        quant_pre_process(Path(float_dir) / "float.onnx", prepared)
        input_name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
        methods = {}
        for name, method in METHODS.items():
            model_path = Path(tmp) / f"{name}.onnx"
            quantize(prepared, model_path, CalibrationImages(input_name, images), method)
            methods[name] = score(model_path, x_val, y_val, float_logits, float_accuracy)
        best = pick_best(methods)
        files.write_bytes(out / "model_ort_qdq.onnx", (Path(tmp) / f"{best}.onnx").read_bytes())
    result = {"methods": methods, "best": best, **methods[best], "float": {"accuracy": float_accuracy},
              "calibration_images": int(len(images)), "val_images": int(len(y_val)), "settings": SETTINGS}
    files.write_json(out / "baseline.json", result)
    return {k: result[k] for k in ("best", "accuracy", "agreement", "sqnr_db", "accuracy_drop", "calibration_images")}


def calibration_images(batch_size: int, count: int, data_dir: Path) -> np.ndarray:
    """The calib-split images our PTQ feeds its observers: the same `count` batches, concatenated."""
    x, _ = load_split(data_dir, "calib")
    batches = list(calibration_batches(x, batch_size, count))
    if not batches:
        raise ValueError(f"the calib split in {data_dir} is empty; there is nothing to calibrate on")
    return np.concatenate(batches)


def quantize(float_path: Path, out_path: Path, reader: CalibrationImages, method: CalibrationMethod) -> None:
    """Quantize a pre-processed float model with one calibration method and TIDL's data types."""
    quantize_static(float_path, out_path, reader, quant_format=QuantFormat.QDQ,
                    per_channel=SETTINGS["per_channel"], reduce_range=SETTINGS["reduce_range"],
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method)


def score(model_path: Path, x_val: np.ndarray, y_val: np.ndarray, float_logits: np.ndarray,
          float_accuracy: float) -> dict[str, float]:
    """Accuracy, agreement and SQNR of a quantized model on val in onnxruntime, and its drop from float (points)."""
    measured = metrics.compare(float_logits, metrics.onnx_logits(model_path, x_val), y_val)
    numbers = {k: measured[k] for k in ("accuracy", "agreement", "sqnr_db")}
    return numbers | {"accuracy_drop": float_accuracy - numbers["accuracy"]}


def pick_best(methods: dict[str, dict[str, float]]) -> str:
    """The method with the highest logit SQNR; ties go to the higher accuracy, then to the earlier method."""
    return max(methods, key=lambda name: (methods[name]["sqnr_db"], methods[name]["accuracy"]))
