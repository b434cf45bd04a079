"""Stage calibrate (PTQ): prepare_fx with the preset's QConfigMapping, then feed calibration batches to the observers.

Outputs: `prepared.pt` (state_dict of the observed model) and `prepared.json` (preset, mode, engine, what was fed).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from prefect import task

from tasks import cache, files, models, qconfig
from tasks.params import QuantParams
from tasks.prepare_data import load_split


def run(quant: QuantParams, model_dir: Path, data_dir: Path, out: Path) -> dict:
    """Prepare the float model for PTQ and calibrate it on the calib split."""
    spec = files.read_json(Path(model_dir) / "model.json")
    engine = qconfig.engine_for(quant.qconfig)
    with qconfig.quantized_engine(engine):
        prepared = qconfig.prepare(models.load(model_dir), quant.qconfig, False, spec["input_shape"], spec["source"])
        x, _ = load_split(data_dir, "calib")
        fed = 0
        with torch.no_grad():
            for batch in calibration_batches(x, quant.batch_size, quant.calibration_batches):
                prepared(torch.from_numpy(batch))
                fed += len(batch)
        torch.save(prepared.state_dict(), out / "prepared.pt")
    info = {"mode": "ptq", "qconfig": quant.qconfig, "engine": engine, "calibration_images": fed,
            "calibration_batches": quant.calibration_batches, "batch_size": quant.batch_size}
    files.write_json(out / "prepared.json", info)
    return info


@task(name="calibrate", **cache.TASK_OPTIONS)
def calibrate_task(root: Path, quant: QuantParams, model: cache.Manifest, data: cache.Manifest) -> cache.Manifest:
    """Prefect task: `run` through the stage cache."""
    return cache.build(root, "calibrate", __name__, [quant, model, data],
                       lambda out: run(quant, model.dir, data.dir, out))


def calibration_batches(x: np.ndarray, batch_size: int, batches: int) -> Iterator[np.ndarray]:
    """Up to `batches` consecutive batches of the calib split (fewer when the split is smaller)."""
    for i in range(batches):
        batch = x[i * batch_size:(i + 1) * batch_size]
        if len(batch) == 0:
            return
        yield batch
