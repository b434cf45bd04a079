"""Fixtures shared by the unit tests: one small trained model on digits, built once for the package."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks import calibrate, convert, evaluate_float, export_qdq, float_model, train_qat, verify_onnx
from tasks.params import DataParams, ExportParams, FloatTrainParams, ModelParams, QatParams, QuantParams, VerifyParams
from tasks.prepare_data import run as prepare


def stage(tmp: Path, name: str, fn, *args) -> Path:
    out = tmp / name
    out.mkdir()
    fn(*args, out)
    return out


@pytest.fixture(scope="package")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("quant")
    data = stage(tmp, "data", prepare, DataParams(image_size=16))
    model = stage(tmp, "model", float_model.run, ModelParams(source="mobilenet_v2_tiny"),
                  FloatTrainParams(epochs=4), data)
    float_eval = stage(tmp, "float", evaluate_float.run, ExportParams(), model, data)
    return {"tmp": tmp, "data": data, "model": model, "float": float_eval}


def quantize(base: dict[str, Path], tag: str, quant: QuantParams, qat: QatParams | None = None,
             device: str = "am68a") -> dict[str, Path]:
    tmp = base["tmp"] / tag
    tmp.mkdir()
    if qat is None:
        prepared = stage(tmp, "prepared", calibrate.run, quant, device, base["model"], base["data"])
    else:
        prepared = stage(tmp, "prepared", train_qat.run, quant, qat, device, base["model"], base["data"])
    int8 = stage(tmp, "int8", convert.run, prepared, base["model"], base["data"])
    qdq = stage(tmp, "qdq", export_qdq.run, ExportParams(), device, int8, prepared, base["model"])
    verify = stage(tmp, "verify", verify_onnx.run, VerifyParams(), qdq, base["float"], int8, base["data"])
    return {"prepared": prepared, "int8": int8, "qdq": qdq, "verify": verify}


