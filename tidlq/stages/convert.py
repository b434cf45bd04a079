"""Stage convert: convert_fx on the prepared model; the torch int8 model's accuracy as a cross-check.

Outputs: `int8.pt` (state_dict of the converted model), `convert.json`, and `int8_val_logits.npy` (torch int8 logits
on val, compared with onnxruntime's in verify_onnx).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tidlq.core import files
from tidlq.data.dataset import load_split
from tidlq.models import training
from tidlq.quant import fx


def run(prepared_dir: Path, model_dir: Path, data_dir: Path, out: Path) -> dict:
    """Convert the prepared model to a torch int8 model and evaluate it on val with the preset's engine."""
    info = files.read_json(Path(prepared_dir) / "prepared.json")
    with fx.quantized_engine(info["engine"]):
        int8 = fx.convert(fx.load_prepared(model_dir, prepared_dir))
        x_val, y_val = load_split(data_dir, "val")
        logits = training.predict(int8, x_val)
        torch.save(int8.state_dict(), out / "int8.pt")
    np.save(out / "int8_val_logits.npy", logits)
    result = {"torch_int8": {"accuracy": training.accuracy(logits, y_val), "engine": info["engine"]},
              "qconfig": info["qconfig"], "mode": info["mode"]}
    files.write_json(out / "convert.json", result)
    return result
