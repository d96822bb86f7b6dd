"""Reading compact weight storage back: decoder cones and a numpy interpreter of them.

A *decoder cone* is the set of nodes computing a tensor when every node is one of
:data:`DECODER_OPS` and every leaf is a constant: the expansion that the storage writer
emits, also after other passes merged its shared constants or nodes. Its value is
computed here with numpy, exactly as onnxruntime computes it (the ops move values
without float arithmetic), so that passes can read a compressed weight, rewrite it, or
check that a storage gives back its values. :func:`storage_of` names the storage form a
cone implements.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph import const_value

__all__ = [
    "COMPACT",
    "DECODER_OPS",
    "FLOAT_DTYPES",
    "NotDecodable",
    "cone_storage",
    "decoder_cone",
    "evaluate",
    "storage_of",
    "tensor_value",
]

log = logging.getLogger(__name__)

#: Operators a decoder cone may contain: what the storage writer emits, and what other
#: passes may turn it into (Identity, Unsqueeze/Squeeze, Concat of merged constants).
DECODER_OPS = frozenset({"BitShift", "Cast", "Gather", "Reshape", "Slice", "CumSum", "ConstantOfShape",
                         "ScatterND", "ScatterElements", "Split", "Add", "Unsqueeze", "Squeeze", "Identity", "Concat",
                         "Constant"})

#: The compact storage forms (``dense`` is the plain tensor).
COMPACT = ("sparse", "dense-idx", "sparse-idx")

#: The weight dtypes the compression passes store.
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def decoder_cone(t: gs.Tensor) -> list[gs.Node] | None:
    """The nodes computing ``t`` if they are all :data:`DECODER_OPS` and every leaf is a
    constant (not overridable); None otherwise (also for a plain constant). Nodes are in
    an order where producers come first."""
    if isinstance(t, gs.Constant) or len(t.inputs) != 1:
        return None
    root = t.inputs[0]
    if root.op == "Constant":
        return None
    order: list[gs.Node] = []
    seen: set[int] = set()
    stack: list[tuple[gs.Tensor, bool]] = [(t, False)]
    while stack:
        x, expanded = stack.pop()
        if isinstance(x, gs.Constant):
            if const_value(x, load=False) is None:
                return None
            continue
        if not x.name:  # an omitted optional input
            continue
        if len(x.inputs) != 1:
            return None
        node = x.inputs[0]
        if node.op not in DECODER_OPS or node.domain not in (None, "", "ai.onnx"):
            return None
        if expanded:
            if id(node) not in seen:
                seen.add(id(node))
                order.append(node)
            continue
        if id(node) in seen:
            continue
        if node.op == "Constant":
            if const_value(x, load=False) is None:
                return None
            seen.add(id(node))
            order.append(node)
            continue
        stack.append((x, True))
        for inp in node.inputs:
            stack.append((inp, False))
        if len(order) > 10_000:
            return None
    return order


def tensor_value(t: gs.Tensor, memo: dict[int, np.ndarray] | None = None) -> np.ndarray | None:
    """The value of a constant or of a decoder cone's output; None for anything else.
    ``memo`` (tensor id -> value) caches what was evaluated, for the next calls."""
    v = const_value(t, load=False)
    if v is not None:
        return np.asarray(v)
    if decoder_cone(t) is None:
        return None
    try:
        return evaluate(t, {} if memo is None else memo)
    except NotDecodable as exc:
        log.debug("cannot evaluate %s: %s", t.name, exc)
        return None


class NotDecodable(Exception):
    """A tensor whose cone the interpreter cannot evaluate (an op or attribute it does not
    implement, or inconsistent inputs)."""


def evaluate(t: gs.Tensor, memo: dict[int, np.ndarray]) -> np.ndarray:
    """The value of ``t`` (a constant or a decoder cone's output), memoised by tensor id in
    ``memo``; raises :class:`NotDecodable` where the interpreter cannot compute it."""
    if id(t) in memo:
        return memo[id(t)]
    v = const_value(t, load=False)
    if v is not None:
        out = np.asarray(v)
    else:
        node = t.inputs[0]
        args = [None if (isinstance(x, gs.Variable) and not x.name) else evaluate(x, memo)
                for x in node.inputs]
        fn = _INTERPRETER.get(node.op)
        if fn is None:
            raise NotDecodable(f"no evaluator for {node.op}")
        try:
            result = fn(node, args)
        except (ValueError, IndexError, TypeError, KeyError) as exc:
            raise NotDecodable(f"{node.op}: {exc}") from exc
        if node.op == "Split":
            if len(result) != len(node.outputs):
                raise NotDecodable("Split gives another number of outputs")
            for o, r in zip(node.outputs, result):
                memo[id(o)] = r
            out = memo[id(t)]
        elif len(node.outputs) != 1:
            raise NotDecodable(f"{node.op} with {len(node.outputs)} outputs")
        else:
            out = result
    memo[id(t)] = out
    return out


def _np_dtype(onnx_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type))


def _attr_or_input(node: gs.Node, args: list, index: int, attr: str):
    if len(args) > index and args[index] is not None:
        return [int(v) for v in np.asarray(args[index]).ravel()]
    value = node.attrs.get(attr)
    return None if value is None else [int(v) for v in value]


def _op_bitshift(node, args):
    a, b = args
    if a.dtype.kind != "u":
        raise ValueError("BitShift on a signed type")
    b = b.astype(a.dtype)
    if node.attrs.get("direction") == "LEFT":
        return np.left_shift(a, b).astype(a.dtype)
    if node.attrs.get("direction") == "RIGHT":
        return np.right_shift(a, b).astype(a.dtype)
    raise ValueError("BitShift direction")


def _op_cast(node, args):
    return args[0].astype(_np_dtype(int(node.attrs["to"])))


def _op_gather(node, args):
    data, idx = args
    axis = int(node.attrs.get("axis", 0))
    idx = np.asarray(idx).astype(np.int64)
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    return np.take(data, idx, axis=axis)


def _op_reshape(node, args):
    data, shape = args
    shape = [int(s) for s in np.asarray(shape).ravel()]
    if not node.attrs.get("allowzero", 0):
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return data.reshape(shape)


def _op_slice(node, args):
    data = args[0]
    starts, ends = np.asarray(args[1]).ravel(), np.asarray(args[2]).ravel()
    axes = np.asarray(args[3]).ravel() if len(args) > 3 and args[3] is not None else np.arange(len(starts))
    steps = np.asarray(args[4]).ravel() if len(args) > 4 and args[4] is not None else np.ones(len(starts), np.int64)
    index = [slice(None)] * data.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = int(a) + (data.ndim if a < 0 else 0)
        dim = data.shape[a]
        s, e, st = int(s), int(e), int(st)
        if st == 0:
            raise ValueError("Slice step 0")
        s = max(min(s + dim if s < 0 else s, dim if st > 0 else dim - 1), 0 if st > 0 else -1)
        e = max(min(e + dim if e < 0 else e, dim if st > 0 else dim - 1), 0 if st > 0 else -1)
        index[a] = slice(s, None if (st < 0 and e < 0) else e, st)
    return data[tuple(index)]


def _op_cumsum(node, args):
    x, axis = args
    axis = int(np.asarray(axis).ravel()[0])
    if node.attrs.get("reverse", 0):
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis, dtype=x.dtype)
    if node.attrs.get("exclusive", 0):
        out = out - x
    if node.attrs.get("reverse", 0):
        out = np.flip(out, axis)
    return out


def _op_constant_of_shape(node, args):
    shape = [int(s) for s in np.asarray(args[0]).ravel()]
    value = node.attrs.get("value")
    fill = np.asarray(value.values).ravel() if isinstance(value, gs.Constant) else np.zeros(1, np.float32)
    return np.full(shape, fill[0], dtype=fill.dtype)


def _op_scatter_nd(node, args):
    data, indices, updates = args
    if node.attrs.get("reduction", "none") not in ("none", b"none"):
        raise ValueError("ScatterND with a reduction")
    out = np.array(data, copy=True)
    indices = np.asarray(indices).astype(np.int64)
    k = indices.shape[-1]
    flat_idx = indices.reshape(-1, k)
    upd = np.asarray(updates).reshape((flat_idx.shape[0],) + data.shape[k:])
    for dim in range(k):
        col = flat_idx[:, dim]
        flat_idx[:, dim] = np.where(col < 0, col + data.shape[dim], col)
    out[tuple(flat_idx.T)] = upd
    return out


def _op_unsqueeze(node, args):
    axes = _attr_or_input(node, args, 1, "axes")
    out = args[0]
    rank = out.ndim + len(axes)
    for a in sorted(a + rank if a < 0 else a for a in axes):
        out = np.expand_dims(out, a)
    return out


def _op_squeeze(node, args):
    axes = _attr_or_input(node, args, 1, "axes")
    if axes is None:
        return np.squeeze(args[0])
    return np.squeeze(args[0], axis=tuple(a + args[0].ndim if a < 0 else a for a in axes))


def _op_concat(node, args):
    return np.concatenate([a for a in args if a is not None], axis=int(node.attrs["axis"]))


def _op_split(node, args):
    data = args[0]
    axis = int(node.attrs.get("axis", 0))
    sizes = _attr_or_input(node, args, 1, "split")
    n = len(node.outputs)
    if sizes is None:
        dim = data.shape[axis]
        step = -(-dim // n)
        sizes = [min(step, dim - i * step) for i in range(n)]
    if sum(sizes) != data.shape[axis] or len(sizes) != n:
        raise ValueError("Split sizes do not match")
    return np.split(data, np.cumsum(sizes)[:-1], axis=axis)


def _op_add(node, args):
    a, b = args
    if a.dtype != b.dtype:
        raise ValueError("Add of two dtypes")
    return np.add(a, b, dtype=a.dtype)


def _op_scatter_elements(node, args):
    data, indices, updates = args
    if node.attrs.get("reduction", "none") not in ("none", b"none"):
        raise ValueError("ScatterElements with a reduction")
    axis = int(node.attrs.get("axis", 0))
    axis += data.ndim if axis < 0 else 0
    out = np.array(data, copy=True)
    idx = np.asarray(indices).astype(np.int64)
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    np.put_along_axis(out, idx, np.asarray(updates), axis=axis)
    return out


_INTERPRETER = {
    "ScatterElements": _op_scatter_elements,
    "Split": _op_split,
    "Add": _op_add,
    "BitShift": _op_bitshift,
    "Cast": _op_cast,
    "Gather": _op_gather,
    "Reshape": _op_reshape,
    "Slice": _op_slice,
    "CumSum": _op_cumsum,
    "ConstantOfShape": _op_constant_of_shape,
    "ScatterND": _op_scatter_nd,
    "Unsqueeze": _op_unsqueeze,
    "Squeeze": _op_squeeze,
    "Identity": lambda node, args: args[0],
    "Concat": _op_concat,
}


def cone_storage(cone: list[gs.Node]) -> str:
    """The storage form a decoder cone implements: a scatter makes it sparse, a lookup of a
    float codebook indexed; ``computed`` when it is neither."""
    sparse = any(n.op in ("ScatterND", "ScatterElements") for n in cone)
    indexed = False
    for n in cone:
        if n.op == "Gather" and n.inputs:
            data = const_value(n.inputs[0], load=False)
            if data is not None and np.asarray(data).dtype in FLOAT_DTYPES:
                indexed = True
    if sparse:
        return "sparse-idx" if indexed else "sparse"
    return "dense-idx" if indexed else "computed"


def storage_of(t: gs.Tensor) -> str:
    """How a weight tensor is stored: ``dense``, ``sparse``, ``dense-idx``, ``sparse-idx``,
    ``computed`` (another decoder cone) or ``""`` (not a constant)."""
    if const_value(t, load=False) is not None:
        return "dense"
    cone = decoder_cone(t)
    return cone_storage(cone) if cone else ""
