"""The torch op table, part one: element-wise math, comparisons, reductions, casts and
the ops that move or reshape data, each with ONNX's semantics (opset differences
included: axes as attribute or input, Softmax's coercion to 2-D before opset 13, integer
division that truncates, round-half-to-even).

Every entry is a *builder*: ``builder(node, opset)`` reads the node's attributes once and
returns ``fn(args) -> tensor | tuple`` that the interpreter (:mod:`.module`) calls each
forward, ``args`` being the node's inputs as torch tensors (None for an omitted optional
input). Layers (convolution, pooling, normalization, resizing, recurrences, Q/DQ) are in
:mod:`.ops_layers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.nn.functional as F

__all__ = ["OPS", "op", "torch_dtype", "ints", "attr_or_input", "axis_of"]

OpFn = Callable[[list], object]
OPS: dict[str, Callable[[gs.Node, int], OpFn]] = {}

_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT16: torch.int16, onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.UINT16: torch.uint16, onnx.TensorProto.UINT32: torch.uint32,
    onnx.TensorProto.UINT64: torch.uint64,
}


def op(*names: str):
    """Register a builder under one or more op types."""
    def deco(builder):
        for n in names:
            OPS[n] = builder
        return builder
    return deco


def torch_dtype(onnx_type: int) -> torch.dtype:
    try:
        return _DTYPES[int(onnx_type)]
    except KeyError:
        raise NotImplementedError(f"element type {onnx.TensorProto.DataType.Name(int(onnx_type))}") from None


def ints(x) -> list[int]:
    """A shape-like tensor (or list) as Python ints."""
    if x is None:
        return []
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.reshape(-1).tolist()]
    return [int(v) for v in np.asarray(x).reshape(-1)]


def attr_or_input(node: gs.Node, args: list, index: int, attr: str) -> list[int] | None:
    """An int-list operand given as input ``index`` (newer opsets) or attribute ``attr``."""
    if len(args) > index and args[index] is not None:
        return ints(args[index])
    value = node.attrs.get(attr)
    return None if value is None else [int(v) for v in value]


def axis_of(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# --------------------------------------------------------------------------------------
# Element-wise
# --------------------------------------------------------------------------------------

_UNARY = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp,
    "Log": torch.log, "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round,
    "Sign": torch.sign, "Erf": torch.erf, "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan,
    "Softplus": F.softplus, "Softsign": F.softsign, "Not": torch.logical_not,
    "IsNaN": torch.isnan, "HardSwish": F.hardswish, "Asin": torch.asin, "Acos": torch.acos,
    "Atan": torch.atan, "Sinh": torch.sinh, "Cosh": torch.cosh,
}


@op(*_UNARY)
def _unary(node, opset):
    fn = _UNARY[node.op]
    return lambda args: fn(args[0])


@op("Identity", "Dropout")
def _identity(node, opset):
    if node.op == "Dropout" and len(node.outputs) > 1:
        return lambda args: (args[0], torch.ones_like(args[0], dtype=torch.bool))
    return lambda args: args[0]


def _div(a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


_BINARY = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div, "Pow": torch.pow,
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or,
    "Xor": torch.logical_xor, "BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or,
}


@op(*_BINARY)
def _binary(node, opset):
    fn = _BINARY[node.op]
    if node.op == "Pow":
        return lambda args: torch.pow(args[0], args[1]).to(args[0].dtype)
    return lambda args: fn(args[0], args[1])


@op("Mod")
def _mod(node, opset):
    if node.attrs.get("fmod", 0):
        return lambda args: torch.fmod(args[0], args[1])
    return lambda args: torch.remainder(args[0], args[1])


@op("Max", "Min", "Sum", "Mean")
def _variadic(node, opset):
    kind = node.op

    def fn(args):
        xs = [a for a in args if a is not None]
        out = xs[0]
        for x in xs[1:]:
            out = torch.maximum(out, x) if kind == "Max" else torch.minimum(out, x) if kind == "Min" else out + x
        return out / len(xs) if kind == "Mean" else out
    return fn


@op("Where")
def _where(node, opset):
    return lambda args: torch.where(args[0], args[1], args[2])


@op("Clip")
def _clip(node, opset):
    if opset < 11:
        lo, hi = node.attrs.get("min"), node.attrs.get("max")
        return lambda args: torch.clamp(args[0], lo, hi)

    def fn(args):
        x = args[0]
        lo = args[1] if len(args) > 1 else None
        hi = args[2] if len(args) > 2 else None
        if lo is not None:
            x = torch.maximum(x, lo.to(x.dtype))
        if hi is not None:
            x = torch.minimum(x, hi.to(x.dtype))
        return x
    return fn


@op("LeakyRelu", "Elu", "Selu", "Celu", "ThresholdedRelu")
def _alpha_activations(node, opset):
    a = float(node.attrs.get("alpha", {"LeakyRelu": 0.01, "ThresholdedRelu": 1.0}.get(node.op, 1.0)))
    if node.op == "LeakyRelu":
        return lambda args: F.leaky_relu(args[0], a)
    if node.op == "Elu":
        return lambda args: F.elu(args[0], a)
    if node.op == "Celu":
        return lambda args: F.celu(args[0], a)
    if node.op == "ThresholdedRelu":
        return lambda args: torch.where(args[0] > a, args[0], torch.zeros_like(args[0]))
    alpha = float(node.attrs.get("alpha", 1.67326319217681884765625))
    gamma = float(node.attrs.get("gamma", 1.05070102214813232421875))
    return lambda args: gamma * torch.where(args[0] > 0, args[0], alpha * (torch.exp(args[0]) - 1))


@op("HardSigmoid")
def _hard_sigmoid(node, opset):
    a, b = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
    return lambda args: torch.clamp(args[0] * a + b, 0.0, 1.0)


@op("PRelu")
def _prelu(node, opset):
    return lambda args: torch.where(args[0] >= 0, args[0], args[0] * args[1])


@op("Gelu")
def _gelu(node, opset):
    approximate = node.attrs.get("approximate", "none")
    return lambda args: F.gelu(args[0], approximate=approximate)


# --------------------------------------------------------------------------------------
# Softmax family, reductions, arg-extrema, cumulative sums
# --------------------------------------------------------------------------------------


@op("Softmax", "LogSoftmax", "Hardmax")
def _softmax(node, opset):
    axis = int(node.attrs.get("axis", -1 if opset >= 13 else 1))
    kind = node.op

    def apply(x, dim):
        if kind == "Softmax":
            return torch.softmax(x, dim)
        if kind == "LogSoftmax":
            return torch.log_softmax(x, dim)
        return F.one_hot(x.argmax(dim), x.shape[dim]).to(x.dtype).movedim(-1, dim)

    def fn(args):
        x = args[0]
        a = axis_of(axis, x.dim())
        if opset >= 13 or a == x.dim() - 1:
            return apply(x, a)
        shape = x.shape
        return apply(x.reshape(math.prod(shape[:a]), -1), 1).reshape(shape)
    return fn


_REDUCE = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "amax", "ReduceMin": "amin",
           "ReduceProd": "prod", "ReduceL1": "l1", "ReduceL2": "l2", "ReduceSumSquare": "sumsq",
           "ReduceLogSumExp": "lse", "ReduceLogSum": "logsum"}


@op(*_REDUCE)
def _reduce(node, opset):
    kind = _REDUCE[node.op]
    keep = bool(node.attrs.get("keepdims", 1))
    noop = bool(node.attrs.get("noop_with_empty_axes", 0))

    def fn(args):
        x = args[0]
        axes = attr_or_input(node, args, 1, "axes")
        if not axes:
            if noop:
                return x
            axes = list(range(x.dim()))
        dims = sorted(axis_of(a, x.dim()) for a in axes)
        if kind == "mean":
            return x.mean(dims, keepdim=keep)
        if kind == "sum":
            return x.sum(dims, keepdim=keep)
        if kind == "amax":
            return x.amax(dims, keepdim=keep)
        if kind == "amin":
            return x.amin(dims, keepdim=keep)
        if kind == "l1":
            return x.abs().sum(dims, keepdim=keep)
        if kind == "l2":
            return (x * x).sum(dims, keepdim=keep).sqrt()
        if kind == "sumsq":
            return (x * x).sum(dims, keepdim=keep)
        if kind == "lse":
            return torch.logsumexp(x, dims, keepdim=keep)
        if kind == "logsum":
            return x.sum(dims, keepdim=keep).log()
        out = x
        for d in reversed(dims):
            out = out.prod(d, keepdim=keep)
        return out
    return fn


@op("ArgMax", "ArgMin")
def _argext(node, opset):
    axis = int(node.attrs.get("axis", 0))
    keep = bool(node.attrs.get("keepdims", 1))
    last = bool(node.attrs.get("select_last_index", 0))
    largest = node.op == "ArgMax"

    def fn(args):
        x = args[0]
        a = axis_of(axis, x.dim())
        if last:
            x = x.flip(a)
        out = x.argmax(a, keepdim=keep) if largest else x.argmin(a, keepdim=keep)
        return x.shape[a] - 1 - out if last else out
    return fn


@op("CumSum")
def _cumsum(node, opset):
    exclusive, reverse = bool(node.attrs.get("exclusive", 0)), bool(node.attrs.get("reverse", 0))

    def fn(args):
        x = args[0]
        a = axis_of(ints(args[1])[0], x.dim())
        if reverse:
            x = x.flip(a)
        out = torch.cumsum(x, a)
        if exclusive:
            out = out - x
        return out.flip(a) if reverse else out
    return fn


# --------------------------------------------------------------------------------------
# Casts, shapes and constants
# --------------------------------------------------------------------------------------


@op("Cast")
def _cast(node, opset):
    to = torch_dtype(node.attrs["to"])
    return lambda args: args[0].to(to)


@op("CastLike")
def _cast_like(node, opset):
    return lambda args: args[0].to(args[1].dtype)


@op("Shape")
def _shape(node, opset):
    start, end = node.attrs.get("start", 0), node.attrs.get("end")
    return lambda args: torch.tensor(list(args[0].shape)[slice(start, end)], dtype=torch.int64)


@op("Size")
def _size(node, opset):
    return lambda args: torch.tensor(args[0].numel(), dtype=torch.int64)


@op("ConstantOfShape")
def _constant_of_shape(node, opset):
    value = node.attrs.get("value")
    fill = np.asarray(value.values).reshape(-1) if isinstance(value, gs.Constant) else np.zeros(1, np.float32)
    fill_t = torch.from_numpy(fill.copy())
    return lambda args: fill_t[0].expand(ints(args[0])).clone() if ints(args[0]) else fill_t[0].clone()


@op("Range")
def _range(node, opset):
    def fn(args):
        start, limit, delta = (a.reshape(()) for a in args[:3])
        if start.is_floating_point():
            n = max(int(math.ceil((float(limit) - float(start)) / float(delta))), 0)
            return start + torch.arange(n, dtype=start.dtype) * delta
        return torch.arange(int(start), int(limit), int(delta), dtype=start.dtype)
    return fn


@op("EyeLike")
def _eye_like(node, opset):
    k = int(node.attrs.get("k", 0))
    dtype = node.attrs.get("dtype")

    def fn(args):
        x = args[0]
        out = torch.zeros(x.shape, dtype=torch_dtype(dtype) if dtype is not None else x.dtype)
        n, m = x.shape
        for i in range(n):
            if 0 <= i + k < m:
                out[i, i + k] = 1
        return out
    return fn


# --------------------------------------------------------------------------------------
# Moving data
# --------------------------------------------------------------------------------------


@op("Reshape")
def _reshape(node, opset):
    allowzero = bool(node.attrs.get("allowzero", 0))

    def fn(args):
        x, shape = args[0], ints(args[1])
        if not allowzero:
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)
    return fn


@op("Flatten")
def _flatten(node, opset):
    axis = int(node.attrs.get("axis", 1))

    def fn(args):
        x = args[0]
        a = axis_of(axis, x.dim())
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))
    return fn


@op("Transpose")
def _transpose(node, opset):
    perm = node.attrs.get("perm")
    return lambda args: args[0].permute(perm if perm is not None else list(range(args[0].dim() - 1, -1, -1)))


@op("Squeeze")
def _squeeze(node, opset):
    def fn(args):
        axes = attr_or_input(node, args, 1, "axes")
        x = args[0]
        if not axes:
            return x.squeeze()
        return x.squeeze(tuple(axis_of(a, x.dim()) for a in axes))
    return fn


@op("Unsqueeze")
def _unsqueeze(node, opset):
    def fn(args):
        axes = attr_or_input(node, args, 1, "axes")
        x = args[0]
        rank = x.dim() + len(axes)
        for a in sorted(axis_of(a, rank) for a in axes):
            x = x.unsqueeze(a)
        return x
    return fn


@op("Concat")
def _concat(node, opset):
    axis = int(node.attrs["axis"])
    return lambda args: torch.cat([a for a in args if a is not None], axis)


@op("Split")
def _split(node, opset):
    axis = int(node.attrs.get("axis", 0))
    n = len(node.outputs)

    def fn(args):
        x = args[0]
        a = axis_of(axis, x.dim())
        sizes = attr_or_input(node, args, 1, "split")
        if not sizes:
            dim = x.shape[a]
            step = -(-dim // n)
            sizes = [min(step, dim - i * step) for i in range(n)]
        return tuple(torch.split(x, sizes, a))
    return fn


def _slice_axis(x, a: int, start: int, end: int, step: int):
    dim = x.shape[a]
    if step > 0:
        s = min(max(start + dim if start < 0 else start, 0), dim)
        e = min(max(end + dim if end < 0 else end, 0), dim)
        index = [slice(None)] * x.dim()
        index[a] = slice(s, e, step)
        return x[tuple(index)]
    s = min(max(start + dim if start < 0 else start, -1), dim - 1)
    e = min(max(end + dim if end < 0 else end, -1), dim - 1)
    picks = torch.arange(s, e, step, dtype=torch.int64)
    return x.index_select(a, picks)


@op("Slice")
def _slice(node, opset):
    def fn(args):
        x = args[0]
        if opset < 10:
            starts, ends = node.attrs["starts"], node.attrs["ends"]
            axes, steps = node.attrs.get("axes"), None
        else:
            starts, ends = ints(args[1]), ints(args[2])
            axes = ints(args[3]) if len(args) > 3 and args[3] is not None else None
            steps = ints(args[4]) if len(args) > 4 and args[4] is not None else None
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        for s, e, a, st in zip(starts, ends, axes, steps):
            x = _slice_axis(x, axis_of(int(a), x.dim()), int(s), int(e), int(st))
        return x
    return fn


@op("Gather")
def _gather(node, opset):
    axis = int(node.attrs.get("axis", 0))

    def fn(args):
        x, idx = args[0], args[1].to(torch.int64)
        a = axis_of(axis, x.dim())
        idx = torch.where(idx < 0, idx + x.shape[a], idx)
        out = x.index_select(a, idx.reshape(-1))
        return out.reshape(tuple(x.shape[:a]) + tuple(idx.shape) + tuple(x.shape[a + 1:]))
    return fn


@op("GatherElements")
def _gather_elements(node, opset):
    axis = int(node.attrs.get("axis", 0))

    def fn(args):
        x, idx = args[0], args[1].to(torch.int64)
        a = axis_of(axis, x.dim())
        return torch.gather(x, a, torch.where(idx < 0, idx + x.shape[a], idx))
    return fn


@op("Expand")
def _expand(node, opset):
    def fn(args):
        x, shape = args[0], ints(args[1])
        out = torch.broadcast_shapes(tuple(x.shape), tuple(shape))
        return x.expand(out)
    return fn


@op("Tile")
def _tile(node, opset):
    return lambda args: args[0].repeat(ints(args[1]))


@op("Einsum")
def _einsum(node, opset):
    equation = node.attrs["equation"]
    equation = equation.decode() if isinstance(equation, bytes) else equation
    return lambda args: torch.einsum(equation, *args)


@op("Trilu")
def _trilu(node, opset):
    upper = bool(node.attrs.get("upper", 1))

    def fn(args):
        k = ints(args[1])[0] if len(args) > 1 and args[1] is not None else 0
        return torch.triu(args[0], k) if upper else torch.tril(args[0], k)
    return fn


@op("Pad")
def _pad(node, opset):
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode

    def fn(args):
        x = args[0]
        if opset < 11:
            pads, value = list(node.attrs["pads"]), float(node.attrs.get("value", 0.0))
            axes = None
        else:
            pads = ints(args[1])
            value = args[2].reshape(()).item() if len(args) > 2 and args[2] is not None else 0
            axes = ints(args[3]) if len(args) > 3 and args[3] is not None else None
        axes = [axis_of(a, x.dim()) for a in axes] if axes is not None else list(range(x.dim()))
        n = len(axes)
        full = [0] * (2 * x.dim())
        for i, a in enumerate(axes):
            full[a], full[x.dim() + a] = pads[i], pads[n + i]
        torch_pads = []
        for a in range(x.dim() - 1, -1, -1):
            torch_pads += [full[a], full[x.dim() + a]]
        while len(torch_pads) > 2 and torch_pads[-1] == 0 and torch_pads[-2] == 0:
            torch_pads = torch_pads[:-2]
        if mode == "constant":
            return F.pad(x, torch_pads, value=value)
        torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
        return F.pad(x, torch_pads, mode=torch_mode)
    return fn
