"""Quantized layers in an exported QDQ model: found by content, measured, and left in float by editing the graph.

"Only this layer in float" is built by editing the exported QDQ model and run in onnxruntime, where the accuracy
that counts is measured: the layer gets its float weight and bias, and the Q/DQ pairs on its output (and on its fused
ReLU/Clip's output) pass the tensor through unrounded, so its consumers read it in float. That is what TIDL's
`output_feature_16bit_names_list` changes (the layer's output and params at higher precision). Rejected:
- FX `set_module_name(name, None)` (re-prepared, or as convert_fx's qconfig_mapping): the weights go float but the
  output keeps its rounding (the consumer's input observer quantizes it), so damage to the activation range is
  missed (before qconfig clamped ReLU6 inputs, a 50x weight outlier that cost 7 dB of logit SQNR gained nothing that
  way). Re-preparing and loading the saved state_dict with strict=False is unsafe too: observers are numbered in
  graph order, so when the first layer's input observer disappears every later one loads its neighbour's statistics.
- Re-exporting each FX variant (export_onnx + clean) costs 1.7-3.4 s per layer on mobilenet_v2_tiny (16x16 and
  32x32, 200 images) against 0.04 s for the graph edit (the whole stage: 1-3 s), and onnxruntime and torch disagree
  on those variants (ResNet with a conv1 outlier: torch +6.9 dB, onnxruntime -6.2 dB). Running them in torch instead
  (x86 engine) costs 0.8-1.3 s per layer and disagrees with onnxruntime by 30-35 dB even when fully quantized.
Only Conv/Linear layers are candidates: damage that lands in another op's rounding is only partly undone by any of
them (a 50x outlier in a projection conv widens the following Add's range: 7 dB lost, 1.2 dB back in float).

ONNX names: the TorchScript exporter names a converted GraphModule's nodes after the leaf attribute only, deduplicated
by call order (`/0_5/Conv` is the sixth module named `0`), and onnxslim re-sorts the graph, so branches (ResNet
shortcuts) leave FX order. Each layer is matched to its Conv/Gemm node by content: the node's int8 weight initializer
(behind its DequantizeLinear) equals the converted module's `weight().int_repr()`; ONNX order is kept as a cross-check
(`onnx_order_agrees`). `onnx_output` is the name TIDL gives the layer: TIDL fuses Conv+ReLU/Clip into one layer whose
output is the activation's, so a Conv whose only consumer (through its Q/DQ) is a Relu or Clip is named by that
activation's output; otherwise by the Conv/Gemm output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.ao.nn.quantized as nnq
from onnx import numpy_helper
from torch import nn

from tidlq.eval import metrics

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm")  # what quantized Conv / Linear modules export to
FUSED_ACTIVATIONS = ("Relu", "Clip")  # TIDL merges these into the preceding Conv (ReLU, ReLU6)


@dataclass(frozen=True)
class Layer:
    """A quantized layer and where it lives in the QDQ model."""

    name: str  # FX module name
    node: str  # its Conv / Gemm node
    onnx_output: str  # the tensor TIDL names the (fused) layer by
    measured: str  # its int8 output as its consumers read it (after the last Q/DQ)
    qdq_pairs: tuple[tuple[str, tuple[str, ...]], ...]  # (QuantizeLinear, its DequantizeLinears) on the output
    weight: np.ndarray  # float weight and bias (BN folded), for the float-only variant
    bias: np.ndarray


def quantized_layers(int8: torch.fx.GraphModule) -> list[str]:
    """Names of the converted model's quantized Conv / Linear modules (fused ReLU variants too), in graph order."""
    weighted = (nnq.modules.conv._ConvNd, nnq.Linear)
    return [str(n.target) for n in int8.graph.nodes
            if n.op == "call_module" and isinstance(int8.get_submodule(str(n.target)), weighted)]


def find_layers(model: onnx.ModelProto, prepared: torch.fx.GraphModule,
                int8: torch.fx.GraphModule) -> tuple[list[Layer], bool]:
    """Every quantized layer with its Conv/Gemm node, matched by int8 weight content; and whether the matched nodes
    come in the same order as the Conv/Gemm nodes of the ONNX graph."""
    candidates: dict[tuple, list[onnx.NodeProto]] = {}
    graph = _Graph(model)
    for node in model.graph.node:
        if node.op_type in LAYER_OPS and (key := graph.int8_weight_key(node)) is not None:
            candidates.setdefault(key, []).append(node)
    layers = []
    for name in quantized_layers(int8):
        w = int8.get_submodule(name).weight().int_repr().numpy()
        found = candidates.get((w.shape, w.tobytes()))
        if not found:
            raise RuntimeError(f"sensitivity: no Conv/Gemm node in the QDQ model has the int8 weights of layer "
                               f"{name!r}; was the QDQ model exported from this prepared model?")
        layers.append(describe(graph, found.pop(0), name, float_params(prepared.get_submodule(name))))
    order = [n.name for n in model.graph.node if n.name in {layer.node for layer in layers}]
    return layers, order == [layer.node for layer in layers]


class _Graph:
    """Producer / consumer lookups over an ONNX graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.inits = {t.name: t for t in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def int8_weight_key(self, node: onnx.NodeProto) -> tuple | None:
        """(shape, bytes) of the int8 initializer behind the node's weight DequantizeLinear, if it has one."""
        dq = self.producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in self.inits:
            return None
        w = numpy_helper.to_array(self.inits[dq.input[0]])
        return (w.shape, w.tobytes()) if w.dtype == np.int8 else None

    def qdq_after(self, tensor: str) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
        """The QuantizeLinear that is `tensor`'s only consumer and the DequantizeLinears reading it, if so."""
        users = self.consumers.get(tensor, [])
        if len(users) != 1 or users[0].op_type != "QuantizeLinear":
            return None
        dqs = self.dequantizers(users[0])
        return None if dqs is None else (users[0], dqs)

    def dequantizers(self, q: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        """The DequantizeLinears reading a QuantizeLinear, if nothing else reads it."""
        dqs = self.consumers.get(q.output[0], [])
        return dqs if dqs and all(d.op_type == "DequantizeLinear" for d in dqs) else None

    def only_activation(self, tensor: str) -> onnx.NodeProto | None:
        """The Relu / Clip that is `tensor`'s only consumer, if so."""
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and users[0].op_type in FUSED_ACTIVATIONS else None


def describe(graph: _Graph, node: onnx.NodeProto, name: str, params: tuple[np.ndarray, np.ndarray]) -> Layer:
    """Follow a Conv/Gemm's output: an activation it feeds directly (FX's fused Conv+ReLU), its Q/DQ, then a
    Relu/Clip that alone reads that Q/DQ (TIDL fuses it) and the activation's Q/DQ. The last float tensor names the
    TIDL layer; the last Q/DQ's output is that layer's int8 output as its consumers read it."""
    tensor = node.output[0]
    if (act := graph.only_activation(tensor)) is not None:
        tensor = act.output[0]
    measured, pairs = tensor, []
    if (qdq := graph.qdq_after(tensor)) is not None:
        q, dqs = qdq
        measured, pairs = dqs[0].output[0], [(q.name, tuple(d.name for d in dqs))]
        act = graph.only_activation(dqs[0].output[0]) if len(dqs) == 1 else None
        if act is not None:
            tensor = act.output[0]
            measured = tensor
            if (qdq := graph.qdq_after(tensor)) is not None:
                pairs.append((qdq[0].name, tuple(d.name for d in qdq[1])))
                measured = qdq[1][0].output[0]
    return Layer(name, node.name, tensor, measured, tuple(pairs), *params)


def float_params(module: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """Float weight and bias of a prepared layer as convert_fx sees them (QAT: BN folded by `to_float`)."""
    if hasattr(module, "to_float"):
        module = module.to_float()
    if isinstance(module, nn.Sequential):  # fused Conv+ReLU / Linear+ReLU
        module = module[0]
    weight = module.weight.detach().float().numpy()
    bias = module.bias.detach().float().numpy() if module.bias is not None else np.zeros(weight.shape[0], np.float32)
    return weight, bias


def layer_sqnrs(model: onnx.ModelProto, layers: list[Layer], x: np.ndarray) -> dict[str, float]:
    """SQNR of each layer's int8 output in onnxruntime against the same tensor of `float_graph`, over all images."""
    tensors = [layer.measured for layer in layers]
    int8 = metrics.session(_with_outputs(model, tensors).SerializeToString())
    reference = metrics.session(_with_outputs(float_graph(model, layers), tensors).SerializeToString())
    sums = np.zeros((len(layers), 2))  # signal, noise
    for i in range(len(x)):
        q, f = (_named_outputs(session, x[i:i + 1]) for session in (int8, reference))
        for j, name in enumerate(tensors):
            ref = f[name].astype(np.float64)
            sums[j] += [np.sum(ref ** 2), np.sum((ref - q[name]) ** 2)]
    with np.errstate(divide="ignore"):
        db = [10.0 * np.log10(signal / noise) if noise > 0 else np.inf for signal, noise in sums]
    return {layer.name: float(value) for layer, value in zip(layers, db, strict=True)}


def with_float_layer(model: onnx.ModelProto, layer: Layer) -> onnx.ModelProto:
    """A copy of the QDQ model in which `layer` runs in float: float weight and bias, and every Q/DQ pair on its
    output turned into a pass-through, so that its consumers read the unrounded tensor."""
    edited = _copy(model)
    nodes = {n.name: n for n in edited.graph.node}
    _use_float_params(edited, nodes[layer.node], layer)
    for q_name, dq_names in layer.qdq_pairs:
        _pass_through(edited, nodes, q_name, dq_names)
    return edited


def float_graph(model: onnx.ModelProto, layers: list[Layer]) -> onnx.ModelProto:
    """The QDQ model with every layer's float weight and bias and every activation Q/DQ pair passed through: the
    float model (BN folded) under the QDQ model's tensor names."""
    edited = _copy(model)
    nodes = {n.name: n for n in edited.graph.node}
    for layer in layers:
        _use_float_params(edited, nodes[layer.node], layer)
    graph = _Graph(edited)
    pairs = [(n.name, dqs) for n in edited.graph.node if n.op_type == "QuantizeLinear"
             and (dqs := graph.dequantizers(n)) is not None]
    for q_name, dqs in pairs:
        _pass_through(edited, nodes, q_name, [d.name for d in dqs])
    return edited


def _use_float_params(model: onnx.ModelProto, node: onnx.NodeProto, layer: Layer) -> None:
    for i, (kind, value) in enumerate((("weight", layer.weight), ("bias", layer.bias)), start=1):
        if i < len(node.input):
            name = f"{layer.node}/float_{kind}"
            model.graph.initializer.append(numpy_helper.from_array(value, name))
            node.input[i] = name


def _pass_through(model: onnx.ModelProto, nodes: dict[str, onnx.NodeProto], q_name: str,
                  dq_names: Sequence[str]) -> None:
    """Drop a QuantizeLinear and turn its DequantizeLinears into Identity nodes (their outputs keep their names)."""
    source = nodes[q_name].input[0]
    for name in dq_names:
        dq = nodes[name]
        dq.op_type, dq.input[:] = "Identity", [source]
        del dq.attribute[:]
    model.graph.node.remove(nodes[q_name])


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied


def _with_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also returns the given intermediate float tensors."""
    extended = _copy(model)
    present = {o.name for o in extended.graph.output}
    for name in dict.fromkeys(tensors):
        if name not in present:
            extended.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return extended


def _named_outputs(session: ort.InferenceSession, x: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: x}), strict=True))


def onnx_logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Logits of an in-memory ONNX model (`metrics.onnx_logits`)."""
    return metrics.onnx_logits(model.SerializeToString(), x)
