"""Helpers that rewrites share once they have decided what to change.

A rewrite that replaces a node leaves behind what only fed that node: the Constant node
or initializer holding an operand, a ``Shape`` node, the first of two Casts.
:func:`drop_nodes` removes nodes from whichever graph holds them, and
:func:`prune_unused` then removes, starting from the tensors the rewrite stopped reading,
every producer that nothing reads any more and every initializer that became unused —
without scanning the whole model once per tensor, so rewrites stay linear in its size.
Graph inputs and outputs (of every graph) are never removed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import onnx_graphsurgeon as gs

from .graph import graph_outputs, implicit_inputs
from .model import Model, extras, iter_graphs, node_subgraphs

__all__ = ["drop_nodes", "prune_unused"]


def _disconnect(node: gs.Node) -> None:
    for sub in node_subgraphs(node):
        for inner in sub.nodes:
            _disconnect(inner)
    node.inputs.clear()
    node.outputs.clear()


def drop_nodes(model: Model, dead: set[int]) -> list[gs.Tensor]:
    """Remove the nodes whose ids are in ``dead`` from every graph of ``model`` and unlink
    them (their subgraphs included). Returns the tensors they read (for :func:`prune_unused`)."""
    read: list[gs.Tensor] = []
    if not dead:
        return read
    for g in iter_graphs(model.graph):
        removed = [n for n in g.nodes if id(n) in dead]
        if not removed:
            continue
        g.nodes = [n for n in g.nodes if id(n) not in dead]
        for n in removed:
            read.extend(t for t in n.inputs if t.name)
            if node_subgraphs(n):
                read.extend(implicit_inputs(n))
            _disconnect(n)
    return read


def prune_unused(model: Model, tensors: Iterable[gs.Tensor]) -> tuple[int, int]:
    """Remove what became unused after a rewrite stopped reading ``tensors``.

    A producer goes when none of its outputs is read by a node or is a graph output,
    and so, in turn, do its own producers; initializers (of any graph) that no node
    reads any more are dropped from the initializer lists. Returns ``(nodes_removed,
    initializers_released)``.
    """
    outputs = graph_outputs(model.graph)
    holders = {id(t) for g in iter_graphs(model.graph) for t in itertools.chain(g.inputs, g.outputs)}
    dead: set[int] = set()
    constants: list[gs.Constant] = []
    stack = [t for t in tensors if t.name]
    while stack:
        t = stack.pop()
        if id(t) in outputs or id(t) in holders:
            continue
        if any(id(c) not in dead for c in t.outputs):
            continue
        if isinstance(t, gs.Constant):
            constants.append(t)
            continue
        if len(t.inputs) != 1:
            continue
        p = t.inputs[0]
        if id(p) in dead:
            continue
        if any(o.name and (id(o) in outputs or any(id(c) not in dead for c in o.outputs)) for o in p.outputs):
            continue
        dead.add(id(p))
        stack.extend(x for x in p.inputs if x.name)
        if node_subgraphs(p):
            stack.extend(implicit_inputs(p))
            stack.extend(c for sub in node_subgraphs(p) for c in _body_constants(sub))
    removed_before = sum(len(g.nodes) for g in iter_graphs(model.graph))
    drop_nodes(model, dead)
    removed = removed_before - sum(len(g.nodes) for g in iter_graphs(model.graph))
    unused = {id(t) for t in constants if not t.outputs}
    released = 0
    if unused:
        for g in iter_graphs(model.graph):
            ext = extras(g)
            kept = [t for t in ext.initializers if id(t) not in unused or id(t) in holders]
            released += len(ext.initializers) - len(kept)
            ext.initializers = kept
    return removed, released


def _body_constants(g: gs.Graph) -> list[gs.Constant]:
    """Constants read by the nodes of a subgraph (outer ones included)."""
    found = []
    for n in g.nodes:
        found.extend(t for t in n.inputs if isinstance(t, gs.Constant))
        for sub in node_subgraphs(n):
            found.extend(_body_constants(sub))
    return found
