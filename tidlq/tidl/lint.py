"""Checks a QDQ ONNX model against what TIDL's ONNX Runtime EP accepts (reference/tidl.md §2, §3, §6).

Model-level, Q/DQ and operator-list rules live here; the per-operator constraints of §3 are in `tidlq.tidl.ops`,
dispatched by op type through `OP_RULES`. Each finding names the node, the rule, and its consequence:
- `reject`: TIDL will refuse the model or compile it wrongly (fix before compiling);
- `arm`: the node is not offloaded and runs on the Arm cores (slower, not wrong);
- `warn`: allowed, but outside what TI documents as validated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from tidlq.tidl import ops
from tidlq.tidl.devices import Device, device
from tidlq.tidl.graph_info import GraphInfo, finding

# tidl.md §3: ONNX operators with a TIDL layer (11.0). Anything else runs on Arm.
SUPPORTED_OPS = frozenset("""
Conv AveragePool GlobalAveragePool MaxPool Relu PRelu Sum Add Mul Div Sub Max Gemm MatMul Softmax BatchNormalization
ConvTranspose Concat Slice Split Flatten ArgMax Upsample Resize DepthToSpace Sigmoid Pad ReduceMin ReduceMax ScatterND
ScatterElements Squeeze Tanh HardSigmoid Elu Reshape Gather Transpose LayerNormalization GridSample TopK DeformConv
Clip LeakyRelu Sqrt Pow QuantizeLinear DequantizeLinear Asin Asinh HardSwish Mish Log Unsqueeze Abs Floor Exp Sin
InstanceNormalization SpaceToDepth Acos Atan Sinh Neg Cos Cosh Tan
""".split())
# Supported only as part of a fused pattern, or only at the graph's ends.
NOT_ALONE = frozenset({"Dropout", "Erf", "Identity", "ReduceMean"})
QDQ_8BIT = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}

# tidl.md §3: '"≤N-D" means the number of non-singleton variable input dimensions must be ≤ N'.
FOUR_D = """Conv AveragePool GlobalAveragePool MaxPool Gemm MatMul ConvTranspose Slice Split ArgMax Upsample Resize
DepthToSpace SpaceToDepth ScatterND ScatterElements""".split()
SIX_D = """Relu PRelu Sum Add Mul Div Sub Max Softmax BatchNormalization Concat Flatten Sigmoid Pad Squeeze Tanh
HardSigmoid Elu Reshape Transpose LayerNormalization Clip LeakyRelu Sqrt Pow Asin Asinh HardSwish Mish Log Unsqueeze
Abs Floor Exp Sin InstanceNormalization Acos Atan Sinh Neg Cos Cosh Tan""".split()
RANK_LIMITS = {**dict.fromkeys(SIX_D, 6), **dict.fromkeys(FOUR_D, 4)}

# The per-operator constraints of tidl.md §3, by op type (tidlq/tidl/ops.py quotes each one).
OP_RULES: dict[str, Callable[[onnx.NodeProto, GraphInfo], list[dict[str, Any]]]] = {
    "Conv": ops.check_conv,
    "AveragePool": ops.check_pool,
    "MaxPool": ops.check_pool,
    "GlobalAveragePool": ops.check_global_pool,
    "Gemm": ops.check_gemm,
    "MatMul": ops.check_matmul,
    "Resize": ops.check_resize,
    "Upsample": ops.check_resize,
    "Concat": ops.check_concat,
    "Softmax": ops.check_softmax,
    "ArgMax": ops.check_argmax,
    "ReduceMin": ops.check_reduce,
    "ReduceMax": ops.check_reduce,
    "Pad": ops.check_pad,
    "Reshape": ops.check_reshape,
    "Slice": ops.check_slice,
}


def check(model: onnx.ModelProto, target_device: str) -> list[dict[str, Any]]:
    """All findings for `model` compiled for `target_device`, in graph order."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    findings = _check_model_level(model)
    graph_inputs = {i.name for i in graph.input}
    graph_outputs = {o.name for o in graph.output}
    target = device(target_device)
    info = GraphInfo.of(model, target)
    for node in graph.node:
        findings += _check_op(node, graph_inputs, graph_outputs)
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            findings += _check_qdq(node, inits, target)
        elif node.op_type in SUPPORTED_OPS:
            findings += _check_rank(node, info)
            if node.op_type in OP_RULES:
                findings += OP_RULES[node.op_type](node, info)
    return findings


def summarize(findings: list[dict[str, Any]]) -> dict[str, int]:
    """Number of findings per severity."""
    return {s: sum(f["severity"] == s for f in findings) for s in ("reject", "arm", "warn")}


def _finding(node: str, op: str, rule: str, severity: str, detail: str) -> dict[str, Any]:
    return {"node": node, "op": op, "rule": rule, "severity": severity, "detail": detail}


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _check_model_level(model: onnx.ModelProto) -> list[dict[str, Any]]:
    findings = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not 13 <= opset <= 19:
        findings.append(_finding("(model)", "", "opset 13-19", "reject",
                                 f"opset {opset}: per-channel Q/DQ needs 13, ORT-TIDL 1.15 reads up to 19"))
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if not dims or any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims):
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            findings.append(_finding(inp.name, "(input)", "static input shape", "reject",
                                     f"input shape {shape}: TIDL needs every dimension fixed and > 0"))
    return findings


def _check_op(node: onnx.NodeProto, graph_inputs: set[str], graph_outputs: set[str]) -> list[dict[str, Any]]:
    op = node.op_type
    if op == "Constant":  # ONNX Runtime turns Constant nodes into initializers before TIDL partitions the graph
        return []
    if op == "Cast":
        at_end = set(node.input) & graph_inputs or set(node.output) & graph_outputs
        if not at_end:
            return [_finding(_name(node), op, "Cast only at graph input/output", "arm",
                             "an interior Cast splits the graph; it runs on Arm")]
        return []
    if op in NOT_ALONE:
        return [_finding(_name(node), op, "not supported on its own", "arm", f"{op} runs on Arm")]
    if op not in SUPPORTED_OPS:
        return [_finding(_name(node), op, "operator not in TIDL's supported list", "arm", f"{op} runs on Arm")]
    return []


def _check_rank(node: onnx.NodeProto, g: GraphInfo) -> list[dict[str, Any]]:
    """tidl.md §3: '≤4-D' for Conv, Pooling, Gemm, MatMul, Resize, Slice, ArgMax ...; '≤6-D' for the element-wise and
    activation layers. Counts the non-singleton dimensions of the data input (4-D ops) or of every variable input."""
    limit = RANK_LIMITS.get(node.op_type)
    if limit is None:
        return []
    names = node.input[:1] if limit == 4 else [n for n in node.input if n and not g.is_const(n)]
    for name in names:
        shape = g.shape(name)
        count = None if shape is None else sum(d != 1 for d in shape)
        if count is not None and count > limit:
            return [finding(node, f"input at most {limit}-D", "arm",
                                     f"input {name!r} of shape {shape} has {count} non-singleton dimensions; TIDL's "
                                     f"{node.op_type} takes at most {limit}")]
    return []


def _check_qdq(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], target: Device) -> list[dict[str, Any]]:
    findings = []
    name, op = _name(node), node.op_type
    scale = _const(inits, node.input[1])
    zero = _const(inits, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    is_weight = op == "DequantizeLinear" and node.input[0] in inits
    dtype = inits[node.input[2]].data_type if zero is not None and node.input[2] in inits else None
    if is_weight and inits[node.input[0]].data_type == onnx.TensorProto.INT32:
        return []  # int32 bias: scale = input scale x weight scale, TIDL requantizes it
    if dtype is not None and dtype not in QDQ_8BIT:
        findings.append(_finding(name, op, "8-bit Q/DQ only", "reject",
                                 f"{onnx.TensorProto.DataType.Name(dtype)}: TIDL's pre-quantized path is 8-bit only"))
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    per_channel = scale is not None and scale.size > 1
    if per_channel and is_weight and axis != 0:
        findings.append(_finding(name, op, "per-channel weights on axis 0", "reject", f"weight DQ on axis {axis}"))
    if per_channel and not is_weight and axis != 1:
        findings.append(_finding(name, op, "activation Q/DQ on axis 1", "warn", f"per-channel activation, axis {axis}"))
    if target.power_of_2 and scale is not None:
        findings += _check_p2(name, op, scale, zero, target.name)
    return findings


def _check_p2(name: str, op: str, scale: np.ndarray, zero: np.ndarray | None, device: str) -> list[dict[str, Any]]:
    findings = []
    log2 = np.log2(scale.astype(np.float64))
    if not np.allclose(log2, np.round(log2), atol=1e-6):
        findings.append(_finding(name, op, "power-of-2 scales", "reject",
                                 f"{device} needs power-of-2 scales (quantization_scale_type 1); scale "
                                 f"{float(scale.flat[0]):.6g} is not"))
    if zero is not None and np.any(zero != 0):
        findings.append(_finding(name, op, "symmetric quantization", "reject",
                                 f"{device} supports symmetric quantization only; zero point "
                                 f"{int(zero.flat[0])} is not 0"))
    return findings


def _const(inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    return numpy_helper.to_array(inits[name]) if name in inits else None
