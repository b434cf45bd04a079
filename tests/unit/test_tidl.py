"""tidl_bundle: compile options per device (key names exactly as TI's README), the calibration frames, the compile
script's wiring, and the TIDL compatibility lint on small graphs that break one rule each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from tidlq.core.params import DataParams, TidlParams
from tidlq.stages import tidl_bundle
from tidlq.stages.prepare_data import run as prepare
from tidlq.tidl import lint, options

EXPECTED_KEYS = {
    "tidl_tools_path", "artifacts_folder", "tensor_bits", "accuracy_level", "debug_level",
    "advanced_options:prequantized_model", "advanced_options:quantization_scale_type",
    "advanced_options:calibration_frames", "advanced_options:calibration_iterations",
    "advanced_options:add_data_convert_ops", "advanced_options:pre_batchnorm_fold",
}


@pytest.mark.parametrize(("device", "scale_type"), [("am62a", 4), ("am67a", 4), ("am68a", 4), ("am69a", 4),
                                                     ("tda4vm", 1), ("am68pa", 1)])
def test_compile_options_per_device(device: str, scale_type: int) -> None:
    compile_options = options.compile_options(TidlParams(target_device=device, calibration_frames=7))
    assert set(compile_options) == EXPECTED_KEYS
    assert compile_options["advanced_options:quantization_scale_type"] == scale_type
    assert compile_options["advanced_options:prequantized_model"] == 1
    assert (compile_options["tensor_bits"], compile_options["accuracy_level"]) == (8, 0)
    assert compile_options["advanced_options:calibration_frames"] == 7


def qdq_conv_model(weight_axis: int = 0, scale: float = 0.02, act_zero: int = 128, opset: int = 17,
                   dynamic: bool = False, extra: list[onnx.NodeProto] | None = None,
                   act_dtype: int = TensorProto.UINT8) -> onnx.ModelProto:
    """input -> Q -> DQ -> Conv(weights via DQ) -> [extra] -> output."""
    w = numpy_helper.from_array(np.ones((4, 1, 3, 3), dtype=np.int8), "w")
    w_scale = numpy_helper.from_array(np.full(4, 0.5, dtype=np.float32), "w_scale")
    w_zero = numpy_helper.from_array(np.zeros(4, dtype=np.int8), "w_zero")
    a_scale = numpy_helper.from_array(np.array(scale, dtype=np.float32), "a_scale")
    zero_np = np.array(act_zero, dtype=helper.tensor_dtype_to_np_dtype(act_dtype))
    a_zero = numpy_helper.from_array(zero_np, "a_zero")
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "a_scale", "a_zero"], ["q"], name="q_in"),
        helper.make_node("DequantizeLinear", ["q", "a_scale", "a_zero"], ["dq"], name="dq_in"),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wf"], name="dq_w", axis=weight_axis),
        helper.make_node("Conv", ["dq", "wf"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        *(extra or []),
    ]
    last = nodes[-1].output[0]
    shape = ["N", 1, 8, 8] if dynamic else [1, 1, 8, 8]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, None)],
                              [w, w_scale, w_zero, a_scale, a_zero])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def rules(model: onnx.ModelProto, device: str = "am68a") -> list[tuple[str, str, str]]:
    return [(f["node"], f["rule"], f["severity"]) for f in lint.check(model, device)]


def test_clean_model_has_no_findings() -> None:
    assert rules(qdq_conv_model()) == []


@pytest.mark.parametrize(("model", "device", "expected"), [
    (qdq_conv_model(opset=11), "am68a", ("(model)", "opset 13-19", "reject")),
    (qdq_conv_model(dynamic=True), "am68a", ("input", "static input shape", "reject")),
    (qdq_conv_model(weight_axis=1), "am68a", ("dq_w", "per-channel weights on axis 0", "reject")),
    (qdq_conv_model(act_dtype=TensorProto.INT16, act_zero=0), "am68a", ("q_in", "8-bit Q/DQ only", "reject")),
    (qdq_conv_model(extra=[helper.make_node("Cast", ["conv"], ["c"], name="mid_cast", to=TensorProto.FLOAT),
                           helper.make_node("Relu", ["c"], ["r"], name="relu")]), "am68a",
     ("mid_cast", "Cast only at graph input/output", "arm")),
    (qdq_conv_model(extra=[helper.make_node("Hardmax", ["conv"], ["h"], name="hm")]), "am68a",
     ("hm", "operator not in TIDL's supported list", "arm")),
    (qdq_conv_model(extra=[helper.make_node("ReduceMean", ["conv"], ["m"], name="rm")]), "am68a",
     ("rm", "not supported on its own", "arm")),
    (qdq_conv_model(scale=0.03, act_zero=0), "tda4vm", ("q_in", "power-of-2 scales", "reject")),
    (qdq_conv_model(scale=2.0 ** -5, act_zero=128), "tda4vm", ("q_in", "symmetric quantization", "reject")),
])
def test_each_rule_is_named(model: onnx.ModelProto, device: str, expected: tuple[str, str, str]) -> None:
    assert expected in rules(model, device)


def test_power_of_two_symmetric_model_passes_on_tda4vm() -> None:
    model = qdq_conv_model(scale=2.0 ** -6, act_zero=0)
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.full(4, 0.25, dtype=np.float32), "w_scale"))
    assert rules(model, "tda4vm") == []


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    prepare(DataParams(image_size=8), data)
    qdq = tmp_path / "qdq"
    qdq.mkdir()
    onnx.save(qdq_conv_model(), qdq / "model_qdq.onnx")
    out = tmp_path / "bundle"
    out.mkdir()
    (tmp_path / "sens").mkdir()
    (tmp_path / "sens" / "sensitivity.json").write_text('{"for_16bit": ["/2_1/Clip_output_0", "/logits"]}')
    tidl_bundle.run(TidlParams(target_device="am62a", calibration_frames=3), qdq, data, tmp_path / "sens", out)
    return out / "tidl"


def test_bundle_contents(bundle: Path) -> None:
    assert sorted(p.name for p in bundle.iterdir()) == ["calib_inputs.npy", "compat.json", "compile.py",
                                                      "compile_options.yaml", "compile_options_16bit.yaml",
                                                      "model_qdq.onnx"]
    options = yaml.safe_load((bundle / "compile_options.yaml").read_text())
    assert set(options) == EXPECTED_KEYS
    sixteen = yaml.safe_load((bundle / "compile_options_16bit.yaml").read_text())
    assert sixteen == options | {"advanced_options:output_feature_16bit_names_list": "/2_1/Clip_output_0,/logits"}
    assert "export SOC=am62a" in (bundle / "compile_options.yaml").read_text()
    frames = np.load(bundle / "calib_inputs.npy")
    assert frames.shape == (3, 1, 8, 8) and frames.dtype == np.float32


def test_compile_script_needs_tidl_tools(bundle: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TIDL_TOOLS_PATH"}
    done = subprocess.run([sys.executable, str(bundle / "compile.py")], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert "TIDL_TOOLS_PATH" in done.stderr


FAKE_ORT = '''
import json, os
class SessionOptions: pass
class _Input: name = "input"
class InferenceSession:
    def __init__(self, path, providers, provider_options, sess_options):
        self.record = {"path": path, "providers": providers, "options": provider_options[0], "runs": []}
    def get_inputs(self): return [_Input()]
    def run(self, outputs, feeds):
        self.record["runs"].append(list(feeds["input"].shape))
        with open(os.environ["FAKE_ORT_RECORD"], "w") as f: json.dump(self.record, f)
'''


def test_compile_script_feeds_each_frame_to_the_tidl_provider(bundle: Path, tmp_path: Path) -> None:
    """With a stand-in onnxruntime (TIDL's EP exists only on TI's tools), check what the script asks of it."""
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "onnxruntime.py").write_text(FAKE_ORT)
    record = tmp_path / "record.json"
    env = os.environ | {"TIDL_TOOLS_PATH": "/opt/tidl_tools", "PYTHONPATH": str(tmp_path / "fake"),
                        "FAKE_ORT_RECORD": str(record)}
    done = subprocess.run([sys.executable, str(bundle / "compile.py"), "--artifacts", str(tmp_path / "art")],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    seen = yaml.safe_load(record.read_text())
    assert seen["providers"] == ["TIDLCompilationProvider", "CPUExecutionProvider"]
    assert seen["options"]["tidl_tools_path"] == "/opt/tidl_tools"
    assert seen["options"]["artifacts_folder"] == str(tmp_path / "art")
    assert seen["options"]["advanced_options:prequantized_model"] == 1
    assert seen["runs"] == [[1, 1, 8, 8]] * 3
