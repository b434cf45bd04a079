"""tidl_compat: the per-operator constraints of tidl.md §3. Each small graph breaks exactly one rule and has a compliant
twin; the exported built-in models must come out clean, and a 9x9 depthwise conv + 3x upsample must not."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from tidlq.core.params import QuantParams
from tidlq.models import builtin
from tidlq.quant import fx, onnx_export, recipes
from tidlq.tidl import lint

F32 = np.float32


def graph(nodes: list[onnx.NodeProto], inputs: dict[str, list[int]], inits: dict[str, np.ndarray] | None = None,
          opset: int = 17, int_inputs: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """A model of `nodes`: float inputs, int64 inputs, initializers; the last node's output is the graph output."""
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()]
    ins += [helper.make_tensor_value_info(n, TensorProto.INT64, s) for n, s in (int_inputs or {}).items()]
    g = helper.make_graph(nodes, "g", ins, [helper.make_empty_tensor_value_info(nodes[-1].output[0])],
                          [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def conv(kernel: int | tuple[int, int] = 3, stride: int | tuple[int, int] = 1, group: int = 1, channels: int = 4,
         size: int = 32, dilation: int = 1, batch: int = 1) -> onnx.ModelProto:
    kh, kw = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    strides = list(stride) if isinstance(stride, tuple) else [stride, stride]
    w = np.ones((channels, channels // group, kh, kw), F32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[kh, kw], strides=strides,
                            group=group, dilations=[dilation, dilation])
    return graph([node], {"x": [batch, channels, size, size]}, {"w": w})


def conv3d(batch: int) -> onnx.ModelProto:
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3, 3])
    return graph([node], {"x": [batch, 4, 8, 8, 8]}, {"w": np.ones((4, 4, 3, 3, 3), F32)})


def one(op: str, shape: list[int], opset: int = 17, inits: dict[str, np.ndarray] | None = None,
        extra_inputs: tuple[str, ...] = (), int_inputs: dict[str, list[int]] | None = None,
        **attrs: object) -> onnx.ModelProto:
    """A single `op` node named after its op type in lower case, on input x of `shape`."""
    node = helper.make_node(op, ["x", *extra_inputs], ["y"], name=op.lower(), **attrs)
    return graph([node], {"x": shape}, inits, opset, int_inputs)


def gemm(x_shape: tuple[int, int] = (1, 8), bias: tuple[int, ...] = (10,), **attrs: object) -> onnx.ModelProto:
    inits = {"w": np.ones((8, 10), F32), "b": np.ones(bias, F32)}
    return one("Gemm", list(x_shape), inits=inits, extra_inputs=("w", "b"), **attrs)


def matmul_qdq(x_dtype: type = np.uint8, out_dtype: type = np.uint8) -> onnx.ModelProto:
    """x -> Q -> DQ -> MatMul(DQ(int8 w)) -> Q -> DQ, with the integer types of the activations chosen."""
    inits = {"s": np.array(2.0 ** -4, F32), "zx": np.array(0, x_dtype), "zo": np.array(0, out_dtype),
             "w": np.ones((8, 8), np.int8), "ws": np.array(2.0 ** -7, F32), "zw": np.array(0, np.int8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zx"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "s", "zx"], ["xf"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w", "ws", "zw"], ["wf"], name="dq_w"),
             helper.make_node("MatMul", ["xf", "wf"], ["m"], name="matmul"),
             helper.make_node("QuantizeLinear", ["m", "s", "zo"], ["mq"], name="q_m"),
             helper.make_node("DequantizeLinear", ["mq", "s", "zo"], ["y"], name="dq_m")]
    return graph(nodes, {"x": [1, 4, 8]}, inits)


def resize(scales: list[float] | None = None, mode: str = "nearest", coord: str = "asymmetric",
           nearest: str = "floor", opset: int = 17, sizes: list[int] | None = None, **attrs: object) -> onnx.ModelProto:
    """Resize of a [1, 4, 8, 8] input, as torch exports nn.Upsample(mode="nearest") unless told otherwise."""
    inits = {"scales": np.array(scales or [], F32)}
    inputs = ["", "scales"]
    if sizes is not None:
        inits["sizes"] = np.array(sizes, np.int64)
        inputs.append("sizes")
    return one("Resize", [1, 4, 8, 8], opset, inits, tuple(inputs), mode=mode, coordinate_transformation_mode=coord,
               nearest_mode=nearest, **attrs)


def resize_constant_node(scales: list[float]) -> onnx.ModelProto:
    """Resize whose scales come from a Constant node, not an initializer."""
    nodes = [helper.make_node("Constant", [], ["scales"], name="scales",
                              value=numpy_helper.from_array(np.array(scales, F32))),
             helper.make_node("Resize", ["x", "", "scales"], ["y"], name="resize", mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor")]
    return graph(nodes, {"x": [1, 4, 8, 8]})


def reduce(op: str = "ReduceMax", axes: list[int] | None = None, opset: int = 17, **attrs: object) -> onnx.ModelProto:
    axes = [2] if axes is None else axes
    if opset >= 18:
        return one(op, [1, 4, 8, 8], opset, {"axes": np.array(axes, np.int64)}, ("axes",), **attrs)
    return one(op, [1, 4, 8, 8], opset, axes=axes, **attrs)


def pad(pads: list[int], mode: str = "constant") -> onnx.ModelProto:
    return one("Pad", [1, 4, 8, 8], inits={"pads": np.array(pads, np.int64)}, extra_inputs=("pads",), mode=mode)


def reshape(shape_source: str, allowzero: int = 0) -> onnx.ModelProto:
    """Reshape [1, 4, 8, 8] -> [1, 256], the target shape from an initializer, a Constant node or a graph input."""
    target = np.array([1, 256], np.int64)
    nodes = [helper.make_node("Constant", [], ["shape"], name="shape_c", value=numpy_helper.from_array(target))]
    nodes = nodes if shape_source == "constant" else []
    nodes.append(helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape", allowzero=allowzero))
    inits = {"shape": target} if shape_source == "initializer" else {}
    return graph(nodes, {"x": [1, 4, 8, 8]}, inits, 17, {"shape": [2]} if shape_source == "input" else None)


def slice_(batch: int = 1, computed_starts: bool = False) -> onnx.ModelProto:
    inits = {"ends": np.array([4], np.int64), "axes": np.array([3], np.int64)}
    if not computed_starts:
        inits["starts"] = np.array([0], np.int64)
    return one("Slice", [batch, 4, 8, 8], inits=inits, extra_inputs=("starts", "ends", "axes"),
               int_inputs={"starts": [1]} if computed_starts else None)


ARM, WARN = "arm", "warn"
# bad model, compliant twin, device, (node, rule, severity), text the detail must contain
CASES = [
    pytest.param(conv3d(batch=2), conv3d(batch=1), "am68a", ("conv", "input at most 4-D", ARM), "[2, 4, 8, 8, 8]",
                 id="rank-4d"),
    pytest.param(one("Relu", [2] * 7), one("Relu", [1] + [2] * 6), "am68a", ("relu", "input at most 6-D", ARM),
                 "7 non-singleton", id="rank-6d"),
    pytest.param(conv(stride=(1, 2)), conv(stride=2), "am68a", ("conv", "Conv equal H/W stride", ARM), "stride 1x2",
                 id="conv-stride-hw"),
    pytest.param(conv(5, 1, group=4), conv(5, 2, group=4), "am68a", ("conv", "Conv depthwise kernel/stride", ARM),
                 "kernel 5x5, stride 1x1, group 4", id="conv-depthwise"),
    pytest.param(conv(9, 2), conv(7, 2), "am68a", ("conv", "Conv kernel > 7 with stride 2", ARM), "kernel 9x9",
                 id="conv-large-kernel-stride-2"),
    pytest.param(conv(7, 4), conv(11, 4), "am68a", ("conv", "Conv stride 4 only 11x11", ARM), "kernel 7x7, stride 4x4",
                 id="conv-stride-4"),
    pytest.param(conv(3, 3), conv(3, 2), "am62a", ("conv", "Conv 3x3 stride 3 on am62a/am67a", ARM), "am62a",
                 id="conv-3x3s3-am62a"),
    pytest.param(conv(3, 2, dilation=2), conv(3, 1, dilation=2), "tda4vm", ("conv", "Conv dilation without stride",
                 WARN), "dilation 2x2 with stride 2x2", id="conv-dilation-tda4vm"),
    pytest.param(one("MaxPool", [1, 4, 16, 16], kernel_shape=[5, 5]),
                 one("MaxPool", [1, 4, 16, 16], kernel_shape=[3, 3], strides=[2, 2]), "am68a",
                 ("maxpool", "pool kernel 3x3/2x2/1x1, stride 1/2", WARN), "kernel 5x5", id="pool-kernel"),
    pytest.param(one("MaxPool", [1, 4, 16, 16], kernel_shape=[2, 2], dilations=[2, 2]),
                 one("MaxPool", [1, 4, 16, 16], kernel_shape=[2, 2], dilations=[1, 1]), "am68a",
                 ("maxpool", "pool dilation 1", ARM), "dilation 2x2", id="pool-dilation"),
    pytest.param(one("MaxPool", [1, 4, 16, 16], kernel_shape=[2, 2], storage_order=1),
                 one("MaxPool", [1, 4, 16, 16], kernel_shape=[2, 2], storage_order=0), "am68a",
                 ("maxpool", "MaxPool storage_order 0", ARM), "storage_order 1", id="pool-storage-order"),
    pytest.param(one("GlobalAveragePool", [1, 4, 40, 40]), one("GlobalAveragePool", [1, 4, 32, 32]), "am68a",
                 ("globalaveragepool", "GlobalAveragePool H*W <= 1024", ARM), "H*W = 1600", id="gap-area"),
    pytest.param(gemm((8, 1), transA=1), gemm((1, 8), transA=0), "am68a", ("gemm", "Gemm transA 0", ARM), "transA 1",
                 id="gemm-transa"),
    pytest.param(gemm(alpha=0.5), gemm(alpha=1.0), "am68a", ("gemm", "Gemm alpha = beta = 1", ARM), "alpha 0.5",
                 id="gemm-alpha"),
    pytest.param(gemm(bias=(1,)), gemm(bias=(1, 10)), "am68a", ("gemm", "Gemm bias [N] or [1,N]", ARM),
                 "bias shape [1] for N = 10", id="gemm-bias"),
    pytest.param(matmul_qdq(np.int8, np.uint8), matmul_qdq(np.int8, np.int8), "am68a",
                 ("matmul", "MatMul signed inputs need signed output", ARM), "uint8 output", id="matmul-sign"),
    pytest.param(matmul_qdq(np.uint8), matmul_qdq(np.int8, np.int8), "tda4vm",
                 ("matmul", "MatMul input signs match (tda4vm)", ARM), "uint8 x int8", id="matmul-mixed-tda4vm"),
    pytest.param(resize([1, 1, 2, 2], "cubic", "half_pixel"), resize([1, 1, 2, 2], "linear", "half_pixel"), "am68a",
                 ("resize", "Resize mode nearest or linear", ARM), "mode cubic", id="resize-mode"),
    pytest.param(resize([1, 2, 2, 2]), resize([1, 1, 2, 2]), "am68a", ("resize", "Resize on H/W only", ARM),
                 "scales [1, 2, 2, 2]", id="resize-hw-only"),
    pytest.param(resize([1, 1, 0.5, 0.5]), resize([1, 1, 2, 2]), "am68a", ("resize", "Resize scale >= 1", ARM),
                 "scales [1, 1, 0.5, 0.5]", id="resize-downscale"),
    pytest.param(resize([1, 1, 2, 4]), resize([1, 1, 4, 4]), "am68a", ("resize", "Resize equal H/W scales", ARM),
                 "H scale 2 != W scale 4", id="resize-equal"),
    pytest.param(resize([1, 1, 3, 3]), resize([1, 1, 4, 4]), "am68a", ("resize", "Resize power-of-2 scales", ARM),
                 "3x3 is not a power of 2", id="resize-p2"),
    pytest.param(resize(sizes=[1, 4, 24, 24]), resize(sizes=[1, 4, 16, 16]), "am68a",
                 ("resize", "Resize power-of-2 scales", ARM), "scales [1, 1, 3, 3]", id="resize-p2-from-sizes"),
    pytest.param(resize_constant_node([1, 1, 1.5, 1.5]), resize_constant_node([1, 1, 2, 2]), "am68a",
                 ("resize", "Resize power-of-2 scales", ARM), "1.5x1.5", id="resize-p2-constant-node"),
    pytest.param(one("Upsample", [1, 4, 8, 8], 9, {"s": np.array([1, 1, 3, 3], F32)}, ("s",)),
                 one("Upsample", [1, 4, 8, 8], 9, {"s": np.array([1, 1, 2, 2], F32)}, ("s",)), "am68a",
                 ("upsample", "Resize power-of-2 scales", ARM), "3x3", id="upsample-p2"),
    pytest.param(resize([1, 1, 2, 2], "linear", "align_corners"), resize([1, 1, 2, 2], "linear", "half_pixel"),
                 "am68a", ("resize", "Resize coordinate mode", ARM), "align_corners", id="resize-coord-mode"),
    pytest.param(resize([1, 1, 2, 2], "linear", "asymmetric"), resize([1, 1, 2, 2], "linear", "pytorch_half_pixel"),
                 "am68a", ("resize", "Resize linear not with asymmetric", ARM), "mode linear", id="resize-linear-asym"),
    pytest.param(resize([1, 1, 2, 2], "nearest", "half_pixel", "round_prefer_floor"),
                 resize([1, 1, 2, 2], "nearest", "half_pixel", "round_prefer_ceil"), "am68a",
                 ("resize", "Resize nearest_mode", ARM), "round_prefer_floor with half_pixel",
                 id="resize-nearest-mode"),
    pytest.param(resize([1, 1, 2, 2], opset=18, antialias=1), resize([1, 1, 2, 2], opset=18, antialias=0), "am68a",
                 ("resize", "Resize antialias/exclude_outside/aspect policy", ARM), "'antialias': 1",
                 id="resize-antialias"),
    pytest.param(one("Concat", [1, 4, 8, 8], extra_inputs=("x",), axis=0),
                 one("Concat", [1, 4, 8, 8], extra_inputs=("x",), axis=1), "am68a",
                 ("concat", "Concat not on batch axis", ARM), "axis 0 of a 4-D input", id="concat-axis"),
    pytest.param(one("Softmax", [1, 4, 8, 8], axis=1), one("Softmax", [1, 4, 8, 8], axis=-2), "am68a",
                 ("softmax", "Softmax on H or W axis", ARM), "axis 1 of a 4-D input", id="softmax-axis"),
    pytest.param(one("ArgMax", [1, 4, 8, 8], axis=1, keepdims=0), one("ArgMax", [1, 4, 8, 8], axis=1, keepdims=1),
                 "am68a", ("argmax", "ArgMax keepdims 1", ARM), "keepdims 0", id="argmax-keepdims"),
    pytest.param(one("ArgMax", [1, 4, 8, 8], axis=3), one("ArgMax", [1, 4, 8, 8], axis=-3), "am68a",
                 ("argmax", "ArgMax on channel axis", ARM), "axis 3 of a 4-D input", id="argmax-axis"),
    pytest.param(one("ArgMax", [1, 4, 8, 8], axis=1, select_last_index=1),
                 one("ArgMax", [1, 4, 8, 8], axis=1, select_last_index=0), "am68a",
                 ("argmax", "ArgMax select_last_index 0", ARM), "select_last_index 1", id="argmax-last-index"),
    pytest.param(reduce(axes=[3]), reduce(axes=[2]), "am68a", ("reducemax", "Reduce along H only", ARM), "axes [3]",
                 id="reduce-axis"),
    pytest.param(reduce("ReduceMin", [1], opset=18), reduce("ReduceMin", [-2], opset=18), "am68a",
                 ("reducemin", "Reduce along H only", ARM), "axes [1]", id="reduce-axis-opset18"),
    pytest.param(reduce(keepdims=0), reduce(keepdims=1), "am68a", ("reducemax", "Reduce keepdims 1", ARM),
                 "keepdims 0", id="reduce-keepdims"),
    pytest.param(pad([0, 0, 1, 1, 0, 0, 1, 1], "reflect"), pad([0, 0, 1, 1, 0, 0, 1, 1]), "am68a",
                 ("pad", "Pad constant mode", ARM), "mode reflect", id="pad-mode"),
    pytest.param(pad([0, 1, 0, 0, 0, 1, 0, 0]), pad([0, 0, 1, 1, 0, 0, 1, 1]), "am68a",
                 ("pad", "Pad on H/W only", ARM), "pad axes [1]", id="pad-axes"),
    pytest.param(reshape("input"), reshape("constant"), "am68a", ("reshape", "Reshape constant shape", ARM),
                 "'shape' is computed", id="reshape-shape"),
    pytest.param(reshape("initializer", allowzero=1), reshape("initializer"), "am68a",
                 ("reshape", "Reshape allowzero 0", ARM), "allowzero 1", id="reshape-allowzero"),
    pytest.param(slice_(batch=2), slice_(batch=1), "am68a", ("slice", "Slice batch 1", ARM), "[2, 4, 8, 8]",
                 id="slice-batch"),
    pytest.param(slice_(computed_starts=True), slice_(), "am68a", ("slice", "Slice constant starts/ends/axes", ARM),
                 "['starts']", id="slice-constant"),
]


def rules(model: onnx.ModelProto, device: str = "am68a") -> list[tuple[str, str, str]]:
    return [(f["node"], f["rule"], f["severity"]) for f in lint.check(model, device)]


@pytest.mark.parametrize(("bad", "good", "device", "expected", "detail"), CASES)
def test_rule_fires_on_the_violation_only(bad: onnx.ModelProto, good: onnx.ModelProto, device: str,
                                          expected: tuple[str, str, str], detail: str) -> None:
    node, rule, _ = expected
    found = [f for f in lint.check(bad, device) if (f["node"], f["rule"], f["severity"]) == expected]
    assert len(found) == 1, rules(bad, device)
    assert found[0]["op"] == next(n.op_type for n in bad.graph.node if n.name == node)
    assert detail in found[0]["detail"]
    assert [r for r in rules(good, device) if r[1] == rule] == []
    assert set(rules(bad, device)) - set(rules(good, device)) == {expected}  # the twins differ by this rule only


def test_device_specific_conv_rules_stay_quiet_elsewhere() -> None:
    assert rules(conv(3, 3), "am68a") == []
    assert rules(conv(3, 2, dilation=2), "am68a") == []
    assert ("conv", "Conv 3x3 stride 3 on am62a/am67a", "arm") in rules(conv(3, 3), "am67a")


def test_depthwise_needs_group_equal_to_input_channels() -> None:
    """A 9x9 grouped conv that is not depthwise (group 2 of 4 channels) is not held to the depthwise table."""
    assert rules(conv(9, 1, group=2)) == []
    assert rules(conv(9, 1, group=4)) == [("conv", "Conv depthwise kernel/stride", "arm")]


def test_resize_scale_from_inferred_output_shape() -> None:
    """No constant scales or sizes: the scale comes from the output shape recorded in the graph."""
    model = one("Resize", [1, 4, 8, 8], extra_inputs=("", "", "sizes"), int_inputs={"sizes": [4]}, mode="nearest",
                coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    model.graph.value_info.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 24, 24]))
    assert rules(model) == [("resize", "Resize power-of-2 scales", "arm")]


def test_already_inferred_model_gives_the_same_findings() -> None:
    model = resize(sizes=[1, 4, 24, 24])
    inferred = onnx.shape_inference.infer_shapes(model)
    assert rules(inferred) == rules(model) == [("resize", "Resize power-of-2 scales", "arm")]
    assert len(model.graph.value_info) == 0  # check() did not write its inferred shapes into the caller's model


class DepthwiseUpsample(nn.Module):
    """A 9x9 depthwise conv (TIDL: 3x3/5x5/7x7 only) then a 3x nearest upsample (TIDL: power-of-2 scales only)."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 9, padding=4, groups=channels)
        self.up = nn.Upsample(scale_factor=3, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dw(x))


def export_like_pipeline(model: nn.Module, input_shape: list[int], device: str = "am68a") -> onnx.ModelProto:
    """calibrate -> convert -> export_qdq as the pipeline runs them, with the default quant params for `device`."""
    torch.manual_seed(0)
    recipe = recipes.recipe_for(QuantParams(), device)
    with fx.quantized_engine(recipe.spec.engine):
        prepared = fx.prepare(model.eval(), recipe, False, input_shape, "test")
        with torch.no_grad():
            for _ in range(3):
                prepared(torch.randn([4, *input_shape[1:]]))
        int8 = fx.convert(prepared)
        raw = onnx_export.export_onnx(int8, input_shape, 17)
    return onnx_export.clean(raw)


def test_exported_depthwise_9x9_and_upsample_3x_are_named() -> None:
    model = export_like_pipeline(DepthwiseUpsample(), [1, 4, 16, 16])
    conv_node = next(n for n in model.graph.node if n.op_type == "Conv")
    resize_node = next(n for n in model.graph.node if n.op_type == "Resize")
    findings = lint.check(model, "am68a")
    assert sorted(rules(model)) == sorted([(conv_node.name, "Conv depthwise kernel/stride", "arm"),
                                           (resize_node.name, "Resize power-of-2 scales", "arm")])
    details = {f["rule"]: f["detail"] for f in findings}
    assert "kernel 9x9, stride 1x1, group 4" in details["Conv depthwise kernel/stride"]
    assert "scales [1, 1, 3, 3]" in details["Resize power-of-2 scales"]
    assert lint.summarize(findings) == {"reject": 0, "arm": 2, "warn": 0}


@pytest.mark.parametrize("builtin", [builtin.MobileNetV2Tiny, builtin.ResNetTiny])
def test_exported_builtin_models_have_no_findings(builtin: type[nn.Module]) -> None:
    model = export_like_pipeline(builtin(num_classes=10, in_channels=1), [1, 1, 28, 28])
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "GlobalAveragePool", "Gemm", "Flatten"} <= ops  # the rules had something to look at
    assert lint.check(model, "am68a") == []
