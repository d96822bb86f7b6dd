"""The values of single ONNX nodes on known inputs, exactly as onnxruntime computes them.

Folding constants and reading compressed weights both need the value of a node whose
inputs are known. onnxruntime computes it, but a session costs an import of the runtime
(a tenth of a second and 30 MB) and a few milliseconds per node signature; most of what
these nodes do — move, select, reshape and cast values, integer arithmetic — numpy does
with the same result to the bit. :func:`evaluate_node` does exactly that, and declines
(:class:`NotEvaluable`) everything else: an op it has no kernel for, an element type or
value whose result could differ from onnxruntime's (float to integer casts of values out
of range, float16 targets, float reductions), or an input onnxruntime would reject (an
index out of range, a shape that does not fit). :class:`NodeEvaluator` asks numpy first
and onnxruntime for the rest, one single-node session per node signature.

Float arithmetic is limited to elementwise ``Add``/``Sub``/``Mul``/``Div``/``Neg``/``Abs``
on float32 and float64, which IEEE 754 rounds correctly in both. Results never share
memory with the inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from .graph_extras import RawAttribute

__all__ = ["NUMPY_OPS", "NodeEvaluator", "NotEvaluable", "evaluate_node"]

log = logging.getLogger(__name__)


class NotEvaluable(Exception):
    """The node is outside what :func:`evaluate_node` computes exactly (see the module doc)."""


def evaluate_node(node: gs.Node, args: list[np.ndarray | None]) -> list[np.ndarray]:
    """The values of ``node``'s outputs, one array per output, for inputs ``args`` (None
    for an omitted optional input). Standard-domain ops only."""
    kernel = _KERNELS.get(node.op)
    if kernel is None or node.domain not in (None, "", "ai.onnx"):
        raise NotEvaluable(f"no numpy kernel for {node.op}")
    args = [None if a is None else np.asarray(a) for a in args]
    try:
        with np.errstate(all="ignore"):
            result = kernel(node, args)
    except NotEvaluable:
        raise
    except (ValueError, IndexError, TypeError, KeyError, OverflowError) as exc:
        raise NotEvaluable(f"{node.op}: {exc}") from exc
    results = list(result) if isinstance(result, (list, tuple)) else [result]
    if len(results) != len(node.outputs):
        raise NotEvaluable(f"{node.op} gives {len(results)} values for {len(node.outputs)} outputs")
    inputs = [a for a in args if a is not None]
    out = []
    for r in results:
        r = np.asarray(r)
        if not r.flags.c_contiguous or any(np.may_share_memory(r, a) for a in inputs):
            r = np.array(r, order="C", copy=True)
        out.append(r)
    return out


# --------------------------------------------------------------------------------------
# Checks shared by the kernels
# --------------------------------------------------------------------------------------

_INT_KINDS = "iu"


def _need(condition: bool, why: str) -> None:
    if not condition:
        raise NotEvaluable(why)


def _ints(x: np.ndarray | None, what: str, kinds: tuple = (np.int64,)) -> list[int]:
    """A shape-like input as Python ints; its element type must be one of ``kinds``."""
    _need(x is not None, f"{what} missing")
    _need(x.dtype.type in kinds, f"{what} of type {x.dtype}")
    _need(x.ndim <= 1, f"{what} of rank {x.ndim}")
    return [int(v) for v in x.ravel()]


def _axis(axis: int, rank: int) -> int:
    _need(-rank <= axis < rank if rank else axis in (0, -1), f"axis {axis} out of range")
    return axis + rank if axis < 0 else axis


def _same_dtype(args: list[np.ndarray], kinds: str, dtypes: tuple = ()) -> np.dtype:
    dtype = args[0].dtype
    _need(all(a.dtype == dtype for a in args), "inputs of different element types")
    _need(dtype.kind in kinds or dtype in dtypes, f"element type {dtype}")
    return dtype


def _attr_or_input(node: gs.Node, args: list, index: int, attr: str) -> list[int] | None:
    """An int list given as input ``index`` (opset 13 and later) or as attribute ``attr``."""
    if len(args) > index and args[index] is not None:
        return _ints(args[index], attr)
    value = node.attrs.get(attr)
    return None if value is None else [int(v) for v in value]


# --------------------------------------------------------------------------------------
# Moving and selecting values
# --------------------------------------------------------------------------------------


def _identity(node, args):
    return args[0]


def _reshape(node, args):
    data = args[0]
    shape = _ints(args[1], "shape")
    if not node.attrs.get("allowzero", 0):
        _need(all(i < data.ndim for i, s in enumerate(shape) if s == 0), "0 past the input's rank")
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    _need(shape.count(-1) <= 1 and all(s >= -1 for s in shape), "invalid target shape")
    return data.reshape(shape)


def _flatten(node, args):
    data = args[0]
    axis = int(node.attrs.get("axis", 1))
    _need(-data.ndim <= axis <= data.ndim, "axis out of range")
    axis += data.ndim if axis < 0 else 0
    outer = int(np.prod(data.shape[:axis], dtype=np.int64))
    return data.reshape(outer, int(np.prod(data.shape[axis:], dtype=np.int64)))


def _unsqueeze(node, args):
    axes = _attr_or_input(node, args, 1, "axes")
    _need(axes is not None, "no axes")
    rank = args[0].ndim + len(axes)
    axes = sorted(_axis(a, rank) for a in axes)
    _need(len(set(axes)) == len(axes), "repeated axes")
    out = args[0]
    for a in axes:
        out = np.expand_dims(out, a)
    return out


def _squeeze(node, args):
    data = args[0]
    axes = _attr_or_input(node, args, 1, "axes")
    if axes is None:
        return np.squeeze(data)
    axes = [_axis(a, data.ndim) for a in axes]
    _need(len(set(axes)) == len(axes) and all(data.shape[a] == 1 for a in axes), "axes not of size 1")
    return np.squeeze(data, axis=tuple(axes))


def _transpose(node, args):
    data = args[0]
    perm = node.attrs.get("perm")
    perm = list(range(data.ndim))[::-1] if perm is None else [int(p) for p in perm]
    _need(sorted(perm) == list(range(data.ndim)), "perm is not a permutation of the axes")
    return np.transpose(data, perm)


def _concat(node, args):
    _need(all(a is not None for a in args) and args, "missing input")
    _same_dtype(args, "biufc")
    return np.concatenate(args, axis=_axis(int(node.attrs["axis"]), args[0].ndim))


def _split(node, args):
    data = args[0]
    axis = _axis(int(node.attrs.get("axis", 0)), data.ndim)
    sizes = _attr_or_input(node, args, 1, "split")
    n = len(node.outputs)
    dim = data.shape[axis]
    if sizes is None:
        if "num_outputs" in node.attrs:  # opset 18: the last part may be smaller
            _need(int(node.attrs["num_outputs"]) == n, "num_outputs differs from the outputs")
            step = -(-dim // n)
            sizes = [min(step, dim - i * step) for i in range(n)]
            _need(all(s > 0 for s in sizes), "an empty part")
        else:
            _need(n > 0 and dim % n == 0, "not evenly split")
            sizes = [dim // n] * n
    _need(len(sizes) == n and all(s >= 0 for s in sizes) and sum(sizes) == dim, "split sizes do not match")
    return np.split(data, np.cumsum(sizes)[:-1], axis=axis)


def _slice_bounds(start: int, end: int, step: int, dim: int) -> slice:
    """The ONNX Slice of one axis (clamping as the operator specifies) as a Python slice."""
    _need(step != 0, "step 0")
    start += dim if start < 0 else 0
    end += dim if end < 0 else 0
    if step > 0:
        return slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
    if dim == 0:
        return slice(0, 0, step)
    start = min(max(start, 0), dim - 1)
    end = min(max(end, -1), dim - 1)
    return slice(start, None if end < 0 else end, step)


def _slice(node, args):
    data = args[0]
    if len(args) > 1:  # opset 10 and later
        kinds = (np.int32, np.int64)
        _need(len({a.dtype for a in args[1:] if a is not None}) == 1, "indices of different types")
        starts, ends = _ints(args[1], "starts", kinds), _ints(args[2], "ends", kinds)
        axes = _ints(args[3], "axes", kinds) if len(args) > 3 and args[3] is not None else None
        steps = _ints(args[4], "steps", kinds) if len(args) > 4 and args[4] is not None else None
    else:
        starts, ends = [int(v) for v in node.attrs["starts"]], [int(v) for v in node.attrs["ends"]]
        axes = [int(v) for v in node.attrs["axes"]] if "axes" in node.attrs else None
        steps = None
    axes = list(range(len(starts))) if axes is None else [_axis(a, data.ndim) for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    _need(len(starts) == len(ends) == len(axes) == len(steps), "starts, ends, axes, steps differ in length")
    _need(len(set(axes)) == len(axes), "repeated axes")
    index = [slice(None)] * data.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[a] = _slice_bounds(s, e, st, data.shape[a])
    return data[tuple(index)]


def _gather(node, args):
    data, idx = args
    _need(idx.dtype.type in (np.int32, np.int64), f"indices of type {idx.dtype}")
    axis = _axis(int(node.attrs.get("axis", 0)), data.ndim)
    dim = data.shape[axis]
    idx = idx.astype(np.int64)
    _need(bool(np.all((idx >= -dim) & (idx < dim))), "index out of range")
    return np.take(data, np.where(idx < 0, idx + dim, idx), axis=axis)


def _expand(node, args):
    data = args[0]
    shape = _ints(args[1], "shape")
    return np.broadcast_to(data, np.broadcast_shapes(data.shape, tuple(shape)))


def _tile(node, args):
    data = args[0]
    repeats = _ints(args[1], "repeats")
    _need(len(repeats) == data.ndim and all(r >= 0 for r in repeats), "repeats do not match the rank")
    return np.tile(data, repeats)


def _constant_of_shape(node, args):
    shape = _ints(args[0], "shape")
    _need(all(s >= 0 for s in shape), "negative dimension")
    value = node.attrs.get("value")
    fill = np.asarray(value.values).ravel() if isinstance(value, gs.Constant) else np.zeros(1, np.float32)
    _need(fill.size == 1, "value is not one element")
    return np.full(shape, fill[0], dtype=fill.dtype)


def _shape(node, args):
    dims = args[0].shape
    rank = len(dims)
    start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
    end = rank if end is None else int(end)
    start, end = (min(max(v + rank if v < 0 else v, 0), rank) for v in (start, end))
    return np.array(dims[start:end], dtype=np.int64)


def _size(node, args):
    return np.array(args[0].size, dtype=np.int64)


def _where(node, args):
    cond, x, y = args
    _need(cond.dtype == np.bool_, "condition is not bool")
    _same_dtype([x, y], "biufc")
    return np.where(cond, x, y)


def _scatter_nd(node, args):
    data, indices, updates = args
    _need(node.attrs.get("reduction", "none") in ("none", b"none"), "ScatterND with a reduction")
    _need(indices.dtype == np.int64 and updates.dtype == data.dtype, "element types")
    out = np.array(data, copy=True)
    k = indices.shape[-1]
    flat_idx = indices.reshape(-1, k).copy()
    upd = updates.reshape((flat_idx.shape[0],) + data.shape[k:])
    for dim in range(k):
        col = flat_idx[:, dim]
        _need(bool(np.all((col >= -data.shape[dim]) & (col < data.shape[dim]))), "index out of range")
        flat_idx[:, dim] = np.where(col < 0, col + data.shape[dim], col)
    where = tuple(flat_idx.T)
    _need(_distinct(where, data.shape[:k]), "an element written twice")
    out[where] = upd
    return out


def _distinct(where: tuple, shape: tuple) -> bool:
    """Whether the index arrays ``where`` name every element of ``shape`` at most once
    (ONNX leaves the order of repeated writes open)."""
    if not where or where[0].size == 0:
        return True
    flat = np.ravel_multi_index(tuple(np.ravel(w) for w in np.broadcast_arrays(*where)), shape)
    return np.unique(flat).size == flat.size


def _scatter_elements(node, args):
    data, indices, updates = args
    _need(node.attrs.get("reduction", "none") in ("none", b"none"), "ScatterElements with a reduction")
    _need(indices.dtype.type in (np.int32, np.int64) and updates.dtype == data.dtype, "element types")
    _need(indices.shape == updates.shape and indices.ndim == data.ndim, "shapes of indices and updates")
    axis = _axis(int(node.attrs.get("axis", 0)), data.ndim)
    _need(all(i <= d for k, (i, d) in enumerate(zip(indices.shape, data.shape)) if k != axis),
          "indices larger than the data")
    dim = data.shape[axis]
    idx = indices.astype(np.int64)
    _need(bool(np.all((idx >= -dim) & (idx < dim))), "index out of range")
    where = list(np.indices(indices.shape, sparse=True))  # element [i, j, ...] of the indices ...
    where[axis] = np.where(idx < 0, idx + dim, idx)  # ... writes along the axis where it says
    _need(_distinct(tuple(where), data.shape), "an element written twice")
    out = np.array(data, copy=True)
    out[tuple(where)] = updates
    return out


# --------------------------------------------------------------------------------------
# Types and arithmetic
# --------------------------------------------------------------------------------------

_EXACT_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _cast(node, args):
    x = args[0]
    to = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    src, dst = x.dtype.kind, to.kind
    _need(src in "biuf" and dst in "biuf" and to.type.__module__ == "numpy"
          and x.dtype.type.__module__ == "numpy", f"cast {x.dtype} to {to}")
    if dst == "b":
        return x != 0
    if dst == "f":
        _need(to != np.float16 or x.dtype == np.float16, "cast to float16")
        return x.astype(to)
    if src == "f":  # truncation toward zero, defined only for finite values in range
        info = np.iinfo(to)
        t = np.trunc(x.astype(np.float64))
        _need(bool(np.all(np.isfinite(t) & (t >= info.min) & (t <= info.max))), "value out of the target's range")
    return x.astype(to)  # integers wrap as onnxruntime's static_cast does


def _arith(op: Callable, kinds: str = _INT_KINDS, floats: tuple = _EXACT_FLOATS) -> Callable:
    """A broadcasting binary op on two inputs of one element type."""
    def kernel(node, args):
        _need(len(args) == 2 and args[1] is not None, "two inputs")
        _same_dtype(args, kinds, floats)
        return np.asarray(op(args[0], args[1]))
    return kernel


def _div(node, args):
    a, b = args
    dtype = _same_dtype(args, _INT_KINDS, _EXACT_FLOATS)
    if dtype.kind == "f":
        return np.asarray(np.divide(a, b))
    _need(bool(np.all(b != 0)), "integer division by zero")
    if dtype.kind == "i":
        info = np.iinfo(dtype)
        _need(not bool(np.any((a == info.min) & (b == -1))), "integer division overflows")
    q = np.floor_divide(a, b)
    q = q + ((np.remainder(a, b) != 0) & ((a < 0) != (b < 0)))  # truncation toward zero
    return np.asarray(q).astype(dtype, copy=False)


def _unary(op: Callable, kinds: str, floats: tuple = _EXACT_FLOATS) -> Callable:
    def kernel(node, args):
        _same_dtype(args[:1], kinds, floats)
        return np.asarray(op(args[0]))
    return kernel


def _variadic(op: Callable) -> Callable:
    def kernel(node, args):
        _need(all(a is not None for a in args) and args, "missing input")
        dtype = _same_dtype(args, _INT_KINDS)
        out = args[0]
        for a in args[1:]:
            out = op(out, a)
        return np.asarray(out).astype(dtype, copy=False)
    return kernel


def _logical(op: Callable) -> Callable:
    def kernel(node, args):
        _need(all(a is not None and a.dtype == np.bool_ for a in args), "inputs are not bool")
        return np.asarray(op(*args))
    return kernel


def _range(node, args):
    _need(all(a is not None and a.ndim == 0 for a in args), "inputs are not scalars")
    dtype = _same_dtype(args, "", (np.dtype(np.int16), np.dtype(np.int32), np.dtype(np.int64)))
    start, limit, delta = (int(a) for a in args)
    _need(delta != 0, "delta 0")
    count = max(-(-(limit - start) // delta), 0)
    info = np.iinfo(dtype)
    _need(count == 0 or info.min <= start + (count - 1) * delta <= info.max, "values out of range")
    return (start + delta * np.arange(count, dtype=np.int64)).astype(dtype)


def _cumsum(node, args):
    x, axis = args
    _need(axis.dtype.type in (np.int32, np.int64) and axis.size == 1, "axis")
    _need(x.dtype.kind in _INT_KINDS or x.dtype in _EXACT_FLOATS, f"element type {x.dtype}")
    axis = _axis(int(axis.ravel()[0]), x.ndim)
    exclusive = node.attrs.get("exclusive", 0)
    _need(not exclusive or x.dtype.kind in _INT_KINDS, "exclusive float sums")
    if node.attrs.get("reverse", 0):
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis, dtype=x.dtype)
    if exclusive:
        out = out - x
    if node.attrs.get("reverse", 0):
        out = np.flip(out, axis)
    return out


def _bitshift(node, args):
    a, b = args
    _need(a.dtype.kind == "u" and b.dtype == a.dtype, "BitShift of other than one unsigned type")
    _need(bool(np.all(b < a.dtype.itemsize * 8)), "shift by the type's width or more")
    direction = node.attrs.get("direction")
    if direction == "LEFT":
        return np.left_shift(a, b).astype(a.dtype)
    _need(direction == "RIGHT", "BitShift direction")
    return np.right_shift(a, b).astype(a.dtype)


_KERNELS: dict[str, Callable] = {
    "Identity": _identity,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Transpose": _transpose,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "Expand": _expand,
    "Tile": _tile,
    "ConstantOfShape": _constant_of_shape,
    "Shape": _shape,
    "Size": _size,
    "Where": _where,
    "ScatterND": _scatter_nd,
    "ScatterElements": _scatter_elements,
    "Cast": _cast,
    "Add": _arith(np.add),
    "Sub": _arith(np.subtract),
    "Mul": _arith(np.multiply),
    "Div": _div,
    "Equal": _arith(np.equal, _INT_KINDS + "b", ()),
    "Neg": _unary(np.negative, "i"),
    "Abs": _unary(np.abs, _INT_KINDS),
    "Min": _variadic(np.minimum),
    "Max": _variadic(np.maximum),
    "Not": _logical(np.logical_not),
    "And": _logical(np.logical_and),
    "Or": _logical(np.logical_or),
    "Xor": _logical(np.logical_xor),
    "Range": _range,
    "CumSum": _cumsum,
    "BitShift": _bitshift,
}

#: The ops :func:`evaluate_node` has a kernel for.
NUMPY_OPS = frozenset(_KERNELS)


# --------------------------------------------------------------------------------------
# Everything else: onnxruntime
# --------------------------------------------------------------------------------------


class NodeEvaluator:
    """Evaluates single nodes of a model with the given opsets: with numpy where
    :func:`evaluate_node` vouches for the result, else on onnxruntime with one cached
    session per node signature (op, attributes, input types). Raises :class:`NotEvaluable`
    for a node neither computes."""

    def __init__(self, opset_imports: Mapping[str, int], ir_version: int):
        self.opsets = [helper.make_opsetid(d, v) for d, v in sorted(opset_imports.items())]
        self.ir_version = max(ir_version, 7)
        self.sessions: dict[bytes, object | None] = {}
        self._options = None

    @property
    def options(self):
        """Session options, made (and onnxruntime imported) at the first session."""
        if self._options is None:
            import onnxruntime as ort

            self._options = ort.SessionOptions()
            self._options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            self._options.intra_op_num_threads = 1
            self._options.inter_op_num_threads = 1
            self._options.log_severity_level = 4
        return self._options

    def run(self, node: gs.Node, inputs: list[np.ndarray | None]) -> list[np.ndarray | None]:
        """The values of ``node``'s outputs (None for an unnamed one)."""
        if node.op in NUMPY_OPS:
            try:
                values = evaluate_node(node, inputs)
            except NotEvaluable as exc:
                log.debug("%s (%s) goes to onnxruntime: %s", node.name or "?", node.op, exc)
            else:
                return [v if t.name else None for v, t in zip(values, node.outputs)]
        return self._run_session(node, inputs)

    def _run_session(self, node: gs.Node, inputs: list[np.ndarray | None]) -> list[np.ndarray | None]:
        in_names = [f"i{k}" if v is not None else "" for k, v in enumerate(inputs)]
        out_names = [f"o{k}" if t.name else "" for k, t in enumerate(node.outputs)]
        try:
            proto = helper.make_node(node.op, in_names, out_names, domain=node.domain or "")
            proto.attribute.extend(_attributes(node))
            graph = helper.make_graph(
                [proto], "fold",
                [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), None)
                 for n, v in zip(in_names, inputs) if v is not None],
                [onnx.ValueInfoProto(name=n) for n in out_names if n])
            m = helper.make_model(graph, opset_imports=self.opsets)
            m.ir_version = self.ir_version
            key = m.SerializeToString(deterministic=True)
        except (ValueError, TypeError, KeyError) as exc:
            raise NotEvaluable(f"cannot express the node: {exc}") from exc
        session = self.sessions.get(key, False)
        if session is False:
            import onnxruntime as ort

            try:
                session = ort.InferenceSession(key, sess_options=self.options,
                                               providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime rejects the node
                self.sessions[key] = None
                raise NotEvaluable(_first_line(exc)) from exc
            self.sessions[key] = session
        if session is None:
            raise NotEvaluable("onnxruntime rejects this node")
        feeds = {n: np.asarray(v) for n, v in zip(in_names, inputs) if v is not None}
        try:
            results = session.run([n for n in out_names if n], feeds)
        except Exception as exc:
            raise NotEvaluable(_first_line(exc)) from exc
        it = iter(results)
        out: list[np.ndarray | None] = []
        for n in out_names:
            if not n:
                out.append(None)
                continue
            r = next(it)
            if not isinstance(r, np.ndarray):
                raise NotEvaluable("result is not a tensor")
            out.append(r)
        return out


def _attributes(node: gs.Node) -> list[onnx.AttributeProto]:
    types = vars(node).get("attr_types", {})
    out = []
    for key, value in node.attrs.items():
        if isinstance(value, RawAttribute):
            out.append(value.proto)
        elif isinstance(value, gs.Constant):
            out.append(helper.make_attribute(key, numpy_helper.from_array(np.asarray(value.values))))
        elif isinstance(value, gs.Graph):
            raise ValueError("graph attribute")
        elif key in types:
            out.append(helper.make_attribute(key, value, attr_type=types[key]))
        else:
            out.append(helper.make_attribute(key, value))
    return out


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
