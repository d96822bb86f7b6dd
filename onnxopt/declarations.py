"""Declared types of intermediate tensors that the graph contradicts, dropped after a rewrite.

A model's value_info declares the type and shape of intermediate tensors. Our shape
inference ignores them (:mod:`onnxopt.shapes` infers from the graph alone); onnxruntime
does not: it takes a declared fixed size for granted and simplifies with it (an
``Expand`` whose input is declared to have the target shape already is dropped). A
declaration that lies is harmless only while the graph hides the sizes it would be
compared with; once a rewrite folds a computed shape into a constant, onnxruntime acts on
the lie and the model fails or computes something else. So after every pass that changed
the graph the manager calls :func:`drop_contradicted_declarations`.

A declared shape is contradicted when inference gives it another rank, or a dimension
that inference fixes to another size, or a dimension that inference carries as a free
dimension of the graph's inputs (a symbol they declare) while the declaration fixes it:
the model's own signature says that size may vary. Such a shape is dropped and the
element type kept; a declared element type that inference contradicts drops the whole
declaration. Declarations that agree stay as they are (users and onnxruntime use them),
and so do dynamic declared dimensions, dimensions inference cannot size, tensors it knows
nothing about, and the declarations of graph inputs and outputs (the model's contract).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from .graph import tensor_dtype
from .model import Model, iter_graphs
from .shapes import TensorInfo
from .tensorinfo import ShapeIndex

__all__ = ["drop_contradicted_declarations"]

log = logging.getLogger(__name__)


def drop_contradicted_declarations(model: Model) -> int:
    """Drop the declared shapes (and wrong element types) of intermediate tensors that
    shape inference contradicts, in every graph of ``model``; returns how many tensors
    lost some of their declaration. The declarations checked are the value_info the model
    came with (a tensor a pass creates carries the type that pass computed); without any,
    nothing is inferred."""
    declared = [t for t in _intermediates(model.graph)
                if "value_info" in vars(t) and (t.dtype is not None or t.shape is not None)]
    if not declared:
        return 0
    index = ShapeIndex(model)
    free = _free_symbols(model.graph)
    dropped = 0
    for t in declared:
        inferred = index.info(t)
        if inferred is None:
            continue
        wrong_type = _type_contradiction(tensor_dtype(t), inferred)
        why = wrong_type or _shape_contradiction(t.shape, inferred, free)
        if why is None:
            continue
        log.info("declared type of %s dropped: %s", t.name, why)
        if wrong_type is not None:
            t.dtype = None
        t.shape = None
        dropped += 1
    return dropped


def _type_contradiction(dtype: np.dtype | None, inferred: TensorInfo) -> str | None:
    if dtype is not None and inferred.dtype is not None and np.dtype(dtype) != inferred.dtype:
        return f"element type {np.dtype(dtype)}, inferred {inferred.dtype}"
    return None


def _shape_contradiction(shape, inferred: TensorInfo, free: set[str]) -> str | None:
    """Why a declared ``shape`` (ints, symbols, None) contradicts the inferred one, or None
    where it does not; ``free`` holds the dimension symbols of the graph inputs."""
    if shape is None or inferred.shape is None:
        return None
    if len(shape) != len(inferred.shape):
        return f"rank {len(shape)}, inferred {len(inferred.shape)}"
    for axis, (d, i) in enumerate(zip(shape, inferred.shape)):
        if not _fixed(d):
            continue  # a dynamic declared dimension claims nothing
        if _fixed(i) and int(i) != int(d):
            return f"dimension {axis} declared {d}, inferred {i}"
        if isinstance(i, str) and i in free:
            return f"dimension {axis} declared {d}, but it is the inputs' free dimension {i!r}"
    return None


def _fixed(d) -> bool:
    return isinstance(d, (int, np.integer)) and d >= 0


def _intermediates(root: gs.Graph) -> list[gs.Variable]:
    """Named tensors that nodes produce and that are neither inputs nor outputs of their
    graph, each once, outer graphs first."""
    out: list[gs.Variable] = []
    seen: set[int] = set()
    for g in iter_graphs(root):
        io = {id(t) for t in g.inputs} | {id(t) for t in g.outputs}
        for node in g.nodes:
            for t in node.outputs:
                if (isinstance(t, gs.Variable) and t.name and t.type == "tensor_type"
                        and id(t) not in io and id(t) not in seen):
                    seen.add(id(t))
                    out.append(t)
    return out


def _free_symbols(graph: gs.Graph) -> set[str]:
    return {d for t in graph.inputs if isinstance(t, gs.Variable) and t.shape is not None
            for d in t.shape if isinstance(d, str) and d}
