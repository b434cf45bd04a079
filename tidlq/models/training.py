"""The training loop shared by float training and QAT, and batched evaluation. Seeded and deterministic on CPU."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn


@dataclass(frozen=True)
class Schedule:
    """SGD with momentum and a cosine learning-rate decay over all steps."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    seed: int


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, schedule: Schedule, label: str,
          before_epoch: Callable[[int], None] | None = None,
          after_epoch: Callable[[int], dict] | None = None) -> list[dict]:
    """Train `model` in place; return one record per epoch: loss, train accuracy, and what `after_epoch` adds."""
    torch.manual_seed(schedule.seed)
    gen = torch.Generator().manual_seed(schedule.seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps_per_epoch = (len(xt) + schedule.batch_size - 1) // schedule.batch_size
    opt = torch.optim.SGD(model.parameters(), lr=schedule.lr, momentum=schedule.momentum,
                          weight_decay=schedule.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=schedule.epochs * steps_per_epoch)
    history = []
    with _progress() as progress:
        bar = progress.add_task(label, total=schedule.epochs * steps_per_epoch)
        for epoch in range(schedule.epochs):
            if before_epoch is not None:
                before_epoch(epoch)
            model.train()
            total_loss, correct = 0.0, 0
            for idx in torch.randperm(len(xt), generator=gen).split(schedule.batch_size):
                logits = model(xt[idx])
                loss = F.cross_entropy(logits, yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total_loss += loss.item() * len(idx)
                correct += int((logits.argmax(1) == yt[idx]).sum())
                progress.advance(bar)
            record = {"epoch": epoch + 1, "loss": total_loss / len(xt), "train_accuracy": 100.0 * correct / len(xt)}
            if after_epoch is not None:
                record.update(after_epoch(epoch))
            progress.update(bar, description=f"{label} epoch {epoch + 1}/{schedule.epochs} loss {record['loss']:.3f}")
            history.append(record)
    model.eval()
    return history


def predict(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of `model` (eval mode, no grad) on `x`, batched."""
    model.eval()
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i:i + batch_size])).numpy()
                               for i in range(0, len(x), batch_size)])


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float(100.0 * (logits.argmax(1) == labels).mean())


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy loss of logits against integer labels."""
    return float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=False)
