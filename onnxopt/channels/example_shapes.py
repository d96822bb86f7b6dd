"""Shapes of a model's tensors for one example input size.

ONNX shape inference gives up on the ``Shape -> Cast -> Slice -> Concat -> Reshape``
chains that exporters write for every dynamic reshape, and then a tensor has no rank.
Here the dynamic input dimensions are set to example values on a throwaway copy of the
model, and the small integer computations that feed Reshape/Expand/Slice/... are
evaluated along the way, until inference knows every shape it can. The dimensions are
one example: the channel analysis uses them to find ranks and axes, never as sizes.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import const_through_shape_ops
from ..model import Model
from ..shapes import TensorInfo, infer_shapes

__all__ = ["example_shapes"]

#: Which inputs of an op are shapes, sizes or bounds.
_SHAPE_INPUTS = {"Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4),
                 "Unsqueeze": (1,), "Squeeze": (1,), "ConstantOfShape": (0,), "Resize": (2, 3)}
_INT_OPS = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.floor_divide}


def example_shapes(model: Model) -> dict[str, TensorInfo]:
    """Tensor name -> :class:`TensorInfo` for one example input size (dynamic input
    dims set to defaults); empty when no example size can be chosen."""
    from ..data import resolve_shapes

    try:
        shapes, _ = resolve_shapes(model)
    except Exception:
        return {}
    # A throwaway copy whose shape computations become constants: inference on it is
    # keyed by name, which is the link back to the caller's tensors.
    work = model.copy()
    for t in work.graph.inputs:
        if t.name in shapes and isinstance(t, gs.Variable):
            t.shape = list(shapes[t.name])
    info: dict = {}
    for _ in range(8):
        info = infer_shapes(work)
        memo: dict[int, np.ndarray | None] = {}
        changed = False
        for node in work.graph.nodes:
            for i in _SHAPE_INPUTS.get(node.op, ()):
                if i >= len(node.inputs) or not node.inputs[i].name or \
                        const_through_shape_ops(node.inputs[i]) is not None:
                    continue
                value = _int_value(node.inputs[i], info, memo)
                if value is not None:
                    node.inputs[i] = gs.Constant(node.inputs[i].name + "__example", value)
                    changed = True
        if not changed:
            break
    return info


def _int_value(t: gs.Tensor, info: dict, memo: dict, depth: int = 0) -> np.ndarray | None:
    """The value of a small integer tensor computed from shapes, or None."""
    if id(t) in memo:
        return memo[id(t)]
    memo[id(t)] = None
    value = const_through_shape_ops(t)
    if value is None and depth < 32 and isinstance(t, gs.Variable) and len(t.inputs) == 1:
        try:
            value = _int_op(t.inputs[0], info, memo, depth)
        except (IndexError, ValueError, TypeError, KeyError):
            value = None
    if value is not None and value.dtype.kind not in "iu":
        value = None
    memo[id(t)] = None if value is None else np.asarray(value, dtype=np.int64)
    return memo[id(t)]


def _int_op(node: gs.Node, info: dict, memo: dict, depth: int) -> np.ndarray | None:
    """What ``node`` computes from shapes and small integers, or None."""
    args = node.inputs
    if node.op == "Shape":
        ti = info.get(args[0].name)
        if ti is not None and ti.shape is not None and all(isinstance(d, int) for d in ti.shape):
            full = np.asarray(ti.shape, dtype=np.int64)
            return full[node.attrs.get("start", 0):node.attrs.get("end", None)]
        return None
    vals = [_int_value(a, info, memo, depth + 1) if a.name else None for a in args]
    if node.op in ("Cast", "Identity") and vals[0] is not None:
        return vals[0].astype(np.int64) if vals[0].dtype.kind in "iuf" else None
    if node.op == "Slice" and all(v is not None for v in vals[:3]):
        steps = vals[4] if len(vals) > 4 and vals[4] is not None else [1]
        return vals[0][int(vals[1][0]):int(vals[2][0]):int(steps[0])]
    if node.op == "Gather" and vals[0] is not None and vals[1] is not None:
        return np.take(vals[0], vals[1], axis=int(node.attrs.get("axis", 0)))
    if node.op == "Concat" and all(v is not None for v in vals):
        return np.concatenate([np.atleast_1d(v) for v in vals])
    if node.op in ("Unsqueeze", "Squeeze") and vals[0] is not None:
        return np.reshape(vals[0], (-1,)) if node.op == "Unsqueeze" else np.squeeze(vals[0])
    if node.op in _INT_OPS and all(v is not None for v in vals):
        return _INT_OPS[node.op](vals[0], vals[1])
    return None
