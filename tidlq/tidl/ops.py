"""Per-operator TIDL constraints (reference/tidl.md §3, from TI's `docs/supported_ops_rts_versions.md`, 11.0).

One checker per operator family, `check_<family>(node, graph) -> findings`; `tidlq.tidl.lint.check` dispatches to them
by op type. Each docstring quotes the constraint it enforces. A supported operator that breaks one of its constraints is
not offloaded: TIDL leaves that node to the Arm cores ("arm"). Kernels outside what TI validated give "warn".
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from tidlq.tidl.graph_info import Finding, GraphInfo, Shape, attr, emit, hw, input_name, neg_axis

DEPTHWISE_OK = {(3, 1), (3, 2), (5, 2), (7, 1), (7, 2)}  # (square kernel, stride) of TIDL's depthwise conv


def check_conv(node: onnx.NodeProto, g: GraphInfo) -> list[Finding]:
    """tidl.md §3 row 1, Conv: 'stride equal in H and W; 3×3 stride 3 not supported on AM62A/AM67A; kernel > 7 with
    stride 2 not supported; depthwise only 3×3s1, 3×3s2, 5×5s2, 7×7s1, 7×7s2; stride 4 only with 11×11'. The older
    TDA4VM table adds 'dilation only for non-strided convolution' (warn on TDA4VM/AM68PA only)."""
    weight = g.shape(input_name(node, 1)) or []
    kernel = tuple(attr(node, "kernel_shape") or weight[2:])
    if len(kernel) != 2 or None in kernel:
        return []
    strides = tuple(attr(node, "strides", [1, 1]))
    dilations = tuple(attr(node, "dilations", [1, 1]))
    group = attr(node, "group", 1)
    depthwise = group > 1 and group == _in_channels(node, g, group, weight)
    dw_ok = kernel[0] == kernel[1] and strides[0] == strides[1] and (kernel[0], strides[0]) in DEPTHWISE_OK
    ks = f"kernel {hw(kernel)}, stride {hw(strides)}"
    return emit(node, [
        (strides[0] != strides[1], "Conv equal H/W stride", "arm", f"stride {hw(strides)}: TIDL needs the same "
         "stride in H and W"),
        (depthwise and not dw_ok, "Conv depthwise kernel/stride", "arm", f"depthwise ({ks}, group {group}): TIDL "
         "takes only 3x3s1, 3x3s2, 5x5s2, 7x7s1, 7x7s2"),
        (max(kernel) > 7 and 2 in strides, "Conv kernel > 7 with stride 2", "arm", f"{ks}: kernels above 7 are not "
         "supported with stride 2"),
        (4 in strides and kernel != (11, 11), "Conv stride 4 only 11x11", "arm", f"{ks}: stride 4 needs an 11x11 "
         "kernel"),
        (not g.device.conv3x3_stride3 and kernel == (3, 3) and 3 in strides, "Conv 3x3 stride 3 on am62a/am67a",
         "arm", f"{ks}: not supported on {g.device.name}"),
        (g.device.mmav1 and max(dilations) > 1 and max(strides) > 1, "Conv dilation without stride", "warn",
         f"dilation {hw(dilations)} with stride {hw(strides)}: {g.device.name} supports dilation only without "
         "stride"),
    ])


def _in_channels(node: onnx.NodeProto, g: GraphInfo, group: int, weight: Shape) -> int | None:
    data = g.shape(node.input[0])
    if data and len(data) > 1 and data[1] is not None:
        return data[1]
    return group * weight[1] if len(weight) > 1 and weight[1] is not None else None  # weight is [O, C/group, kH, kW]


POOL_VALIDATED = {(3, 3), (2, 2), (1, 1)}


def check_pool(node: onnx.NodeProto, g: GraphInfo) -> list[Finding]:
    """tidl.md §3 row 2, AveragePool / MaxPool: 'dilation 1; storage_order 0; validated kernels 3×3, 2×2, 1×1 with
    stride 1/2'. Other kernels and strides may work but are not validated: warn."""
    kernel = tuple(attr(node, "kernel_shape", []))
    strides = tuple(attr(node, "strides", [1] * len(kernel)))
    dilations = tuple(attr(node, "dilations", [1] * len(kernel)))
    order = attr(node, "storage_order", 0)
    return emit(node, [
        (kernel not in POOL_VALIDATED or not set(strides) <= {1, 2}, "pool kernel 3x3/2x2/1x1, stride 1/2", "warn",
         f"kernel {hw(kernel)}, stride {hw(strides)}: TI validated 3x3, 2x2, 1x1 with stride 1 or 2"),
        (set(dilations) != {1}, "pool dilation 1", "arm", f"dilation {hw(dilations)}: TIDL pools need dilation 1"),
        (order != 0, "MaxPool storage_order 0", "arm", f"storage_order {order}: TIDL needs 0 (row major)"),
    ])


def check_global_pool(node: onnx.NodeProto, g: GraphInfo) -> list[Finding]:
    """tidl.md §3 row 2, GlobalAveragePool: 'for GAP with H×W > 1024 use the optimizer's matmul rule' (the optimizer
    skips QDQ models, §2, so the rewrite has to happen in the float model)."""
    shape = g.shape(node.input[0])
    if not shape or len(shape) < 3 or None in shape[2:]:
        return []
    area = math.prod(shape[2:])
    return emit(node, [(area > 1024, "GlobalAveragePool H*W <= 1024", "arm",
                         f"H*W = {area} ({hw(tuple(shape[2:]))}): above 1024, rewrite the pooling as a MatMul")])


def check_gemm(node: onnx.NodeProto, g: GraphInfo) -> list[Finding]:
    """tidl.md §3 row 6, Gemm: 'bias [N] or [1,N]; transA = 0, alpha = beta = 1 (otherwise convert to MatMul + Add)'."""
    trans_a, alpha, beta = attr(node, "transA", 0), attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    bias = g.shape(input_name(node, 2)) if input_name(node, 2) else None
    out = g.shape(node.output[0])
    n = out[-1] if out else None
    bias_ok = bias is None or (len(bias) in (1, 2) and bias[:-1] in ([], [1]) and (n is None or bias[-1] == n))
    return emit(node, [
        (trans_a != 0, "Gemm transA 0", "arm", f"transA {trans_a}: TIDL needs 0 (or convert to MatMul + Add)"),
        (alpha != 1 or beta != 1, "Gemm alpha = beta = 1", "arm", f"alpha {alpha:g}, beta {beta:g}: TIDL needs 1 "
         "and 1 (or convert to MatMul + Add)"),
        (not bias_ok, "Gemm bias [N] or [1,N]", "arm", f"bias shape {bias} for N = {n}: TIDL needs [N] or [1,N]"),
    ])


def check_matmul(node: onnx.NodeProto, g: GraphInfo) -> list[Finding]:
    """tidl.md §2 "MatMul": 'MatMul with signed inputs & unsigned output is not supported', and 'MatMul with signed &
    unsigned input combination is not supported in TDA4VM'. Signs are read from the Q/DQ around the MatMul."""
    dqs = [g.producer.get(name) for name in node.input[:2]]
    if any(dq is None or dq.op_type != "DequantizeLinear" for dq in dqs):
        return []
    signs = [g.signed(dq) for dq in dqs]
    qs = [n for n in g.consumers.get(node.output[0], []) if n.op_type == "QuantizeLinear"]
    out = g.signed(qs[0]) if qs else None
    kind = ["int8" if s else "uint8" for s in signs]
    return emit(node, [
        (signs == [True, True] and out is False, "MatMul signed inputs need signed output", "arm",
         "int8 x int8 inputs with a uint8 output: TIDL does not support it"),
        (g.device.mmav1 and None not in signs and signs[0] != signs[1], "MatMul input signs match (tda4vm)",
         "arm", f"{kind[0]} x {kind[1]} inputs: {g.device.name} does not mix signed and unsigned MatMul inputs"),
    ])


def check_resize(node: onnx.NodeProto, g: GraphInfo) -> list[Finding]:
    """tidl.md §3 row 16, Upsample / Resize: 'nearest or linear; H/W only; scale ≥ 1; equal H/W scales; power-of-2
    scales only; antialias 0; keep_aspect_ratio_policy stretch; coordinate mode half_pixel, pytorch_half_pixel or
    asymmetric (nearest_mode round_prefer_ceil for half_pixel modes, floor for asymmetric; no linear with
    asymmetric); exclude_outside 0'."""
    return _resize_mode_rules(node, g) + _resize_scale_rules(node, g)


HALF_PIXEL_MODES = ("half_pixel", "pytorch_half_pixel")


def _resize_mode_rules(node: onnx.NodeProto, g: GraphInfo) -> list[Finding]:
    modern = node.op_type == "Resize" and g.opset >= 11  # Resize-10 and Upsample have asymmetric, floor semantics
    mode = attr(node, "mode", "nearest")
    coord = attr(node, "coordinate_transformation_mode", "half_pixel") if modern else "asymmetric"
    rounding = attr(node, "nearest_mode", "round_prefer_floor") if modern else "floor"
    wanted = "floor" if coord == "asymmetric" else "round_prefer_ceil"
    extras = {k: attr(node, k, v) for k, v in (("antialias", 0), ("exclude_outside", 0),
                                                ("keep_aspect_ratio_policy", "stretch"))}
    linear = mode in ("linear", "bilinear")  # Upsample-7 spells it bilinear
    return emit(node, [
        (mode not in ("nearest", "linear", "bilinear"), "Resize mode nearest or linear", "arm",
         f"mode {mode}: TIDL resizes with nearest or linear only"),
        (coord not in (*HALF_PIXEL_MODES, "asymmetric"), "Resize coordinate mode", "arm",
         f"coordinate_transformation_mode {coord}: TIDL takes half_pixel, pytorch_half_pixel or asymmetric"),
        (linear and coord == "asymmetric", "Resize linear not with asymmetric", "arm",
         f"mode {mode} with coordinate_transformation_mode asymmetric: not supported"),
        (mode == "nearest" and coord in (*HALF_PIXEL_MODES, "asymmetric") and rounding != wanted,
         "Resize nearest_mode", "arm", f"nearest_mode {rounding} with {coord}: TIDL needs {wanted}"),
        (extras != {"antialias": 0, "exclude_outside": 0, "keep_aspect_ratio_policy": "stretch"},
         "Resize antialias/exclude_outside/aspect policy", "arm",
         f"{extras}: TIDL needs antialias 0, exclude_outside 0, keep_aspect_ratio_policy stretch"),
    ])


def _resize_scale_rules(node: onnx.NodeProto, g: GraphInfo) -> list[Finding]:
    scales = _resize_scales(node, g)
    if scales is None or len(scales) < 2:
        return []
    other, (sh, sw) = scales[:-2], scales[-2:]
    shown = "[" + ", ".join(f"{s:g}" for s in scales) + "]"
    power_of_2 = all(s > 0 and math.log2(s).is_integer() for s in (sh, sw))
    return emit(node, [
        (any(s != 1 for s in other), "Resize on H/W only", "arm", f"scales {shown}: TIDL resizes H and W only"),
        (min(sh, sw) < 1, "Resize scale >= 1", "arm", f"scales {shown}: TIDL only upsamples (scale >= 1)"),
        (not math.isclose(sh, sw), "Resize equal H/W scales", "arm", f"scales {shown}: H scale {sh:g} != W scale "
         f"{sw:g}"),
        (not power_of_2, "Resize power-of-2 scales", "arm", f"scales {shown}: H/W scale {sh:g}x{sw:g} is not a "
         "power of 2 (1, 2, 4, ...)"),
    ])


def _resize_scales(node: onnx.NodeProto, g: GraphInfo) -> list[float] | None:
    """Per-axis scales: the `scales` input (Constant or initializer; Upsample-7: attribute), else `sizes` or the
    inferred output shape divided by the input shape. None when none of these is known."""
    modern = node.op_type == "Resize" and g.opset >= 11  # Resize-11+: X, roi, scales, sizes
    if node.op_type == "Upsample" and g.opset < 9:
        scales = np.array(attr(node, "scales", []))
    else:
        scales = g.const(input_name(node, 2 if modern else 1))
    shape_in = g.shape(node.input[0])
    axes = attr(node, "axes")  # Resize-18: scales / sizes list only these axes
    if axes is not None:
        if shape_in is None:
            return None
        axes = [a % len(shape_in) for a in axes]
    if scales is not None and scales.size:
        full = [1.0] * len(shape_in) if axes else []
        return _scatter(full, axes, [float(s) for s in scales.ravel()])
    sizes = g.const(input_name(node, 3)) if modern else None
    shape_out = _scatter(list(shape_in or []), axes, sizes.ravel().tolist()) if sizes is not None else None
    shape_out = shape_out or g.shape(node.output[0])
    if not shape_in or not shape_out or len(shape_in) != len(shape_out) or None in shape_in + shape_out:
        return None
    return [o / i if i else 1.0 for i, o in zip(shape_in, shape_out, strict=True)]


def _scatter(full: list, axes: list[int] | None, values: list) -> list:
    """`values` as the full per-axis list: themselves, or written at `axes` into `full`."""
    if axes is None:
        return values
    for axis, value in zip(axes, values, strict=False):
        full[axis] = value
    return full


def check_concat(node: onnx.NodeProto, g: GraphInfo) -> list[Finding]:
    """tidl.md §3 row 11, Concat: 'axis −3, −2 or −1; not along batch; ≤6-D'. For a rank-r input: axis r-3, r-2 or
    r-1 (a lower-rank tensor is read as the trailing dimensions of TIDL's 4-D view)."""
    axis = attr(node, "axis", 1)
    rank = len(shape) if (shape := g.shape(node.input[0])) is not None else None
    neg = neg_axis(axis, rank)
    return emit(node, [(neg is not None and neg < -3, "Concat not on batch axis", "arm",
                         f"axis {axis} of a {rank}-D input: TIDL concatenates along C, H or W (axis -3, -2, -1)")])


def check_softmax(node: onnx.NodeProto, g: GraphInfo) -> list[Finding]:
    """tidl.md §3 row 8, Softmax: '≤6-D; W or H axis only'."""
    axis = attr(node, "axis", -1 if g.opset >= 13 else 1)
    rank = len(shape) if (shape := g.shape(node.input[0])) is not None else None
    neg = neg_axis(axis, rank)
    return emit(node, [(neg is not None and neg not in (-1, -2), "Softmax on H or W axis", "arm",
                         f"axis {axis} of a {rank}-D input: TIDL's softmax runs along W or H (the last two axes)")])


def check_argmax(node: onnx.NodeProto, g: GraphInfo) -> list[Finding]:
    """tidl.md §3 row 15, ArgMax: 'keepdims = 1; axis = −3; ≤4-D; select_last_index = 0' (the channel axis)."""
    axis, keepdims, last = attr(node, "axis", 0), attr(node, "keepdims", 1), attr(node, "select_last_index", 0)
    rank = len(shape) if (shape := g.shape(node.input[0])) is not None else None
    neg = neg_axis(axis, rank)
    return emit(node, [
        (keepdims != 1, "ArgMax keepdims 1", "arm", f"keepdims {keepdims}: TIDL needs 1"),
        (neg is not None and neg != -3, "ArgMax on channel axis", "arm",
         f"axis {axis} of a {rank}-D input: TIDL's ArgMax runs along the channel axis (-3)"),
        (last != 0, "ArgMax select_last_index 0", "arm", f"select_last_index {last}: TIDL needs 0"),
    ])


def check_reduce(node: onnx.NodeProto, g: GraphInfo) -> list[Finding]:
    """tidl.md §3 row 20, ReduceMin / ReduceMax: 'along H only; keepdims = 1'."""
    axes = attr(node, "axes") if g.opset < 18 else g.const(input_name(node, 1))  # Reduce*-18 moved axes to an input
    keepdims = attr(node, "keepdims", 1)
    rank = len(shape) if (shape := g.shape(node.input[0])) is not None else None
    if axes is None or not len(axes):
        on_h = bool(attr(node, "noop_with_empty_axes", 0))  # no axes: all of them, unless it is a no-op
    else:
        negs = [neg_axis(int(a), rank) for a in np.ravel(axes)]
        on_h = None in negs or negs == [-2]
    axes_text = "none (all axes)" if axes is None or not len(axes) else list(np.ravel(axes).tolist())
    return emit(node, [
        (not on_h, "Reduce along H only", "arm", f"axes {axes_text} of a {rank}-D input: TIDL reduces along H "
         "(axis -2) only"),
        (keepdims != 1, "Reduce keepdims 1", "arm", f"keepdims {keepdims}: TIDL needs 1"),
    ])


def check_pad(node: onnx.NodeProto, g: GraphInfo) -> list[Finding]:
    """tidl.md §3 row 19, Pad: '≤6 dims; constant mode; H/W only'."""
    mode = attr(node, "mode", "constant")
    pads = attr(node, "pads") if g.opset < 11 else g.const(input_name(node, 1))  # Pad-11 moved pads to an input
    pads = None if pads is None else [int(p) for p in np.ravel(pads)]
    axes = g.const(input_name(node, 3)) if g.opset >= 18 else None
    off_hw = [] if pads is None else _padded_offhw(pads, axes, g.shape(node.input[0]))
    return emit(node, [
        (mode != "constant", "Pad constant mode", "arm", f"mode {mode}: TIDL pads with a constant only"),
        (bool(off_hw), "Pad on H/W only", "arm", f"pads {pads} pad axes {off_hw}: TIDL pads H and W (the last two "
         "axes) only"),
    ])


def _padded_offhw(pads: list[int], axes: np.ndarray | None, shape: Shape | None) -> list[int]:
    """The padded axes other than H and W; `pads` holds the begins of each axis, then the ends (Pad-18: of `axes`)."""
    n = len(pads) // 2
    rank = n if axes is None else (len(shape) if shape is not None else None)
    axes_list = list(range(n)) if axes is None else [int(a) for a in np.ravel(axes)]
    padded = [a for a, begin, end in zip(axes_list, pads[:n], pads[n:], strict=True) if begin or end]
    return [a for a in padded if (neg := neg_axis(a, rank)) is not None and neg not in (-1, -2)]


def check_reshape(node: onnx.NodeProto, g: GraphInfo) -> list[Finding]:
    """tidl.md §3 row 26, Reshape: 'constant shape; ≤6-D; no allowzero; same volume'."""
    allowzero = attr(node, "allowzero", 0)
    shape_in = input_name(node, 1)  # empty before Reshape-5, whose shape is an attribute
    return emit(node, [
        (bool(shape_in) and not g.is_const(shape_in), "Reshape constant shape", "arm",
         f"shape {shape_in!r} is computed in the graph: TIDL needs an initializer or Constant"),
        (allowzero != 0, "Reshape allowzero 0", "arm", f"allowzero {allowzero}: TIDL needs 0"),
    ])


def check_slice(node: onnx.NodeProto, g: GraphInfo) -> list[Finding]:
    """tidl.md §3 row 12, Slice: '4 inputs (data ≤4-D plus 3 constant 1-D inputs); batch 1'. Batch is every
    dimension before the last three (TIDL's N of NCHW)."""
    shape = g.shape(node.input[0]) or []
    batch = shape[:-3]
    # Slice-1 has starts/ends/axes as attributes; Slice-10 takes them (and steps) as inputs.
    computed = [name for name in node.input[1:4] if name and not g.is_const(name)]
    return emit(node, [
        (any(d is not None and d != 1 for d in batch), "Slice batch 1", "arm",
         f"input shape {shape}: TIDL slices batch-1 tensors only"),
        (bool(computed), "Slice constant starts/ends/axes", "arm", f"{computed} computed in the graph: TIDL needs "
         "starts, ends and axes as initializers or Constants"),
    ])
