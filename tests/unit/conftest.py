"""Fixtures shared by the unit tests: one small trained model on digits, built once for the package through the
stage graph (`tidlq.runner.build_all`, no Prefect), and the recipe stages built the same way on top of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tidlq import runner
from tidlq.core.params import Params, QatParams, QuantParams, load_params

# Small images, a short float training, and only the stages the unit tests look at.
BASE = {"data.image_size": 16, "float_train.epochs": 4, "verify.baseline": "none", "sensitivity.enabled": False}


def stage(tmp: Path, name: str, fn, *args) -> Path:
    """Run a stage's pure `run(*args, out)` into a fresh folder `tmp/name`; the folder."""
    out = tmp / name
    out.mkdir()
    fn(*args, out)
    return out


def params(quant: QuantParams | None = None, qat: QatParams | None = None, device: str = "am68a") -> Params:
    """The unit tests' params, with a quant section, QAT (when `qat` is given) and a target device."""
    p = load_params(None, BASE | {"tidl.target_device": device})
    quant = quant or p.quant
    if qat is not None:
        quant = quant.model_copy(update={"mode": "qat"})
    return p.model_copy(update={"quant": quant, "qat": qat or p.qat})


@pytest.fixture(scope="package")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant")
    built = runner.build_all(params(), root, until="evaluate_float")
    return {"tmp": root, "data": built["prepare_data"].dir, "model": built["float_model"].dir,
            "float": built["evaluate_float"].dir}


def quantize(base: dict[str, Path], quant: QuantParams, qat: QatParams | None = None,
             device: str = "am68a") -> dict[str, Path]:
    """PTQ (or QAT with `qat`) with `quant` for `device`, up to verify_onnx, on the package's float model: the
    folders of the recipe's stages (content-addressed: the same recipe is built once)."""
    built = runner.build_all(params(quant, qat, device), base["tmp"], until="verify_onnx")
    prepared = built["train_qat" if qat is not None else "calibrate"]
    return {"prepared": prepared.dir, "int8": built["convert"].dir, "qdq": built["export_qdq"].dir,
            "verify": built["verify_onnx"].dir}
