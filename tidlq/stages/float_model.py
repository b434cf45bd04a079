"""Stage float_model: build the float model, load its weights, or train it on the train split when none are given.

Outputs: `float.pt` (state_dict) and `model.json` (how to rebuild it, and how it was obtained).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tidlq.core import files, inputs
from tidlq.data.dataset import load_split
from tidlq.models import networks, training

if TYPE_CHECKING:
    from tidlq.core.params import FloatTrainParams, ModelParams


def run(model: ModelParams, float_train: FloatTrainParams, data_dir: Path, out: Path) -> dict:
    """Build (and train, without weights) the model for the dataset in `data_dir`; write it to `out`."""
    data = files.read_json(Path(data_dir) / "data.json")
    spec = {
        "source": model.source,
        "kwargs": model.kwargs,
        "name": model.display_name,
        "num_classes": data["num_classes"],
        "in_channels": data["input_shape"][1],
        "input_shape": data["input_shape"],
    }
    torch.manual_seed(float_train.seed)
    net = networks.from_spec(spec)
    networks.check_model(net, data["input_shape"], data["num_classes"], model.source)
    history: list[dict] = []
    if model.weights:
        networks.load_weights(net, inputs.resolve(model.weights, "model.weights"))
    else:
        x, y = load_split(data_dir, "train")
        history = training.train(net, x, y, training.Schedule(**float_train.model_dump()), label="float training")
    x_val, y_val = load_split(data_dir, "val")
    spec |= {
        "weights": model.weights,
        "trained": not model.weights,
        "parameters": sum(p.numel() for p in net.parameters()),
        "history": history,
        "val_accuracy": training.accuracy(training.predict(net, x_val), y_val),
    }
    torch.save(net.state_dict(), out / "float.pt")
    files.write_json(out / "model.json", spec)
    return {"name": spec["name"], "trained": spec["trained"], "val_accuracy": spec["val_accuracy"]}
