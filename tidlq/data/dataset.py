"""The dataset a prepare_data folder holds: `dataset.npz` (float32 NCHW arrays x_train, y_train, x_calib, y_calib,
x_val, y_val, already normalised) and its content digest; the calibration batches taken from it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

SPLITS = ("train", "calib", "val")


def load_split(dataset_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one split from a prepare_data folder."""
    with np.load(Path(dataset_dir) / "dataset.npz", allow_pickle=False) as z:
        return z[f"x_{name}"], z[f"y_{name}"]


def dataset_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the split arrays' names, dtypes, shapes and bytes (independent of the file container)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def calibration_batches(x: np.ndarray, batch_size: int, batches: int) -> Iterator[np.ndarray]:
    """Up to `batches` consecutive batches of the calib split (fewer when the split is smaller): what PTQ feeds its
    observers, and the onnxruntime baseline its calibrater."""
    for i in range(batches):
        batch = x[i * batch_size:(i + 1) * batch_size]
        if len(batch) == 0:
            return
        yield batch
