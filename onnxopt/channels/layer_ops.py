"""How layers create channels with their own weights and read them.

Conv, ConvTranspose (``group=1``), Gemm and MatMul with a constant 2-D right operand
create a new space of channels; the input channels of their weights end the channels
they read. A depthwise convolution filters channel ``c`` alone, so its kernel goes with
the channels it reads; any other grouped convolution blocks them.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..graph import const_through_shape_ops
from .flow import ChannelFlow, label
from .layout import Layout, Seg

__all__ = ["LAYER_RULES"]


def conv(flow: ChannelFlow, node: gs.Node) -> None:
    x = node.inputs[0]
    lay = flow.lay(x)
    where = label(node)
    for t in node.inputs[1:]:
        flow.block_layout(flow.lay(t), f"weights: {where} reads the channels as weights")
    w = const_through_shape_ops(node.inputs[1]) if len(node.inputs) > 1 else None
    group = int(node.attrs.get("group", 1))
    transpose = node.op == "ConvTranspose"
    if w is None or w.ndim < 3:
        flow.skipped["weights are not constant"] += 1
        flow.block_layout(lay, f"weights: {where} has no constant weights")
        return
    # Conv weights are [out, in/group, k...]; ConvTranspose weights [in, out/group, k...].
    cin = w.shape[0] if transpose else w.shape[1] * group
    cout = w.shape[1] * group if transpose else w.shape[0]
    has_bias = len(node.inputs) > 2 and node.inputs[2].name != ""
    bias_ok = not has_bias or const_through_shape_ops(node.inputs[2]) is not None
    if lay is not None and (lay.axis != 1 or lay.width != cin):
        flow.block_layout(lay, f"layout: {where} reads the channels on another axis")
        lay = None
    out = node.outputs[0]
    if group == 1:
        if lay is not None:
            flow.member("slice", node, 1, 0 if transpose else 1, lay, "in")
        if not bias_ok:
            return
        space = flow.new_space(cout, where)
        olay = Layout(1, w.ndim, (Seg(space, 0, cout),))
        flow.member("slice", node, 1, 1 if transpose else 0, olay, "out")
        if has_bias:
            flow.member("slice", node, 2, 0, olay, "bias")
        flow.set(out, olay)
        return
    if group == cin and cout == cin and w.shape[1] == 1:
        # Depthwise: output channel c filters input channel c only; both go together.
        if lay is None:
            return
        if not bias_ok:
            flow.block_layout(lay, f"weights: {where} has a computed bias")
            return
        flow.member("slice", node, 1, 0, lay, "tied")
        if has_bias:
            flow.member("slice", node, 2, 0, lay, "bias")
        flow.member("group", node, 1, 0, lay, "attr")
        flow.set(out, Layout(1, w.ndim, lay.segs))
        return
    flow.skipped["grouped convolution"] += 1
    flow.block_layout(lay, f"grouped: {where} is a grouped convolution (group={group})")


def gemm(flow: ChannelFlow, node: gs.Node) -> None:
    a = node.inputs[0]
    lay = flow.lay(a)
    for t in node.inputs[1:]:
        flow.block_layout(flow.lay(t), f"weights: {label(node)} reads the channels as weights")
    where = label(node)
    w = const_through_shape_ops(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim != 2:
        flow.skipped["weights are not constant"] += 1
        flow.block_layout(lay, f"weights: {where} has no constant weights")
        return
    trans_a = int(node.attrs.get("transA", 0))
    trans_b = int(node.attrs.get("transB", 0))
    k_axis, n_axis = (1, 0) if trans_b else (0, 1)
    if lay is not None:
        if trans_a or lay.axis != 1 or lay.width != w.shape[k_axis]:
            flow.block_layout(lay, f"layout: {where} reads the channels on another axis")
        else:
            flow.member("slice", node, 1, k_axis, lay, "in")
    n = w.shape[n_axis]
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = const_through_shape_ops(node.inputs[2])
        if bias is None:
            return
    space = flow.new_space(n, where)
    olay = Layout(1, 2, (Seg(space, 0, n),))
    flow.member("slice", node, 1, n_axis, olay, "out")
    if bias is not None and bias.ndim >= 1 and bias.shape[-1] == n and n > 1:
        flow.member("slice", node, 2, bias.ndim - 1, olay, "bias")
    elif bias is not None and bias.size != 1 and (bias.ndim == 0 or bias.shape[-1] != 1):
        flow.block([space], f"weights: {where} has a bias of shape {list(bias.shape)}")
    flow.set(node.outputs[0], olay)


def matmul(flow: ChannelFlow, node: gs.Node) -> None:
    a, b = node.inputs[0], node.inputs[1]
    la, lb = flow.lay(a), flow.lay(b)
    where = label(node)
    w = const_through_shape_ops(b)
    flow.block_layout(lb, f"weights: {where} multiplies by the channels")
    if w is None or w.ndim != 2:
        flow.block_layout(la, f"weights: {where} has no constant 2-D weights")
        return
    ra = flow.rank(a)
    if la is not None:
        if la.axis != la.rank - 1 or la.width != w.shape[0]:
            flow.block_layout(la, f"layout: {where} reads the channels on another axis")
        else:
            flow.member("slice", node, 1, 0, la, "in")
    if ra is None or ra < 2:
        return
    n = w.shape[1]
    space = flow.new_space(n, where)
    olay = Layout(ra - 1, ra, (Seg(space, 0, n),))
    flow.member("slice", node, 1, 1, olay, "out")
    flow.set(node.outputs[0], olay)


#: The layer ops, by op type: the walk runs them whether or not an input has channels.
LAYER_RULES = {"Conv": conv, "ConvTranspose": conv, "Gemm": gemm, "MatMul": matmul}
