"""What TIDL's per-operator rules read from an ONNX graph: constants, inferred shapes, producers and consumers, and
the helpers that turn a broken rule into a lint finding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tidlq.tidl.devices import Device

Finding = dict[str, Any]
Shape = list[int | None]  # None: a dimension shape inference could not fix


@dataclass
class GraphInfo:
    """What the per-operator rules read from the graph: constants, inferred shapes, producers and consumers."""

    device: Device
    opset: int
    inits: dict[str, onnx.TensorProto]
    constants: dict[str, np.ndarray]  # outputs of Constant nodes
    shapes: dict[str, Shape]
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]

    @classmethod
    def of(cls, model: onnx.ModelProto, device: Device) -> GraphInfo:
        """Index `model` for `device`; shapes come from shape inference on a copy (the model is not changed)."""
        graph = model.graph
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        return cls(device=device, opset=next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0),
                   inits={t.name: t for t in graph.initializer},
                   constants={n.output[0]: _constant_value(n) for n in graph.node if n.op_type == "Constant"},
                   shapes=_inferred_shapes(model),
                   producer={out: n for n in graph.node for out in n.output},
                   consumers=consumers)

    def is_const(self, name: str) -> bool:
        """True for an initializer or the output of a Constant node."""
        return name in self.inits or name in self.constants

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node output; None for anything computed (or an empty name)."""
        if name in self.constants:
            return self.constants[name]
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def shape(self, name: str) -> Shape | None:
        """The (inferred) shape of a tensor, or None when its rank is unknown."""
        return self.shapes.get(name)

    def signed(self, dq_or_q: onnx.NodeProto) -> bool | None:
        """Whether a Q/DQ node's integer side is signed (int8); None when the zero point's type is unknown."""
        zero = self.const(dq_or_q.input[2]) if len(dq_or_q.input) > 2 and dq_or_q.input[2] else None
        if zero is None and dq_or_q.op_type == "DequantizeLinear":
            zero = self.const(dq_or_q.input[0])
        if zero is None:
            return False if len(dq_or_q.input) < 3 or not dq_or_q.input[2] else None  # no zero point: uint8
        return bool(np.issubdtype(zero.dtype, np.signedinteger))


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    value = helper.get_attribute_value(node.attribute[0])
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.array(value)


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    try:  # infer_shapes works on a serialized copy; a model that is already inferred just comes back the same
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError):  # inconsistent or > 2 GB: use the shapes it holds
        inferred = model
    graph = inferred.graph
    shapes: dict[str, Shape] = {t.name: list(t.dims) for t in graph.initializer}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    return shapes


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """An attribute's value (strings decoded), or `default` when the node does not set it."""
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def finding(node: onnx.NodeProto, rule: str, severity: str, detail: str) -> Finding:
    """One lint finding for `node` (named as TIDL's deny_list names it: node name, else its first output)."""
    return {"node": node.name or node.output[0], "op": node.op_type, "rule": rule, "severity": severity,
            "detail": detail}


def emit(node: onnx.NodeProto, checks: list[tuple[bool, str, str, str]]) -> list[Finding]:
    """The findings of the (broken, rule, severity, detail) checks that are broken."""
    return [finding(node, rule, severity, detail) for broken, rule, severity, detail in checks if broken]


def input_name(node: onnx.NodeProto, index: int) -> str:
    """The name of the node's input `index` ("" when it has fewer inputs)."""
    return node.input[index] if len(node.input) > index else ""


def neg_axis(axis: int, rank: int | None) -> int | None:
    """`axis` counted from the end (-1 = last); None when it is non-negative and the rank is unknown."""
    if axis < 0:
        return axis
    return None if rank is None else axis - rank


def hw(values: tuple) -> str:
    """`3x3` for (3, 3)."""
    return "x".join(str(v) for v in values)
