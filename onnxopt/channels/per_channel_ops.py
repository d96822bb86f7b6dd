"""How ops that keep channels apart carry them: activations, elementwise arithmetic,
normalizations, pooling, reductions, quantization.

Pointwise ops pass a layout through. Elementwise ops that combine two tensors with
channels (a residual ``Add``) join their spaces; a constant operand with one value per
channel becomes a member to slice. Ops that mix the channels (a Softmax or reduction
over them, pooling across them) block every group they touch.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..graph import const_through_shape_ops
from .flow import ChannelFlow, ints_given, label

__all__ = ["PER_CHANNEL_RULES", "ELEMENTWISE"]

UNARY = frozenset("""
    Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Elu Selu Celu Gelu Softplus Softsign
    Mish Exp Log Abs Neg Sqrt Reciprocal Clip Floor Ceil Round Sign Erf Sin Cos Tan Asin Acos Atan
    Sinh Cosh Asinh Acosh Atanh Identity Cast Not IsNaN IsInf ThresholdedRelu Shrink Swish
    BitwiseNot
""".split())
ELEMENTWISE = frozenset("""
    Add Sub Mul Div Pow Max Min Sum Mean PRelu Where Equal Less Greater LessOrEqual
    GreaterOrEqual And Or Xor Mod BitShift BitwiseAnd BitwiseOr BitwiseXor
""".split())
POOL = frozenset("""
    MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool
""".split())
REDUCE = frozenset("""
    ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceSumSquare
""".split())


def unary(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    for t in node.inputs[1:]:
        if t.name and node.op == "Clip":
            v = const_through_shape_ops(t)
            if v is None or v.size != 1:
                flow.block_layout(lay, f"param: {label(node)} has non-scalar bounds")
    if lay is None:
        return
    for out in node.outputs:
        if out.name:
            flow.set(out, lay)


def dropout(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    for out in node.outputs:
        if out.name:
            flow.set(out, lay)


def elementwise(flow: ChannelFlow, node: gs.Node) -> None:
    where = label(node)
    ranks = [flow.rank(t) if t.name else 0 for t in node.inputs]
    with_lay = [(i, flow.lay(t)) for i, t in enumerate(node.inputs) if flow.lay(t) is not None]
    all_lays = [lay for _, lay in with_lay]
    if any(r is None for r in ranks):
        for lay in all_lays:
            flow.block_layout(lay, f"shape: {where} has an operand of unknown rank")
        return
    out_rank = max(ranks)
    axes = {lay.axis + out_rank - lay.rank for lay in all_lays}
    if len(axes) != 1:
        for lay in all_lays:
            flow.block_layout(lay, f"layout: {where} combines channels on different axes")
        return
    axis = axes.pop()
    base = all_lays[0]
    ok = True
    for lay in all_lays[1:]:
        ok &= flow.join(base, lay, where)
    for i, t in enumerate(node.inputs):
        if not t.name or flow.lay(t) is not None:
            continue
        r = ranks[i]
        ax = axis - (out_rank - r)
        if ax < 0:
            continue
        shape = flow.shape(t)
        d = shape[ax] if shape is not None else None
        if d == 1:
            continue
        value = const_through_shape_ops(t)
        if value is not None and d == base.width:
            if node.op == "Where" and i == 0:
                flow.block_layout(base, f"param: {where} selects with a per-channel condition")
                ok = False
                continue
            flow.member("slice", node, i, ax, base.moved(axis, out_rank), "param")
            continue
        flow.block_layout(base, f"layout: {where} combines the channels with a tensor that does not carry them")
        ok = False
    if not ok:
        return
    for out in node.outputs:
        flow.set(out, base.moved(axis, out_rank))


def pool(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    if lay.axis != 1:
        flow.block_layout(lay, f"layout: {label(node)} pools over the channel axis")
        return
    if len(node.outputs) > 1 and node.outputs[1].name and node.outputs[1].outputs:
        flow.block_layout(lay, f"op: {label(node)} returns indices that count channels")
        return
    flow.set(node.outputs[0], lay)


def batch_normalization(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    where = label(node)
    if len([o for o in node.outputs if o.name]) > 1 or int(node.attrs.get("training_mode", 0)):
        flow.block_layout(lay, f"op: {where} is in training mode")
        return
    if lay.axis != 1:
        flow.block_layout(lay, f"layout: {where} normalizes another axis")
        return
    roles = ("bn_scale", "bn_bias", "bn_mean", "bn_var")
    for i in range(1, 5):
        v = const_through_shape_ops(node.inputs[i])
        if v is None or v.shape != (lay.width,):
            flow.block_layout(lay, f"weights: {where} has non-constant parameters")
            return
    for i in range(1, 5):
        flow.member("slice", node, i, 0, lay, roles[i - 1])
    flow.set(node.outputs[0], lay)


def instance_normalization(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    where = label(node)
    if lay.axis != 1 or lay.inner != 1:
        flow.block_layout(lay, f"layout: {where} normalizes another axis")
        return
    for i in (1, 2):
        v = const_through_shape_ops(node.inputs[i])
        if v is None or v.shape != (lay.width,):
            flow.block_layout(lay, f"weights: {where} has non-constant parameters")
            return
    flow.member("slice", node, 1, 0, lay, "param")
    flow.member("slice", node, 2, 0, lay, "param")
    flow.set(node.outputs[0], lay)


def layer_normalization(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    axis = int(node.attrs.get("axis", -1)) % lay.rank
    if lay.axis >= axis:
        flow.block_layout(lay, f"reduce: {label(node)} normalizes across the channels")
        return
    flow.set(node.outputs[0], lay)


def softmax_like(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    opset = flow.model.opset_imports.get("", 13)
    axis = int(node.attrs.get("axis", -1 if opset >= 13 else 1)) % lay.rank
    if lay.axis == axis or (opset < 13 and lay.axis >= axis):
        flow.block_layout(lay, f"reduce: {label(node)} normalizes across the channels")
        return
    flow.set(node.outputs[0], lay)


def reduce(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    axes, computed = ints_given(node, "axes", 1)
    if computed:
        flow.block_layout(lay, f"reduce: {label(node)} reduces computed axes")
        return
    if not axes:
        if int(node.attrs.get("noop_with_empty_axes", 0)):
            flow.set(node.outputs[0], lay)
            return
        flow.block_layout(lay, f"reduce: {label(node)} reduces across the channels")
        return
    axes = sorted(a % lay.rank for a in axes)
    if lay.axis in axes:
        flow.block_layout(lay, f"reduce: {label(node)} reduces across the channels")
        return
    if int(node.attrs.get("keepdims", 1)):
        flow.set(node.outputs[0], lay)
    else:
        shift = sum(1 for a in axes if a < lay.axis)
        flow.set(node.outputs[0], lay.moved(lay.axis - shift, lay.rank - len(axes)))


def arg_reduce(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    axis = int(node.attrs.get("axis", 0)) % lay.rank
    if axis == lay.axis:
        flow.block_layout(lay, f"reduce: {label(node)} reduces across the channels")
        return
    if int(node.attrs.get("keepdims", 1)):
        flow.set(node.outputs[0], lay)
    else:
        flow.set(node.outputs[0], lay.moved(lay.axis - (1 if axis < lay.axis else 0), lay.rank - 1))


def quant(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    where = label(node)
    if int(node.attrs.get("block_size", 0)):
        flow.block_layout(lay, f"op: {where} quantizes in blocks")
        return
    axis = int(node.attrs.get("axis", 1)) % lay.rank
    for i in (1, 2):
        if i >= len(node.inputs) or not node.inputs[i].name:
            continue
        v = const_through_shape_ops(node.inputs[i])
        if v is None:
            flow.block_layout(lay, f"weights: {where} has computed quantization parameters")
            return
        if v.size == 1:
            continue
        if axis != lay.axis or v.shape != (lay.width,):
            flow.block_layout(lay, f"layout: {where} quantizes per channel on another axis")
            return
        flow.member("slice", node, i, 0, lay, "param")
    flow.set(node.outputs[0], lay)


def cast_like(flow: ChannelFlow, node: gs.Node) -> None:
    flow.set(node.outputs[0], flow.lay(node.inputs[0]))


#: Rules by op type.
PER_CHANNEL_RULES = {
    **{op: unary for op in UNARY},
    **{op: elementwise for op in ELEMENTWISE},
    **{op: pool for op in POOL},
    **{op: reduce for op in REDUCE},
    "Dropout": dropout,
    "BatchNormalization": batch_normalization,
    "InstanceNormalization": instance_normalization,
    "LayerNormalization": layer_normalization,
    "Softmax": softmax_like, "LogSoftmax": softmax_like, "Hardmax": softmax_like,
    "ArgMax": arg_reduce, "ArgMin": arg_reduce,
    "QuantizeLinear": quant, "DequantizeLinear": quant,
    "CastLike": cast_like,
}
