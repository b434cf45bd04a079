"""Stage calibrate (PTQ): prepare_fx with the recipe's QConfigMapping, feed calibration batches to the observers,
and optionally correct each layer's bias for the mean error quantization adds to its output (as TI and AIMET do).

Outputs: `prepared.pt` (state_dict of the observed model) and `prepared.json` (recipe, engine, what was fed).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tidlq.core import files
from tidlq.data.dataset import calibration_batches, load_split
from tidlq.models import networks
from tidlq.quant import fx, recipes
from tidlq.quant.bias_correction import correct_bias

if TYPE_CHECKING:
    from tidlq.core.params import QuantParams


def run(quant: QuantParams, target_device: str, model_dir: Path, data_dir: Path, out: Path) -> dict:
    """Prepare the float model for PTQ with the recipe for `target_device` and calibrate it on the calib split."""
    spec = files.read_json(Path(model_dir) / "model.json")
    recipe = recipes.recipe_for(quant, target_device)
    engine = recipe.spec.engine
    x, _ = load_split(data_dir, "calib")
    batches = list(calibration_batches(x, quant.batch_size, quant.calibration_batches))
    with fx.quantized_engine(engine):  # also the lock that keeps torch.fx tracing to one thread
        prepared = fx.prepare(networks.load(model_dir), recipe, False, spec["input_shape"], spec["source"])
        with torch.no_grad():
            for batch in batches:
                prepared(torch.from_numpy(batch))
        corrected = correct_bias(prepared, batches) if quant.bias_correction else {}
        torch.save(prepared.state_dict(), out / "prepared.pt")
    info = recipes.recipe_record(recipe, "ptq", engine) | {
        "calibration_images": int(sum(len(b) for b in batches)), "calibration_batches": len(batches),
        "bias_correction": corrected}
    files.write_json(out / "prepared.json", info)
    return {k: v for k, v in info.items() if k != "bias_correction"}
