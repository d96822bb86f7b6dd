"""How ops that move, cut or join the channel axis carry the channels.

Transpose, Squeeze/Unsqueeze and Gather move the axis; Flatten and a Reshape that merges
the channels with the dimensions after them make each channel a block of positions;
Concat makes several segments and Split/Slice partial ones, with their sizes and bounds
as members to rewrite; Resize, Pad, Tile and Expand keep the channels when they leave
that axis alone. A reshape that splits or moves the channel axis, or any shape that
cannot be read, blocks the groups it touches.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import const_through_shape_ops
from .flow import ChannelFlow, ints_given, label
from .layout import FIXED, Layout, Seg, merge_fixed, sub_layout

__all__ = ["SHAPE_RULES"]


def _prod(dims) -> int | None:
    total = 1
    for d in dims:
        if not isinstance(d, (int, np.integer)) or d < 0:
            return None
        total *= int(d)
    return total


def _squeeze_ones(dims) -> tuple:
    return tuple(d for d in dims if d != 1)


def resize(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    where = label(node)
    axes = node.attrs.get("axes")
    rank = lay.rank
    pos = lay.axis
    if axes is not None:
        axes = [a % rank for a in axes]
        if lay.axis not in axes:
            flow.set(node.outputs[0], lay)
            return
        pos = axes.index(lay.axis)
    scales = const_through_shape_ops(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    sizes = const_through_shape_ops(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
    if scales is not None and scales.size:
        if scales.size > pos and float(scales[pos]) == 1.0:
            flow.set(node.outputs[0], lay)
            return
        flow.block_layout(lay, f"layout: {where} scales the channel axis")
        return
    if sizes is not None and sizes.size > pos and int(sizes[pos]) == lay.width:
        flow.member("shape", node, 3, 0, lay, "shape", pos=pos, factor=1)
        flow.set(node.outputs[0], lay)
        return
    flow.block_layout(lay, f"shape: {where} has computed scales or sizes")


def upsample(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    scales = node.attrs.get("scales")
    if scales is None and len(node.inputs) > 1:
        v = const_through_shape_ops(node.inputs[1])
        scales = None if v is None else list(np.ravel(v))
    if scales is not None and len(scales) > lay.axis and float(scales[lay.axis]) == 1.0:
        flow.set(node.outputs[0], lay)
        return
    flow.block_layout(lay, f"layout: {label(node)} scales the channel axis")


def pad(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    where = label(node)
    pads, _ = ints_given(node, "pads", 1)
    axes = None
    if len(node.inputs) > 3 and node.inputs[3].name:
        v = const_through_shape_ops(node.inputs[3])
        if v is None:
            flow.block_layout(lay, f"shape: {where} pads computed axes")
            return
        axes = [int(a) % lay.rank for a in np.ravel(v)]
    if pads is None:
        flow.block_layout(lay, f"shape: {where} has computed pads")
        return
    axes = axes if axes is not None else list(range(lay.rank))
    if lay.axis in axes:
        k = axes.index(lay.axis)
        if pads[k] != 0 or pads[k + len(axes)] != 0:
            flow.block_layout(lay, f"layout: {where} pads the channel axis")
            return
    flow.set(node.outputs[0], lay)


def transpose(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    perm = node.attrs.get("perm") or list(reversed(range(lay.rank)))
    perm = [int(p) for p in perm]
    flow.set(node.outputs[0], lay.moved(perm.index(lay.axis), lay.rank))


def squeeze(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    axes, _ = ints_given(node, "axes", 1)
    if axes is None:
        shape = flow.shape(node.inputs[0])
        if shape is None or any(not isinstance(d, int) for d in shape):
            flow.block_layout(lay, f"shape: {label(node)} squeezes unknown axes")
            return
        axes = [i for i, d in enumerate(shape) if d == 1]
    axes = [a % lay.rank for a in axes]
    if lay.axis in axes:
        flow.block_layout(lay, f"layout: {label(node)} squeezes the channel axis")
        return
    shift = sum(1 for a in axes if a < lay.axis)
    flow.set(node.outputs[0], lay.moved(lay.axis - shift, lay.rank - len(axes)))


def unsqueeze(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    axes, _ = ints_given(node, "axes", 1)
    if axes is None:
        flow.block_layout(lay, f"shape: {label(node)} unsqueezes computed axes")
        return
    rank = lay.rank + len(axes)
    inserted = {a % rank for a in axes}
    src = 0
    for pos in range(rank):
        if pos in inserted:
            continue
        if src == lay.axis:
            flow.set(node.outputs[0], lay.moved(pos, rank))
            return
        src += 1


def flatten(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    where = label(node)
    shape = flow.shape(node.inputs[0])
    axis = int(node.attrs.get("axis", 1)) % max(lay.rank, 1) if lay.rank else 0
    if shape is None:
        flow.block_layout(lay, f"shape: {where} flattens a tensor of unknown shape")
        return
    if lay.axis < axis:
        before = shape[:lay.axis]
        after = shape[lay.axis + 1:axis]
        if _prod(before) != 1 or _prod(after) is None:
            flow.block_layout(lay, f"shape: {where} merges the channels with dimensions before them")
            return
        flow.set(node.outputs[0], Layout(0, 2, lay.segs, lay.inner * _prod(after)))
        return
    between = shape[axis:lay.axis]
    after = shape[lay.axis + 1:]
    if _prod(between) != 1 or _prod(after) is None:
        flow.block_layout(lay, f"shape: {where} merges the channels with dimensions of unknown size")
        return
    flow.set(node.outputs[0], Layout(1, 2, lay.segs, lay.inner * _prod(after)))


def reshape(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    where = label(node)
    in_sym = flow.shape(node.inputs[0])
    out_sym = flow.shape(node.outputs[0])
    if out_sym is None:  # match on an example, rewrite only from what is general
        in_shape, out_shape = flow.example_shape(node.inputs[0]), flow.example_shape(node.outputs[0])
    else:
        in_shape, out_shape = in_sym, out_sym
    target = const_through_shape_ops(node.inputs[1])
    allowzero = int(node.attrs.get("allowzero", 0))
    if in_sym is None or in_shape is None or out_shape is None or len(in_shape) != lay.rank:
        flow.block_layout(lay, f"shape: {where} reshapes a tensor of unknown shape")
        return
    a, width = lay.axis, lay.width
    if in_shape[a] != width:
        flow.block_layout(lay, f"shape: {where} does not see the channel width it expects")
        return
    prefix = _squeeze_ones(in_shape[:a])
    after = _prod(in_sym[a + 1:])
    for j, d in enumerate(out_shape):
        if _squeeze_ones(out_shape[:j]) != prefix:
            continue
        if d == width:
            factor, inner = 1, lay.inner  # the channel axis survives (maybe moved)
        elif after is not None and j == len(out_shape) - 1 and d == width * after:
            factor, inner = after, lay.inner * after  # channels merged with what follows
        else:
            continue
        olay = Layout(j, len(out_shape), lay.segs, inner)
        if target is not None:
            flat = np.ravel(target)
            if flat.size != len(out_shape):
                break
            entry = int(flat[j])
            if entry > 0:
                flow.member("shape", node, 1, 0, lay, "shape", pos=j, factor=factor)
            elif entry == 0 and (allowzero or j != a or factor != 1):
                break
            flow.set(node.outputs[0], olay)
            return
        # A computed target: replace it by a constant that copies the leading dims (0)
        # and infers the one unknown dim (-1); possible when they line up exactly.
        if allowzero or j != a or tuple(out_shape[:j]) != tuple(in_shape[:a]):
            break
        rest = list(out_shape[j + 1:])
        if factor != 1:
            new_shape = [0] * j + [-1]
        elif not rest and _prod(in_sym[a + 1:]) == 1:
            new_shape = [0] * (j + 1)
        elif len(rest) == 1:
            new_shape = [0] * (j + 1) + [-1]
        elif out_sym is not None:
            unknown = [k for k, dd in enumerate(rest) if not isinstance(dd, (int, np.integer))]
            if len(unknown) > 1:
                break
            unknown = unknown or [len(rest) - 1]
            new_shape = [0] * (j + 1) + [-1 if k in unknown else int(dd) for k, dd in enumerate(rest)]
        else:
            break
        flow.member("reshape", node, 1, 0, lay, "shape", shape=new_shape)
        flow.set(node.outputs[0], olay)
        return
    flow.block_layout(lay, f"shape: {where} splits or moves the channel axis")


def concat(flow: ChannelFlow, node: gs.Node) -> None:
    where = label(node)
    lays = [flow.lay(t) for t in node.inputs]
    present = [lay for lay in lays if lay is not None]
    rank = present[0].rank
    axis = int(node.attrs.get("axis", 0)) % rank
    if any(lay.rank != rank for lay in present):
        for lay in present:
            flow.block_layout(lay, f"shape: {where} concatenates tensors of different ranks")
        return
    if all(lay.axis == axis for lay in present):
        segs: list[Seg] = []
        for t, lay in zip(node.inputs, lays):
            if lay is not None:
                if lay.inner != 1:
                    flow.block_layout(lay, f"layout: {where} concatenates flattened channels")
                    for other in present:
                        flow.block_layout(other, f"layout: {where} concatenates flattened channels")
                    return
                segs.extend(lay.segs)
                continue
            shape = flow.shape(t)
            d = shape[axis] if shape is not None and len(shape) == rank else None
            if not isinstance(d, int):
                for other in present:
                    flow.block_layout(other, f"shape: {where} concatenates a tensor of unknown size")
                return
            if d:
                segs.append(Seg(FIXED, 0, d))
        flow.set(node.outputs[0], Layout(axis, rank, tuple(merge_fixed(segs))))
        return
    if all(lay.axis != axis for lay in present) and len(present) == len(lays) and \
            len({lay.axis for lay in present}) == 1:
        base = present[0]
        ok = True
        for lay in present[1:]:
            ok &= flow.join(base, lay, where)
        if ok:
            flow.set(node.outputs[0], base)
        return
    for lay in present:
        flow.block_layout(lay, f"layout: {where} concatenates the channels with a tensor that does not carry them")


def split(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    where = label(node)
    axis = int(node.attrs.get("axis", 0)) % lay.rank
    outs = [o for o in node.outputs]
    if axis != lay.axis:
        for o in outs:
            if o.name:
                flow.set(o, lay)
        return
    if lay.inner != 1:
        flow.block_layout(lay, f"layout: {where} splits flattened channels")
        return
    split, computed = ints_given(node, "split", 1)
    if computed:
        flow.block_layout(lay, f"shape: {where} splits by computed sizes")
        return
    from_input = split is not None and node.attrs.get("split") is None
    if split is None:
        n = len(outs)
        if lay.width % n:
            flow.block_layout(lay, f"shape: {where} splits unevenly")
            return
        split = [lay.width // n] * n
    if sum(split) != lay.width or len(split) != len(outs):
        flow.block_layout(lay, f"shape: {where} split sizes do not add up")
        return
    pieces = []
    start = 0
    for size in split:
        pieces.append(sub_layout(lay, start, start + size))
        start += size
    flow.member("split", node, 1, 0, lay, "shape", outputs=pieces, from_input=from_input)
    for o, piece in zip(outs, pieces):
        if o.name:
            flow.set(o, piece)


def slice_op(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    where = label(node)
    if "starts" in node.attrs:  # opset < 10: bounds are attributes
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes = node.attrs.get("axes", list(range(len(starts))))
        steps = [1] * len(starts)
        const_inputs = False
    else:
        ins = list(node.inputs) + [gs.Variable("")] * (5 - len(node.inputs))
        vals = [const_through_shape_ops(t) if t.name else None for t in ins[1:5]]
        if vals[0] is None or vals[1] is None or (ins[3].name and vals[2] is None) or \
                (ins[4].name and vals[3] is None):
            flow.block_layout(lay, f"shape: {where} slices by computed bounds")
            return
        starts = [int(v) for v in np.ravel(vals[0])]
        ends = [int(v) for v in np.ravel(vals[1])]
        axes = [int(v) for v in np.ravel(vals[2])] if vals[2] is not None else list(range(len(starts)))
        steps = [int(v) for v in np.ravel(vals[3])] if vals[3] is not None else [1] * len(starts)
        const_inputs = True
    axes = [a % lay.rank for a in axes]
    if lay.axis not in axes:
        flow.set(node.outputs[0], lay)
        return
    k = axes.index(lay.axis)
    if steps[k] != 1 or lay.inner != 1:
        flow.block_layout(lay, f"layout: {where} slices the channels with a step")
        return
    width = lay.width
    s, e = starts[k], ends[k]
    s = max(0, min(width, s + width if s < 0 else s))
    e = max(0, min(width, e + width if e < 0 else e))
    if e <= s:
        flow.block_layout(lay, f"layout: {where} slices away every channel")
        return
    if not const_inputs:
        flow.block_layout(lay, f"layout: {where} slices the channels (opset < 10)")
        return
    piece = sub_layout(lay, s, e)
    flow.member("slice_bounds", node, 1, 0, lay, "shape", k=k, start=s, stop=e)
    flow.set(node.outputs[0], piece)


def gather(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    where = label(node)
    flow.block_layout(flow.lay(node.inputs[1]), f"op: {where} uses the channels as indices")
    if lay is None:
        return
    axis = int(node.attrs.get("axis", 0)) % lay.rank
    if axis == lay.axis:
        flow.block_layout(lay, f"layout: {where} gathers along the channel axis")
        return
    ir = flow.rank(node.inputs[1])
    if ir is None:
        flow.block_layout(lay, f"shape: {where} has indices of unknown rank")
        return
    new_axis = lay.axis if lay.axis < axis else lay.axis - 1 + ir
    flow.set(node.outputs[0], lay.moved(new_axis, lay.rank - 1 + ir))


def tile(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    reps = const_through_shape_ops(node.inputs[1])
    if reps is not None and int(np.ravel(reps)[lay.axis]) == 1:
        flow.set(node.outputs[0], lay)
        return
    flow.block_layout(lay, f"layout: {label(node)} tiles the channel axis")


def expand(flow: ChannelFlow, node: gs.Node) -> None:
    lay = flow.lay(node.inputs[0])
    shape = const_through_shape_ops(node.inputs[1])
    if shape is None:
        flow.block_layout(lay, f"shape: {label(node)} expands to a computed shape")
        return
    shape = [int(d) for d in np.ravel(shape)]
    rank = max(lay.rank, len(shape))
    axis = lay.axis + rank - lay.rank
    pos = axis - (rank - len(shape))
    if pos >= 0 and shape[pos] not in (1, lay.width):
        flow.block_layout(lay, f"shape: {label(node)} expands the channel axis")
        return
    if pos >= 0 and shape[pos] == lay.width and lay.width != 1:
        flow.member("shape", node, 1, 0, lay, "shape", pos=pos, factor=1)
    flow.set(node.outputs[0], lay.moved(axis, rank))


#: Rules by op type.
SHAPE_RULES = {
    "Resize": resize, "Upsample": upsample, "Pad": pad, "Transpose": transpose, "Squeeze": squeeze,
    "Unsqueeze": unsqueeze, "Flatten": flatten, "Reshape": reshape, "Concat": concat, "Split": split,
    "Slice": slice_op, "Gather": gather, "Tile": tile, "Expand": expand,
}
