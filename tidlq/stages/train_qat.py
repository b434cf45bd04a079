"""Stage train_qat (QAT): prepare_qat_fx with the preset's QConfigMapping, then SGD training with a freeze schedule:
BN statistics freeze after `freeze_bn_epoch` epochs, observers after `freeze_observer_epoch` (TI's recipe).

Outputs: `prepared.pt` (state_dict of the QAT model) and `prepared.json` (preset, mode, engine, per-epoch history).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.ao.nn.intrinsic import qat as nniqat
from torch.ao.quantization import FakeQuantizeBase

from tidlq.core import files
from tidlq.data.dataset import load_split
from tidlq.models import networks, training
from tidlq.quant import fx, recipes

if TYPE_CHECKING:
    from tidlq.core.params import QatParams, QuantParams


def run(quant: QuantParams, qat: QatParams, target_device: str, model_dir: Path, data_dir: Path, out: Path) -> dict:
    """Quantization-aware training of the float model on the train split; val accuracy after each epoch."""
    spec = files.read_json(Path(model_dir) / "model.json")
    recipe = recipes.recipe_for(quant, target_device)
    engine = recipe.spec.engine
    freeze_bn = qat.freeze_bn_epoch if qat.freeze_bn_epoch is not None else max(1, qat.epochs // 2)
    freeze_obs = qat.freeze_observer_epoch if qat.freeze_observer_epoch is not None else qat.epochs // 2 + 1
    with fx.quantized_engine(engine):
        torch.manual_seed(qat.seed)
        prepared = fx.prepare(networks.load(model_dir), recipe, True, spec["input_shape"], spec["source"])
        x, y = load_split(data_dir, "train")
        x_val, y_val = load_split(data_dir, "val")

        def before_epoch(epoch: int) -> None:
            if epoch >= freeze_bn:
                prepared.apply(nniqat.freeze_bn_stats)
            if epoch >= freeze_obs:
                prepared.apply(torch.ao.quantization.disable_observer)

        def after_epoch(epoch: int) -> dict:
            # Evaluate with observers off so that validation data never moves the quantization ranges.
            with observers_paused(prepared):
                return {"val_accuracy": training.accuracy(training.predict(prepared, x_val), y_val)}

        schedule = training.Schedule(epochs=qat.epochs, batch_size=qat.batch_size, lr=qat.lr, momentum=qat.momentum,
                                     weight_decay=qat.weight_decay, seed=qat.seed)
        history = training.train(prepared, x, y, schedule, "QAT", before_epoch, after_epoch)
        torch.save(prepared.state_dict(), out / "prepared.pt")
    info = recipes.recipe_record(recipe, "qat", engine) | {
        "epochs": qat.epochs, "freeze_bn_epoch": freeze_bn, "freeze_observer_epoch": freeze_obs, "history": history}
    files.write_json(out / "prepared.json", info)
    return {k: v for k, v in info.items() if k != "history"} | {"final": history[-1]}


@contextlib.contextmanager
def observers_paused(model: torch.nn.Module) -> Iterator[None]:
    """Disable every fake-quant observer inside the block; restore each one's previous state after it."""
    fake_quants = [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]
    enabled = [bool(m.observer_enabled[0]) for m in fake_quants]
    for m in fake_quants:
        m.disable_observer()
    try:
        yield
    finally:
        for m, was_enabled in zip(fake_quants, enabled, strict=True):
            if was_enabled:
                m.enable_observer()
