"""Reading compact weight storage back: decoder cones and a numpy interpreter of them.

A *decoder cone* is the set of nodes computing a tensor when every node is one of
:data:`DECODER_OPS` and every leaf is a constant: the expansion that the storage writer
emits, also after other passes merged its shared constants or nodes. Its value is
computed here with numpy, exactly as onnxruntime computes it (the ops move values
without float arithmetic; the kernels are :mod:`onnxopt.node_eval`'s), so that passes
can read a compressed weight, rewrite it, or check that a storage gives back its values. :func:`storage_of` names the storage form a
cone implements.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import const_value
from ..graph_extras import iter_graphs
from ..node_eval import NotEvaluable, evaluate_node

__all__ = [
    "COMPACT",
    "DECODER_OPS",
    "FLOAT_DTYPES",
    "NotDecodable",
    "cone_storage",
    "decoder_cone",
    "decoder_ends",
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


def decoder_ends(graph: gs.Graph) -> Iterator[tuple[gs.Graph, gs.Node, gs.Tensor]]:
    """Where an expansion ends, in ``graph`` and its subgraphs: (graph, node, tensor) for
    each output of a decoder op that a node outside the decoder ops reads, once each."""
    seen: set[int] = set()
    for g in iter_graphs(graph):
        for node in g.nodes:
            if node.op not in DECODER_OPS or node.op == "Constant":
                continue
            for t in node.outputs:
                if id(t) in seen or not any(c.op not in DECODER_OPS for c in t.outputs):
                    continue
                seen.add(id(t))
                yield g, node, t


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
        try:
            results = evaluate_node(node, args)
        except NotEvaluable as exc:
            raise NotDecodable(str(exc)) from exc
        for o, r in zip(node.outputs, results):
            memo[id(o)] = r
        out = memo[id(t)]
    memo[id(t)] = out
    return out


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
