"""Stage prepare_data: load images, resize, split (seeded, stratified) into train / calib / val, normalise, hash.

Outputs: `dataset.npz` (float32 NCHW arrays x_train, y_train, x_calib, y_calib, x_val, y_val, already normalised)
and `data.json` (digest, shapes, classes, the normalisation a deployed model must apply to its input).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tidlq.core import files
from tidlq.core.errors import UserError
from tidlq.data.dataset import SPLITS, dataset_digest
from tidlq.data.sources import load_source, resize, split

if TYPE_CHECKING:
    from tidlq.core.params import DataParams


def run(data: DataParams, out: Path) -> dict:
    """Build the dataset described by `data` into folder `out`; return the facts written to data.json."""
    x, y, classes, origin = load_source(data)
    if not np.isfinite(x).all():
        raise UserError(f"data.source {data.source!r}: the images contain NaN or infinite values. Clean the data.")
    x = resize(x, data.image_size)
    if data.channels is not None and x.shape[1] != data.channels:
        x = np.repeat(x, 3, axis=1) if data.channels == 3 else x.mean(axis=1, keepdims=True)
    splits = split(y, data)
    mean = x[splits["train"]].mean(axis=(0, 2, 3))
    std = x[splits["train"]].std(axis=(0, 2, 3)) + 1e-8
    x = ((x - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
    arrays = {}
    for name in SPLITS:
        arrays[f"x_{name}"] = x[splits[name]]
        arrays[f"y_{name}"] = y[splits[name]].astype(np.int64)
    np.savez(out / "dataset.npz", **arrays)
    facts = {
        "source": data.source,
        "origin": origin,
        "digest": dataset_digest(arrays),
        "num_classes": len(classes),
        "classes": classes,
        "input_shape": [1, *x.shape[1:]],
        "sizes": {name: int(len(splits[name])) for name in SPLITS},
        "normalisation": {"scale_to_unit": origin["scale_to_unit"], "mean": mean.tolist(), "std": std.tolist()},
    }
    files.write_json(out / "data.json", facts)
    return facts
