"""The dataflow steps of the random graph generator, and the builder they share.

A step reads tensors of the builder's pool (of the graph being built, or of the graph
around it for a body) and adds nodes and tensors whose shapes it computes itself. A
step returns False when the pool holds nothing it can use. Besides the ordinary ops,
some steps build what looks like a rewrite target but is not one: a ``x+0`` whose zero
broadcasts ``x`` to a larger shape, a node repeated with one attribute changed, two
constants with the same bytes but another shape or type, a scale after a MatMul or
Conv that is not per output channel. A pass that takes those for no-ops, duplicates
or foldable scales changes the outputs, and the differential run sees it.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["T", "Builder", "F", "DATAFLOW", "batchnorm"]

F = TensorProto.FLOAT


@dataclass
class T:
    """A float tensor of the graph being built, with its concrete shape."""

    name: str
    shape: tuple[int, ...]


class Builder:
    """Nodes, initializers and the pool of tensors a step may read."""

    def __init__(self, rng: random.Random, opset: int, prefix: str = "", outer: Builder | None = None):
        self.depth = 0 if outer is None else outer.depth + 1
        self.rng = rng
        self.np = np.random.default_rng(rng.randrange(2**32))
        self.opset = opset
        self.prefix = prefix
        self.outer = outer
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.pool: list[T] = []
        self.consts: dict[bytes, str] = {}
        self.value_info: list[onnx.ValueInfoProto] = []
        self.graph_inputs: list[T] = []
        #: declare intermediate shapes (not when the batch is dynamic: the shapes here
        #: are those of batch 1, and a declaration must not contradict other batches)
        self.declare = True if outer is None else outer.declare
        self.n = 0

    # ---- names, constants, nodes ------------------------------------------------------

    def name(self, base: str) -> str:
        root = self
        while root.outer is not None:
            root = root.outer
        root.n += 1
        return f"{self.prefix}{base}{root.n}"

    def const(self, arr: np.ndarray, base: str = "c") -> str:
        """A constant: an initializer, a Constant node, a reuse of a byte-identical
        constant, or a copy of one under a new name (what dedup-weights merges)."""
        arr = np.array(arr, copy=True)  # (ascontiguousarray would make a scalar 1-D)
        key = arr.dtype.str.encode() + str(arr.shape).encode() + arr.tobytes()
        r = self.rng.random()
        if key in self.consts and r < 0.5:
            return self.consts[key]
        name = self.name(base)
        if r < (0.6 if self.outer is not None else 0.3):
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name)))
        else:
            self.inits.append(numpy_helper.from_array(arr, name))
        self.consts.setdefault(key, name)
        return name

    def op(self, op: str, inputs: list[str], shapes: list[tuple[int, ...]] | tuple[int, ...], *,
           pool: bool = True, **attrs) -> list[T] | T:
        many = isinstance(shapes, list)
        outs = [T(self.name(op.lower()), tuple(s)) for s in (shapes if many else [shapes])]
        self.nodes.append(helper.make_node(op, inputs, [t.name for t in outs], name=self.name(op), **attrs))
        if pool:
            self.pool.extend(outs)
        if pool and self.declare and self.rng.random() < 0.25:  # exporters declare some shapes
            self.value_info.extend(helper.make_tensor_value_info(t.name, F, list(t.shape)) for t in outs)
        return outs if many else outs[0]

    def weight(self, *shape: int, scale: float | None = None) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else max(shape[0], 1)
        s = scale if scale is not None else 1.0 / math.sqrt(max(fan_in, 1))
        return (self.np.standard_normal(shape) * s).astype(np.float32)

    def visible(self) -> list[T]:
        """The tensors a node here may read: this graph's, then (for a body) the outer
        graphs' — the outer-scope references."""
        return self.pool + (self.outer.visible() if self.outer is not None else [])

    def pick(self, rank: tuple[int, ...] | None = None) -> T | None:
        """A tensor of the pool (recent ones more often; an outer one now and then in a
        body), optionally of one of ``rank``."""
        cands = [t for t in self.pool if rank is None or len(t.shape) in rank]
        if self.outer is not None:
            cands = [t for t in self.outer.visible() if (rank is None or len(t.shape) in rank)
                     and self.rng.random() < 0.3] + cands
        if not cands:
            return None
        k = len(cands)
        return cands[min(k - 1, int(k * (1 - self.rng.random() ** 2)))]

    def ints(self, values) -> str:
        return self.const(np.array(values, np.int64), "i")


# --------------------------------------------------------------------------------------
# Steps: each reads the pool and adds to it, or returns False when nothing fits
# --------------------------------------------------------------------------------------

_UNARY = ["Relu", "Sigmoid", "Tanh", "Neg", "Abs", "LeakyRelu", "Elu", "Softsign", "HardSigmoid", "Erf",
          "Identity", "Softplus", "HardSwish", "Selu", "Celu", "Sin"]


def unary(b: Builder) -> bool:
    x = b.pick()
    if x is None:
        return False
    op = b.rng.choice(_UNARY)
    if op == "HardSwish" and b.opset < 14:
        op = "HardSigmoid"
    attrs = {"alpha": 0.1} if op == "LeakyRelu" else {}
    b.op(op, [x.name], x.shape, **attrs)
    return True


def _broadcast_operand(b: Builder, x: T) -> tuple[str, tuple[int, ...]]:
    """Something to combine with ``x``: another tensor of its shape, or a constant of a
    shape that broadcasts to it (scalar, last axis, per channel, full)."""
    same = [t for t in b.pool if t.shape == x.shape and t is not x]
    r = b.rng.random()
    if same and r < 0.35:
        return b.rng.choice(same).name, x.shape
    rank = len(x.shape)
    kind = b.rng.choice(["scalar", "last", "channel", "full"])
    if kind == "scalar" or rank == 0:
        shape: tuple[int, ...] = () if b.rng.random() < 0.5 else (1,)
    elif kind == "last":
        shape = (x.shape[-1],)
    elif kind == "channel" and rank >= 2:
        shape = (x.shape[1],) + (1,) * (rank - 2)
    else:
        shape = x.shape
    return b.const(b.weight(*shape, scale=1.0) if shape else np.float32(b.np.standard_normal())), shape


def binary(b: Builder) -> bool:
    x = b.pick()
    if x is None:
        return False
    op = b.rng.choice(["Add", "Sub", "Mul", "Max", "Min", "Div", "Pow", "Add", "Mul"])
    if op == "Div":
        d = b.np.uniform(0.5, 2.0, x.shape[-1:] if x.shape else ()).astype(np.float32)
        d *= b.np.choice([-1.0, 1.0], d.shape).astype(np.float32)
        b.op("Div", [x.name, b.const(d)], x.shape)
        return True
    if op == "Pow":
        b.op("Pow", [x.name, b.const(np.array(b.rng.choice([2.0, 3.0, 1.0]), np.float32))], x.shape)
        return True
    y, _ = _broadcast_operand(b, x)
    args = [x.name, y] if b.rng.random() < 0.7 else [y, x.name]
    b.op(op, args, x.shape)
    return True


def noop(b: Builder) -> bool:
    """What eliminate-noops removes: x+0, x*1, x-0, x/1, Identity, Dropout, a Cast to the
    same type, an identity Transpose/Reshape/Slice/Pad/Expand, Unsqueeze then Squeeze."""
    x = b.pick()
    if x is None:
        return False
    rank = len(x.shape)
    kind = b.rng.choice(["add0", "mul1", "sub0", "div1", "identity", "dropout", "cast", "transpose",
                         "reshape", "slice", "pad", "expand", "unsqueeze"])
    if kind in ("add0", "mul1", "sub0", "div1"):
        value = 0.0 if kind in ("add0", "sub0") else 1.0
        shape = b.rng.choice([(), (1,), x.shape[-1:] if rank else ()])
        op = {"add0": "Add", "mul1": "Mul", "sub0": "Sub", "div1": "Div"}[kind]
        c = b.const(np.full(shape, value, np.float32))
        b.op(op, [c, x.name] if op in ("Add", "Mul") and b.rng.random() < 0.3 else [x.name, c], x.shape)
    elif kind == "identity":
        b.op("Identity", [x.name], x.shape)
    elif kind == "dropout":
        b.op("Dropout", [x.name], x.shape)
    elif kind == "cast":
        b.op("Cast", [x.name], x.shape, to=F)
    elif kind == "transpose" and rank:
        b.op("Transpose", [x.name], x.shape, perm=list(range(rank)))
    elif kind == "reshape":
        b.op("Reshape", [x.name, b.ints(list(x.shape))], x.shape)
    elif kind == "slice" and rank:
        axis = b.rng.randrange(rank)
        b.op("Slice", [x.name, b.ints([0]), b.ints([2**62 if b.rng.random() < 0.5 else x.shape[axis]]),
                       b.ints([axis])], x.shape)
    elif kind == "pad" and rank:
        b.op("Pad", [x.name, b.ints([0] * (2 * rank))], x.shape)
    elif kind == "expand":
        b.op("Expand", [x.name, b.ints(list(x.shape))], x.shape)
    else:
        axis = b.rng.randrange(rank + 1)
        u = b.op("Unsqueeze", [x.name, b.ints([axis])], x.shape[:axis] + (1,) + x.shape[axis:], pool=False)
        b.op("Squeeze", [u.name, b.ints([axis])], x.shape)
    return True


def matmul(b: Builder) -> bool:
    """MatMul by a weight (bias Add after it sometimes: fuse's MatMul+Add→Gemm when 2-D)."""
    x = b.pick(rank=(2, 3, 4))
    if x is None:
        return False
    k, m = x.shape[-1], b.rng.choice([2, 3, 4, 8, 16])
    y = b.op("MatMul", [x.name, b.const(b.weight(k, m))], x.shape[:-1] + (m,))
    if b.rng.random() < 0.6:
        bias = b.const(b.weight(m, scale=0.5))
        b.op("Add", [y.name, bias] if b.rng.random() < 0.7 else [bias, y.name], y.shape)
    return True


def gemm(b: Builder) -> bool:
    x = b.pick(rank=(2,))
    if x is None:
        return False
    k, m = x.shape[1], b.rng.choice([2, 4, 8])
    trans_b = b.rng.random() < 0.5
    w = b.const(b.weight(m, k) if trans_b else b.weight(k, m))
    inputs = [x.name, w]
    attrs = {"transB": 1} if trans_b else {}
    if b.rng.random() < 0.3:
        attrs["alpha"] = b.rng.choice([0.5, 2.0])
    if b.rng.random() < 0.5:
        inputs.append(b.const(b.weight(*b.rng.choice([(m,), (1, m), (x.shape[0], m)]), scale=0.5)))
        if b.rng.random() < 0.3:
            attrs["beta"] = b.rng.choice([0.5, 2.0])
    y = b.op("Gemm", inputs, (x.shape[0], m), **attrs)
    if len(inputs) == 2 and b.rng.random() < 0.5:
        b.op("Add", [y.name, b.const(b.weight(m, scale=0.5))], y.shape)
    return True


def _conv_out(h: int, k: int, s: int, d: int, p0: int, p1: int) -> int:
    return (h + p0 + p1 - d * (k - 1) - 1) // s + 1


def conv(b: Builder) -> bool:
    """Conv (grouped or depthwise sometimes, with or without bias), then BatchNorm, a
    per-channel Mul/Add or a bias Add: what fold-batchnorm and fuse fold."""
    x = b.pick(rank=(4,))
    if x is None:
        return False
    n, c, h, w = x.shape
    group = c if c > 1 and b.rng.random() < 0.25 else 1
    m = c * b.rng.choice([1, 2]) if group > 1 else b.rng.choice([2, 4, 8])
    k = b.rng.choice([1, 3]) if min(h, w) >= 3 else 1
    s = b.rng.choice([1, 1, 2])
    d = 2 if k == 3 and min(h, w) >= 5 and b.rng.random() < 0.2 else 1
    p = b.rng.choice([0, k // 2])
    oh, ow = _conv_out(h, k, s, d, p, p), _conv_out(w, k, s, d, p, p)
    if oh < 1 or ow < 1:
        return False
    transpose = group == 1 and b.rng.random() < 0.15
    if transpose:
        oh, ow = s * (h - 1) + (k - 1) * d + 1 - 2 * p, s * (w - 1) + (k - 1) * d + 1 - 2 * p
        if oh < 1 or ow < 1:
            return False
        wt = b.weight(c, m, k, k)
    else:
        wt = b.weight(m, c // group, k, k)
    inputs = [x.name, b.const(wt)]
    if b.rng.random() < 0.4:
        inputs.append(b.const(b.weight(m, scale=0.5)))
    attrs = {"kernel_shape": [k, k], "strides": [s, s], "pads": [p] * 4, "dilations": [d, d]}
    if group > 1:
        attrs["group"] = group
    y = b.op("ConvTranspose" if transpose else "Conv", inputs, (n, m, oh, ow), **attrs)
    after = b.rng.choice(["bn", "mul", "add", "muladd", "none"])
    if after == "bn":
        batchnorm(b, y)
    elif after != "none":
        cshape = b.rng.choice([(m, 1, 1), (1, m, 1, 1)])
        if "mul" in after:
            y = b.op("Mul", [y.name, b.const(b.np.uniform(0.5, 1.5, cshape).astype(np.float32))], y.shape)
        if "add" in after:
            b.op("Add", [y.name, b.const(b.weight(*cshape, scale=0.5))], y.shape)
    return True


def batchnorm(b: Builder, x: T) -> T:
    c = x.shape[1]
    scale = b.np.uniform(0.5, 1.5, c).astype(np.float32)
    bias = (0.2 * b.np.standard_normal(c)).astype(np.float32)
    mean = (0.2 * b.np.standard_normal(c)).astype(np.float32)
    var = b.np.uniform(0.5, 2.0, c).astype(np.float32)
    return b.op("BatchNormalization", [x.name] + [b.const(v) for v in (scale, bias, mean, var)], x.shape,
                epsilon=1e-5)


def normalize(b: Builder) -> bool:
    x = b.pick(rank=(2, 3, 4))
    if x is None:
        return False
    kind = b.rng.choice(["bn", "ln", "in"] if len(x.shape) >= 3 else ["bn", "ln"])
    if kind == "ln" and b.opset < 17:  # LayerNormalization came with opset 17
        kind = "bn"
    if kind == "bn":
        batchnorm(b, x)
    elif kind == "ln":
        d = x.shape[-1]
        inputs = [x.name, b.const(b.np.uniform(0.5, 1.5, d).astype(np.float32))]
        if b.rng.random() < 0.7:
            inputs.append(b.const(b.weight(d, scale=0.2)))
        b.op("LayerNormalization", inputs, x.shape, axis=-1, epsilon=1e-5)
    else:
        c = x.shape[1]
        b.op("InstanceNormalization", [x.name, b.const(b.np.uniform(0.5, 1.5, c).astype(np.float32)),
                                       b.const(b.weight(c, scale=0.2))], x.shape, epsilon=1e-5)
    return True


def concat(b: Builder) -> bool:
    x = b.pick(rank=(1, 2, 3, 4))
    if x is None:
        return False
    rank = len(x.shape)
    axis = b.rng.randrange(rank)
    mates = [t for t in b.pool if len(t.shape) == rank
             and all(i == axis or t.shape[i] == x.shape[i] for i in range(rank))]
    parts = [x] + b.rng.sample(mates, min(len(mates), b.rng.choice([1, 2])))
    names = [t.name for t in parts]
    if b.rng.random() < 0.3:  # a constant slab
        shape = list(x.shape)
        shape[axis] = b.rng.choice([1, 2])
        names.append(b.const(b.weight(*shape, scale=1.0)))
        total = sum(t.shape[axis] for t in parts) + shape[axis]
    else:
        total = sum(t.shape[axis] for t in parts)
    out = list(x.shape)
    out[axis] = total
    b.op("Concat", names, tuple(out), axis=axis - rank if b.rng.random() < 0.3 else axis)
    return True


def split(b: Builder) -> bool:
    x = b.pick(rank=(1, 2, 3, 4))
    if x is None:
        return False
    axes = [i for i, d in enumerate(x.shape) if d >= 2]
    if not axes:
        return False
    axis = b.rng.choice(axes)
    dim = x.shape[axis]
    cut = b.rng.randrange(1, dim)
    sizes = [cut, dim - cut]
    shapes = []
    for sz in sizes:
        s = list(x.shape)
        s[axis] = sz
        shapes.append(tuple(s))
    b.op("Split", [x.name, b.ints(sizes)], shapes, axis=axis)
    return True


def slice_(b: Builder) -> bool:
    x = b.pick(rank=(1, 2, 3, 4))
    if x is None:
        return False
    rank = len(x.shape)
    axes = b.rng.sample(range(rank), b.rng.randint(1, rank))
    starts, ends, steps, index = [], [], [], [slice(None)] * rank
    for a in axes:
        dim = x.shape[a]
        step = b.rng.choice([1, 1, 1, 2, -1])
        if step > 0:
            start = b.rng.choice([0, 1, -dim, -1]) if dim > 1 else 0
            end = b.rng.choice([dim, 2**62, -1, dim - 1]) if dim > 1 else b.rng.choice([dim, 2**62])
        else:
            start = b.rng.choice([-1, dim - 1, 2**62])
            end = b.rng.choice([-(2**62), 0 if dim > 1 else -(2**62)])
        starts.append(start)
        ends.append(end)
        steps.append(step)
        index[a] = slice(start, end, step)
    shape = np.empty(x.shape, np.int8)[tuple(index)].shape
    if 0 in shape:
        return False
    inputs = [x.name, b.ints(starts), b.ints(ends), b.ints([a - rank if b.rng.random() < 0.3 else a for a in axes])]
    if any(s != 1 for s in steps) or b.rng.random() < 0.3:
        inputs.append(b.ints(steps))
    b.op("Slice", inputs, tuple(shape))
    return True


def transpose(b: Builder) -> bool:
    """A Transpose, and sometimes a second one right after it (fuse merges them)."""
    x = b.pick(rank=(2, 3, 4))
    if x is None:
        return False
    for _ in range(b.rng.choice([1, 1, 2])):
        perm = list(range(len(x.shape)))
        b.rng.shuffle(perm)
        x = b.op("Transpose", [x.name], tuple(x.shape[p] for p in perm), perm=perm)
    return True


def _factor_shapes(shape: tuple[int, ...], rng: random.Random) -> tuple[int, ...]:
    total = int(np.prod(shape)) if shape else 1
    r = rng.random()
    if r < 0.3 and len(shape) >= 2:
        i = rng.randrange(len(shape) - 1)
        return shape[:i] + (shape[i] * shape[i + 1],) + shape[i + 2:]
    if r < 0.6:
        divisors = [d for d in range(2, total) if total % d == 0]
        if divisors:
            d = rng.choice(divisors)
            return (d, total // d)
    if r < 0.8 and shape:
        return (shape[0], total // shape[0])
    return (total,)


def reshape(b: Builder) -> bool:
    """Reshape to a new factorization (with -1 or 0 entries sometimes), or Flatten;
    sometimes two in a row (fuse merges them)."""
    x = b.pick()
    if x is None:
        return False
    if b.rng.random() < 0.2 and x.shape:
        axis = b.rng.randrange(len(x.shape) + 1)
        out = (int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))
        b.op("Flatten", [x.name], out, axis=axis)
        return True
    for _ in range(b.rng.choice([1, 1, 2])):
        target = _factor_shapes(x.shape, b.rng)
        spec = list(target)
        if spec and b.rng.random() < 0.3:
            spec[b.rng.randrange(len(spec))] = -1
        if spec and x.shape and spec[0] == x.shape[0] and b.rng.random() < 0.5:
            spec[0] = 0
        x = b.op("Reshape", [x.name, b.ints(spec)], target)
    return True


def dynamic_reshape(b: Builder) -> bool:
    """Shape → Gather → Concat → Reshape: the shape arithmetic that fold-constants folds
    when the dimensions are static."""
    x = b.pick(rank=(2, 3, 4))
    if x is None:
        return False
    s = b.op("Shape", [x.name], (len(x.shape),), pool=False)
    first = b.op("Gather", [s.name, b.ints([0])], (1,), pool=False)
    target = b.op("Concat", [first.name, b.ints([-1])], (2,), pool=False, axis=0)
    b.op("Reshape", [x.name, target.name], (x.shape[0], int(np.prod(x.shape[1:]))))
    return True


def unsqueeze(b: Builder) -> bool:
    x = b.pick(rank=(0, 1, 2, 3))
    if x is None:
        return False
    axis = b.rng.randrange(len(x.shape) + 1)
    y = b.op("Unsqueeze", [x.name, b.ints([axis])], x.shape[:axis] + (1,) + x.shape[axis:])
    if b.rng.random() < 0.4:  # broadcast the new axis out
        shape = list(y.shape)
        shape[axis] = b.rng.choice([2, 3])
        b.op("Expand", [y.name, b.ints(shape)], tuple(shape))
    return True


def reduce(b: Builder) -> bool:
    x = b.pick(rank=(1, 2, 3, 4))
    if x is None:
        return False
    op = b.rng.choice(["ReduceMean", "ReduceSum", "ReduceMax", "Softmax", "GlobalAveragePool", "ReduceL2"])
    rank = len(x.shape)
    if op == "Softmax":
        b.op("Softmax", [x.name], x.shape, axis=b.rng.randrange(-rank, rank))
        return True
    if op == "GlobalAveragePool":
        if rank < 3:
            return False
        b.op(op, [x.name], x.shape[:2] + (1,) * (rank - 2))
        return True
    axes = sorted(b.rng.sample(range(rank), b.rng.randint(1, rank)))
    keep = b.rng.random() < 0.6
    shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape) if keep or i not in axes)
    if op == "ReduceSum" or b.opset >= 18:
        b.op(op, [x.name, b.ints(axes)], shape, keepdims=int(keep))
    else:
        b.op(op, [x.name], shape, axes=axes, keepdims=int(keep))
    return True


def constant_subgraph(b: Builder) -> bool:
    """Arithmetic on constants only (fold-constants evaluates it), then used on a tensor."""
    x = b.pick()
    if x is None:
        return False
    shape = x.shape[-1:] if x.shape else ()
    a = b.const(b.weight(*shape, scale=1.0) if shape else np.float32(0.5))
    c = b.const(b.np.uniform(0.5, 1.5, shape).astype(np.float32))
    t = b.op(b.rng.choice(["Add", "Mul", "Sub"]), [a, c], shape, pool=False)
    t = b.op(b.rng.choice(["Tanh", "Abs", "Neg", "Sigmoid"]), [t.name], shape, pool=False)
    b.op(b.rng.choice(["Add", "Mul"]), [x.name, t.name], x.shape)
    return True


def repeat(b: Builder) -> bool:
    """A node again with the same inputs and attributes (what cse merges); the two
    results meet in an Add."""
    cands = [n for n in b.nodes if n.op_type not in ("Constant", "Split") and len(n.output) == 1
             and any(t.name == n.output[0] for t in b.pool)]
    if not cands:
        return False
    node = b.rng.choice(cands)
    src = next(t for t in b.pool if t.name == node.output[0])
    twin = T(b.name(node.op_type.lower()), src.shape)
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = b.name(node.op_type)
    del copy.output[:]
    copy.output.append(twin.name)
    b.nodes.append(copy)
    b.op("Add", [src.name, twin.name], src.shape)
    return True


def gather_clip(b: Builder) -> bool:
    x = b.pick(rank=(1, 2, 3, 4))
    if x is None:
        return False
    if b.rng.random() < 0.5:
        axis = b.rng.randrange(len(x.shape))
        dim = x.shape[axis]
        idx = [b.rng.randrange(-dim, dim) for _ in range(b.rng.choice([1, 2, 3]))]
        scalar = len(idx) == 1 and b.rng.random() < 0.3
        ind = b.const(np.array(idx[0] if scalar else idx, np.int64), "idx")
        shape = x.shape[:axis] + (() if scalar else (len(idx),)) + x.shape[axis + 1:]
        b.op("Gather", [x.name, ind], shape, axis=axis)
    else:
        lo, hi = sorted(b.np.standard_normal(2).astype(np.float32))
        b.op("Clip", [x.name, b.const(np.array(lo, np.float32)), b.const(np.array(hi, np.float32))], x.shape)
    return True




# --------------------------------------------------------------------------------------
# Look-alikes: rewrite targets that are not
# --------------------------------------------------------------------------------------


def broadcast_lookalike(b: Builder) -> bool:
    """``x+0``, ``x*1``, ``x-0``, ``x/1`` whose constant is larger than ``x``: the result
    is ``x`` broadcast to a new shape, not ``x``."""
    x = b.pick(rank=(0, 1, 2, 3))
    if x is None:
        return False
    extra = b.rng.choice([2, 3])
    ones = [i for i, d in enumerate(x.shape) if d == 1]
    if ones and b.rng.random() < 0.5:
        shape = list(x.shape)
        shape[b.rng.choice(ones)] = extra
        cshape = tuple(shape)
    else:
        cshape = (extra,) + (1,) * len(x.shape) if b.rng.random() < 0.5 else (extra,) + x.shape
    op = b.rng.choice(["Add", "Mul", "Sub", "Div"])
    c = b.const(np.full(cshape, 0.0 if op in ("Add", "Sub") else 1.0, np.float32))
    out = tuple(np.broadcast_shapes(x.shape, cshape))
    b.op(op, [x.name, c] if op in ("Sub", "Div") or b.rng.random() < 0.6 else [c, x.name], out)
    return True


def cast_chain(b: Builder) -> bool:
    """Cast to another type and back: exact through double; through float16, int32 or
    bool it rounds — not a no-op. (The lossy ones only on graph inputs: a value that a
    pass computes one rounding step differently may cross a float16 or integer boundary.)"""
    lossy = [t for t in b.graph_inputs if b.rng.random() < 0.7] if b.outer is None else []
    if lossy and b.rng.random() < 0.5:
        x, to = b.rng.choice(lossy), b.rng.choice([TensorProto.FLOAT16, TensorProto.INT32, TensorProto.BOOL])
    else:
        x, to = b.pick(), TensorProto.DOUBLE
    if x is None:
        return False
    c = b.op("Cast", [x.name], x.shape, pool=False, to=to)
    b.op("Cast", [c.name], x.shape, to=F)
    return True


_ALPHA_OPS = {"LeakyRelu", "Elu", "Celu", "HardSigmoid", "Selu", "Gemm"}


def near_repeat(b: Builder) -> bool:
    """A node again on the same inputs but with one attribute or one constant input
    changed: cse must keep both."""
    cands = [n for n in b.nodes if len(n.output) == 1 and any(t.name == n.output[0] for t in b.pool)
             and (n.op_type in _ALPHA_OPS | {"Transpose", "Softmax"}
                  or any(i in b.consts.values() for i in n.input[1:]))]
    if not cands:
        return False
    node = b.rng.choice(cands)
    src = next(t for t in b.pool if t.name == node.output[0])
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = b.name(node.op_type)
    shape = src.shape
    if node.op_type == "Transpose":
        perm = list(next(a.ints for a in node.attribute if a.name == "perm"))
        if len(perm) < 2:
            return False
        i, j = b.rng.sample(range(len(perm)), 2)
        perm[i], perm[j] = perm[j], perm[i]
        del copy.attribute[:]
        copy.attribute.append(helper.make_attribute("perm", perm))
        src_in = next((t for t in b.visible() if t.name == node.input[0]), None)
        if src_in is None:
            return False
        shape = tuple(src_in.shape[p] for p in perm)
    elif node.op_type == "Softmax":
        rank = len(src.shape)
        del copy.attribute[:]
        copy.attribute.append(helper.make_attribute("axis", b.rng.randrange(-rank, rank) if rank else 0))
    elif node.op_type in _ALPHA_OPS and b.rng.random() < 0.6:
        kept = [a for a in copy.attribute if a.name != "alpha"]
        del copy.attribute[:]
        copy.attribute.extend(kept)
        copy.attribute.append(helper.make_attribute("alpha", b.rng.choice([0.05, 0.3, 1.5])))
    else:
        slots = [k for k, i in enumerate(node.input) if k > 0 and i in b.consts.values()]
        if not slots:
            return False
        k = b.rng.choice(slots)
        key = next(key for key, name in b.consts.items() if name == node.input[k])
        old = _array_of(key)
        if old is None or old.dtype.kind != "f":
            return False
        copy.input[k] = b.const((old + np.float32(0.25)).astype(old.dtype))
    twin = T(b.name(node.op_type.lower()), shape)
    del copy.output[:]
    copy.output.append(twin.name)
    b.nodes.append(copy)
    b.pool.append(twin)
    if shape == src.shape:
        b.op("Sub", [src.name, twin.name], shape)
    return True


def _array_of(key: bytes) -> np.ndarray | None:
    """The array a constant's key (see :meth:`Builder.const`) stands for."""
    import ast

    try:
        dt_end = key.index(b"(")
        shape_end = key.index(b")", dt_end) + 1
        dtype = np.dtype(key[:dt_end].decode())
        shape = ast.literal_eval(key[dt_end:shape_end].decode())
        return np.frombuffer(key[shape_end:], dtype).reshape(shape).copy()
    except Exception:
        return None


def same_bytes(b: Builder) -> bool:
    """Constants with the same bytes as another but another shape or element type:
    dedup-weights must not make one read the other."""
    x = b.pick(rank=(1, 2, 3))
    if x is None:
        return False
    k = x.shape[-1]
    vals = b.weight(k, scale=1.0)
    y = b.op("Add", [x.name, b.const(vals)], x.shape)
    if b.rng.random() < 0.5 and k > 1 and len(x.shape) >= 2 and x.shape[-2] in (1, k):
        out = tuple(np.broadcast_shapes(x.shape, (k, 1)))  # same bytes, shape (k, 1): the other axis
        if int(np.prod(out)) <= 4096:
            b.op("Mul", [y.name, b.const(vals.reshape(k, 1))], out)
            return True
    ints = b.const(vals.view(np.int32))  # same bytes, int32
    f = b.op("Cast", [ints], (k,), pool=False, to=F)
    g = b.op("Mul", [f.name, b.const(np.array(1e-9, np.float32))], (k,), pool=False)
    b.op("Add", [y.name, g.name], x.shape)
    return True


def scale_after(b: Builder) -> bool:
    """A MatMul or Conv and then a Mul/Add by a constant that is per output channel, or
    is not (per row, per spatial position, scalar, full): fold-batchnorm may fold the
    first kind only."""
    x = b.pick(rank=(2, 3, 4))
    if x is None:
        return False
    if len(x.shape) == 4 and b.rng.random() < 0.6:
        n, c, h, w = x.shape
        m = b.rng.choice([2, 4])
        y = b.op("Conv", [x.name, b.const(b.weight(m, c, 1, 1))], (n, m, h, w), kernel_shape=[1, 1])
        shapes = [(m, 1, 1), (1, m, 1, 1), (1, 1, 1, w), (1, 1, h, 1), (h, w), (), (1,), (n, m, h, w), (w,)]
    else:
        m = b.rng.choice([2, 3, 4])
        y = b.op("MatMul", [x.name, b.const(b.weight(x.shape[-1], m))], x.shape[:-1] + (m,))
        shapes = [(m,), (1, m), (x.shape[-2], 1), y.shape, (), (x.shape[-2], m)]
    cshape = b.rng.choice(shapes)
    op = b.rng.choice(["Mul", "Add", "Mul", "Sub", "Div"])
    v = b.np.uniform(0.5, 1.5, cshape).astype(np.float32) if cshape else np.float32(b.np.uniform(0.5, 1.5))
    c = b.const(v)
    out = tuple(np.broadcast_shapes(y.shape, cshape))
    b.op(op, [y.name, c] if op in ("Sub", "Div") or b.rng.random() < 0.7 else [c, y.name], out)
    return True


def pad(b: Builder) -> bool:
    x = b.pick(rank=(2, 3, 4))
    if x is None:
        return False
    rank = len(x.shape)
    mode = b.rng.choice(["constant", "reflect", "edge"])
    pads = [b.rng.choice([0, 0, 1]) for _ in range(2 * rank)]
    if mode == "reflect":
        pads = [p if x.shape[i % rank] > 1 else 0 for i, p in enumerate(pads)]
    shape = tuple(d + pads[i] + pads[i + rank] for i, d in enumerate(x.shape))
    inputs = [x.name, b.ints(pads)]
    if mode == "constant" and b.rng.random() < 0.5:
        inputs.append(b.const(np.array(b.rng.choice([0.0, 1.5]), np.float32)))
    b.op("Pad", inputs, shape, mode=mode)
    return True


DATAFLOW = {
    "unary": (unary, 3), "binary": (binary, 4), "noop": (noop, 3), "matmul": (matmul, 2), "gemm": (gemm, 1.5),
    "conv": (conv, 2.5), "normalize": (normalize, 1.5), "concat": (concat, 1.5), "split": (split, 1),
    "slice": (slice_, 1.5), "transpose": (transpose, 1.5), "reshape": (reshape, 1.5),
    "dynamic-reshape": (dynamic_reshape, 1), "unsqueeze": (unsqueeze, 1), "reduce": (reduce, 1),
    "constant-subgraph": (constant_subgraph, 1), "repeat": (repeat, 1.5), "gather-clip": (gather_clip, 1),
    "broadcast-lookalike": (broadcast_lookalike, 1), "cast-chain": (cast_chain, 0.8),
    "near-repeat": (near_repeat, 1), "same-bytes": (same_bytes, 0.7), "scale-after": (scale_after, 1.5),
    "pad": (pad, 0.7),
}
