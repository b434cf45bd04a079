"""Stage tidl_bundle: everything needed to compile the QDQ model with TIDL on a machine that has TI's tools.

Outputs under `tidl/`: `model_qdq.onnx`, `compile_options.yaml` (the ONNX Runtime TIDL EP options for the target
device, `tidlq.tidl.options`), `calib_inputs.npy` (the calibration frames, already normalised, NCHW float32),
`compat.json` (the TIDL compatibility lint, `tidlq.tidl.lint`), `compile.py` (runs the compilation), and
`compile_options_16bit.yaml` when the sensitivity stage found layers worth 16 bits.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import yaml

from tidlq.core import files
from tidlq.data.dataset import load_split
from tidlq.tidl import lint, options

if TYPE_CHECKING:
    from tidlq.core.params import TidlParams


def run(tidl: TidlParams, qdq_dir: Path, data_dir: Path, sensitivity_dir: Path | None, out: Path) -> dict:
    """Write the TIDL bundle for the QDQ model in `qdq_dir` to `out/tidl` (with the 16-bit alternative when the
    sensitivity stage found layers worth it; `sensitivity_dir` is None when it is switched off)."""
    bundle = out / "tidl"
    bundle.mkdir()
    shutil.copyfile(Path(qdq_dir) / "model_qdq.onnx", bundle / "model_qdq.onnx")
    compile_options = options.compile_options(tidl)
    header = options.header(tidl.target_device)
    files.write_text(bundle / "compile_options.yaml", header + yaml.safe_dump(compile_options, sort_keys=False))
    sixteen = files.read_json(Path(sensitivity_dir) / "sensitivity.json")["for_16bit"] if sensitivity_dir else []
    if sixteen:
        alternative = compile_options | {"advanced_options:output_feature_16bit_names_list": ",".join(sixteen)}
        files.write_text(bundle / "compile_options_16bit.yaml", header + options.SIXTEEN_BIT_NOTE
                         + yaml.safe_dump(alternative, sort_keys=False))
    x_calib, _ = load_split(data_dir, "calib")
    frames = x_calib[: tidl.calibration_frames]
    np.save(bundle / "calib_inputs.npy", frames)
    findings = lint.check(onnx.load(bundle / "model_qdq.onnx"), tidl.target_device)
    compat = {"target_device": tidl.target_device, "counts": lint.summarize(findings), "findings": findings}
    files.write_json(bundle / "compat.json", compat)
    files.write_text(bundle / "compile.py", options.COMPILE_SCRIPT)
    return {"target_device": tidl.target_device, "calibration_frames": int(len(frames)), "compat": compat["counts"],
            "options": compile_options, "layers_16bit": sixteen}
