"""Inferred dtype and shape of each tensor of a model, keyed by tensor identity.

:func:`onnxopt.shapes.infer_shapes` answers by tensor *name*, for the whole model at
once. Rewrites need an answer per gs tensor that they can trust, which takes three
precautions on top of it:

* names are unique only per scope: two sibling subgraphs (an If's branches) may each
  define a tensor ``t``; a name defined more than once in the model gets no shape;
* a dimension is known only as a non-negative integer: exporters write ``-1`` or ``?``
  for dynamic dimensions, and two dimensions spelled ``?`` are not equal;
* shapes inside Loop/Scan bodies come from the bodies' declared inputs, which may not
  hold on every iteration (a loop-carried value can grow): those tensors, the Loop/Scan
  outputs and everything computed from them keep their dtype but get no shape.

Constants answer from their own value (never loaded for it).
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


class ShapeIndex:
    """dtype/shape of every tensor of ``model`` as inference computes it, by identity.

    ``shapes`` may pass the result of :func:`infer_shapes` if it was already computed
    for this exact model state. Answers describe the model as it was when the index was
    built: tensors created later are unknown (None).
    """

    def __init__(self, model: Model, shapes: dict[str, TensorInfo] | None = None):
        by_name = infer_shapes(model) if shapes is None else shapes
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

    def info(self, t: gs.Tensor) -> TensorInfo | None:
        """What is known of ``t`` (dtype and shape as inferred), or None."""
        if isinstance(t, gs.Constant):
            dtype = tensor_dtype(t)
            return TensorInfo(dtype, tuple(int(d) for d in t.shape))
        found = self._info.get(id(t))
        if found is not None:
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
