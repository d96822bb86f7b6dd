"""Inferred dtype and shape of each tensor of a model, keyed by tensor identity.

:class:`ShapeIndex` is what a pass asks about a gs tensor's type and shape: every pass
uses it, none reads shapes by name. :func:`onnxopt.shapes.infer_shapes` is its engine: it
answers by tensor *name*, for the whole model at once, which is right for work on a
throwaway proto but not for rewrites. They need an answer per gs tensor that they can
trust, which takes three precautions on top of it:

* names are unique only per scope: two sibling subgraphs (an If's branches) may each
  define a tensor ``t``; a name defined more than once in the model gets no shape;
* a dimension is known only as a non-negative integer: exporters write ``-1`` or ``?``
  for dynamic dimensions, and two dimensions spelled ``?`` are not equal;
* shapes inside Loop/Scan bodies come from the bodies' declared inputs, which may not
  hold on every iteration (a loop-carried value can grow): those tensors, the Loop/Scan
  outputs and everything computed from them keep their dtype but get no shape.

Where ONNX inference gives up on a shape it could have ranked — ``Reshape`` before
opset 13 with a computed target says nothing, although the target's length is the
output's rank — the rank (and the dimensions an elementwise op carries through) is
filled in for the common operators, so that one dynamic Reshape does not blind every
rewrite downstream of it. Constants answer from their own value (never loaded for it).
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from .graph import constant_node_value, implicit_inputs, tensor_dtype
from .model import Model, node_subgraphs
from .shapes import TensorInfo, infer_shapes

__all__ = ["ShapeIndex", "known_dims"]

_LOOPING = ("Loop", "Scan")


def known_dims(shape) -> tuple | None:
    """``shape`` with every dimension that is not a non-negative int replaced by None."""
    if shape is None:
        return None
    return tuple(int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape)


#: Ops whose output has the shape of their first input.
_SAME_SHAPE = frozenset({
    "Identity", "Cast", "CastLike", "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid",
    "HardSwish", "Tanh", "Erf", "Gelu", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish",
    "Exp", "Log", "Sqrt", "Neg", "Abs", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Not",
    "Sin", "Cos", "Clip", "Softmax", "LogSoftmax", "Hardmax", "BatchNormalization",
    "LayerNormalization", "InstanceNormalization", "LpNormalization", "Dropout", "IsNaN", "IsInf",
    "CumSum", "ThresholdedRelu", "Shrink",
})
#: Elementwise ops with multidirectional broadcasting.
_BROADCAST = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Equal", "Greater",
    "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor", "Where", "Mod", "BitShift",
})
#: Ops whose output has the rank of their first input (dimensions may change).
_SAME_RANK = frozenset({
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
    "GlobalMaxPool", "LRN", "Resize", "Upsample", "Pad", "Slice", "Tile", "Concat",
    "DepthToSpace", "SpaceToDepth",
})


def _plain_graphs(graph: gs.Graph):
    """The graphs outside any Loop/Scan body (those keep no shapes at all)."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.nodes:
            if node.op not in _LOOPING:
                stack.extend(node_subgraphs(node))


class ShapeIndex:
    """dtype/shape of every tensor of ``model`` as inference computes it, by identity.

    ``shapes`` may pass the result of :func:`infer_shapes` if it was already computed
    for this exact model state. Answers describe the model as it was when the index was
    built: tensors created later are unknown (None). :meth:`for_copy` answers for a copy
    of that model state (``Model.copy()``) without running inference again.
    """

    def __init__(self, model: Model, shapes: dict[str, TensorInfo] | None = None):
        by_name = infer_shapes(model) if shapes is None else shapes
        self._by_name = by_name
        self._info: dict[int, TensorInfo] = {}
        defined: list[tuple[gs.Tensor, bool]] = []
        counts: Counter[str] = Counter()
        tainted: set[int] = set()

        def walk(g: gs.Graph, looping: bool) -> None:
            for t in g.inputs:
                defined.append((t, looping))
                counts[t.name] += 1
            for node in g.nodes:
                taint = looping or node.op in _LOOPING or any(
                    id(t) in tainted for t in itertools.chain(node.inputs, implicit_inputs(node)
                                                              if node_subgraphs(node) else ()))
                for t in node.outputs:
                    if t.name:
                        defined.append((t, taint))
                        counts[t.name] += 1
                        if taint:
                            tainted.add(id(t))
                for sub in node_subgraphs(node):
                    walk(sub, looping or node.op in _LOOPING)

        walk(model.graph, False)
        for t, taint in defined:
            if isinstance(t, gs.Constant):
                continue
            info = by_name.get(t.name) if counts[t.name] == 1 else None
            if info is None:
                continue
            if taint or id(t) in tainted:
                info = TensorInfo(info.dtype, None)
            self._info[id(t)] = info
        self._fill_ranks(model, tainted)

    def for_copy(self, copy: Model) -> ShapeIndex:
        """The index of ``copy``, a copy of the model state this index was built for (its
        tensors are other objects with the same names in the same places)."""
        return ShapeIndex(copy, self._by_name)

    def _fill_ranks(self, model: Model, tainted: set[int]) -> None:
        """Ranks (and carried dimensions) ONNX inference left out, in graph order."""
        for g in _plain_graphs(model.graph):
            for node in g.nodes:
                if node.domain not in (None, "", "ai.onnx") or not node.outputs:
                    continue
                out = node.outputs[0]
                if not out.name or id(out) in tainted or isinstance(out, gs.Constant):
                    continue
                have = self._info.get(id(out))
                if have is not None and have.shape is not None:
                    continue
                shape = self._rule(node)
                if shape is not None:
                    self._info[id(out)] = TensorInfo(have.dtype if have is not None else None, shape)

    def _rule(self, node: gs.Node) -> tuple | None:
        op, ins = node.op, node.inputs
        if op in _SAME_SHAPE:
            return self.dims(ins[0]) if ins else None
        if op in _BROADCAST:
            shapes = [self.dims(t) for t in ins if t.name]
            if not shapes or any(s is None for s in shapes):
                return None
            rank = max(len(s) for s in shapes)
            out = []
            for axis in range(rank):
                seen = {s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0}
                known = {d for d in seen if d is not None and d != 1}
                if None in seen or len(known) > 1:
                    out.append(None)
                else:
                    out.append(known.pop() if known else 1)
            return tuple(out)
        if op in _SAME_RANK:
            rank = self.rank(ins[0]) if ins else None
            return None if rank is None else (None,) * rank
        if op == "Reshape" and len(ins) > 1:
            target = self.static(ins[1])
            return None if target is None or len(target) != 1 else (None,) * target[0]
        if op == "Transpose":
            perm = node.attrs.get("perm")
            dims = self.dims(ins[0])
            if dims is None:
                return None if perm is None else (None,) * len(perm)
            perm = perm if perm is not None else list(reversed(range(len(dims))))
            return tuple(dims[p] for p in perm) if len(perm) == len(dims) else None
        if op == "MatMul":
            a, b = self.rank(ins[0]), self.rank(ins[1])
            return None if a is None or b is None or a < 2 or b < 2 else (None,) * max(a, b)
        return None

    def info(self, t: gs.Tensor) -> TensorInfo | None:
        """What is known of ``t`` (dtype and shape as inferred), or None."""
        found = self._info.get(id(t))
        if found is not None:
            return found
        if isinstance(t, gs.Constant):
            found = self._info[id(t)] = TensorInfo(tensor_dtype(t), tuple(int(d) for d in t.shape))
            return found
        if len(t.inputs) == 1 and t.inputs[0].op == "Constant" and not t.inputs[0].inputs:
            held = t.inputs[0].attrs.get("value")
            if isinstance(held, gs.Constant):  # shape and dtype without loading the data
                return TensorInfo(tensor_dtype(held), tuple(int(d) for d in held.shape))
            value = constant_node_value(t.inputs[0])
            if value is not None:
                return TensorInfo(value.dtype, tuple(value.shape))
        return None

    def dtype(self, t: gs.Tensor) -> np.dtype | None:
        info = self.info(t)
        return None if info is None else info.dtype

    def dims(self, t: gs.Tensor) -> tuple | None:
        """The shape with unknown or dynamic dimensions as None; None if the rank is unknown."""
        info = self.info(t)
        return None if info is None else known_dims(info.shape)

    def rank(self, t: gs.Tensor) -> int | None:
        dims = self.dims(t)
        return None if dims is None else len(dims)

    def static(self, t: gs.Tensor) -> tuple[int, ...] | None:
        """The shape if every dimension is a known non-negative int, else None."""
        dims = self.dims(t)
        if dims is None or any(d is None for d in dims):
            return None
        return dims
