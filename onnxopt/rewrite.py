"""Helpers that rewrites share once they have decided what to change.

A rewrite that replaces a node leaves behind what only fed that node: the Constant node
or initializer holding an operand, a ``Shape`` node, the first of two Casts.
:func:`drop_nodes` removes nodes from whichever graph holds them, and
:func:`prune_unused` then removes, starting from the tensors the rewrite stopped reading,
every producer that nothing reads any more and every initializer that became unused —
without scanning the whole model once per tensor, so rewrites stay linear in its size.
Graph inputs and outputs (of every graph) are never removed. :class:`Edits` records a
rewrite's changes (new inputs, removed nodes) and does all of that bookkeeping in one sweep
at the end. :func:`const_value_if_small` reads an operand's value without ever loading a
large weight.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from .graph import const_value, implicit_inputs
from .model import Model, extras, gc_paused, iter_graphs, node_subgraphs, tensor_nbytes

__all__ = ["Edits", "drop_nodes", "prune_unused", "const_value_if_small", "gc_paused"]


def _unlink(nodes: list[gs.Node]) -> None:
    """Unlink ``nodes`` (and every node of their subgraphs) from the tensors they touch.

    gs keeps both directions of each edge in lists and removes one entry by scanning
    (``list.remove``, comparing nodes field by field); removing the many readers of one
    shared constant that way is quadratic. Here every touched tensor's lists are filtered
    once instead.
    """
    every: list[gs.Node] = []
    stack = list(nodes)
    while stack:
        n = stack.pop()
        every.append(n)
        for sub in node_subgraphs(n):
            stack.extend(sub.nodes)
    gone = {id(n) for n in every}
    tensors: dict[int, gs.Tensor] = {}
    for n in every:
        for t in itertools.chain(n.inputs, n.outputs):
            tensors[id(t)] = t
    for t in tensors.values():
        list.__setitem__(t.outputs, slice(None), [c for c in t.outputs if id(c) not in gone])
        list.__setitem__(t.inputs, slice(None), [p for p in t.inputs if id(p) not in gone])
    for n in every:
        list.clear(n.inputs)
        list.clear(n.outputs)


def drop_nodes(model: Model, dead: set[int], graphs: list[gs.Graph] | None = None) -> list[gs.Tensor]:
    """Remove the nodes whose ids are in ``dead`` from every graph of ``model`` and unlink
    them (their subgraphs included). Returns the tensors they read (for :func:`prune_unused`).
    ``graphs``: the model's graphs if the caller has them (``list(iter_graphs(...))``;
    graphs that were removed since may stay in it)."""
    read: list[gs.Tensor] = []
    if not dead:
        return read
    removed: list[gs.Node] = []
    for g in graphs if graphs is not None else iter_graphs(model.graph):
        if not any(id(n) in dead for n in g.nodes):
            continue
        gone = [n for n in g.nodes if id(n) in dead]
        g.nodes = [n for n in g.nodes if id(n) not in dead]
        for n in gone:
            read.extend(t for t in n.inputs if t.name)
            if node_subgraphs(n):
                read.extend(implicit_inputs(n))
        removed.extend(gone)
    _unlink(removed)
    return read


def prune_unused(model: Model, tensors: Iterable[gs.Tensor],
                 graphs: list[gs.Graph] | None = None) -> tuple[int, int]:
    """Remove what became unused after a rewrite stopped reading ``tensors``.

    A producer goes when none of its outputs is read by a node or is a graph output,
    and so, in turn, do its own producers; initializers (of any graph) that no node
    reads any more are dropped from the initializer lists. Returns ``(nodes_removed,
    initializers_released)``. ``graphs``: as for :func:`drop_nodes`.
    """
    graphs = graphs if graphs is not None else list(iter_graphs(model.graph))
    outputs = {id(t) for g in graphs for t in g.outputs}
    holders = outputs | {id(t) for g in graphs for t in g.inputs}
    dead: set[int] = set()
    readers: dict[int, int] = {}  # id(tensor) -> readers not (yet) dead

    def live_readers(t: gs.Tensor) -> int:
        if id(t) not in readers:
            readers[id(t)] = sum(1 for c in t.outputs if id(c) not in dead)
        return readers[id(t)]

    def die(p: gs.Node) -> list[gs.Tensor]:
        """Mark ``p`` (and the nodes of its subgraphs) dead; return what they read."""
        freed: list[gs.Tensor] = []
        nested = [p]
        while nested:
            n = nested.pop()
            if id(n) in dead:  # a body that died on its own before its holder did
                continue
            dead.add(id(n))
            for x in n.inputs:
                if x.name:
                    freed.append(x)
                    if id(x) in readers:
                        readers[id(x)] -= 1
            for sub in node_subgraphs(n):
                nested.extend(sub.nodes)
        return freed

    constants: dict[int, gs.Constant] = {}
    stack = [t for t in tensors if t.name]
    while stack:
        t = stack.pop()
        if id(t) in outputs or id(t) in holders or live_readers(t) > 0:
            continue
        if isinstance(t, gs.Constant):
            constants[id(t)] = t
            continue
        if len(t.inputs) != 1:
            continue
        p = t.inputs[0]
        if id(p) in dead:
            continue
        if any(o.name and (id(o) in outputs or live_readers(o) > 0) for o in p.outputs):
            continue
        stack.extend(die(p))
    drop_nodes(model, dead, graphs)
    removed = len(dead)  # the nodes of removed subgraphs included
    unused = {i for i, t in constants.items() if not t.outputs}
    released = 0
    if unused:
        for g in graphs:
            ext = extras(g)
            kept = [t for t in ext.initializers if id(t) not in unused or id(t) in holders]
            released += len(ext.initializers) - len(kept)
            ext.initializers = kept
    return removed, released


def const_value_if_small(t: gs.Tensor, limit: int = 1 << 20, *, load: bool = True) -> np.ndarray | None:
    """The value of a constant of at most ``limit`` bytes, else None.

    Pattern matchers ask "is this operand a zero, a one, a per-channel vector?" of every
    operand they meet; a large weight is never the answer, and loading it to find out
    would pull (and keep) external data into memory. ``load=False``: as for
    :func:`onnxopt.graph.const_value` (the value is not kept on the tensor, so a tensor
    that is only looked at is written back unchanged).
    """
    if not t.name:
        return None
    if isinstance(t, gs.Constant):
        if tensor_nbytes(t) > limit:
            return None
    elif len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        held = t.inputs[0].attrs.get("value")
        if isinstance(held, gs.Constant) and tensor_nbytes(held) > limit:
            return None
    return const_value(t, load=load)


class Edits:
    """Changes a rewrite makes to a model, with the bookkeeping done in bulk at the end.

    gs keeps both directions of each edge and repairs one entry at a time by scanning a
    list, so giving new inputs to the readers of a constant that thousands of nodes share,
    one by one, is quadratic. Here :meth:`rewire` gives a node all its new inputs at once,
    :meth:`remove` and :meth:`take_output` only mark nodes removed, and :meth:`commit`
    repairs the readers lists, takes the removed nodes out of their graphs and prunes what
    became unused (:func:`prune_unused`), each in one sweep. Until then, the readers list of
    a tensor that a node stopped reading may still name that node, and removed nodes stay
    in their graphs' node lists (their ids are in ``dead``).
    """

    def __init__(self) -> None:
        self.dead: set[int] = set()  # ids of the nodes removed
        self.touched: list[gs.Tensor] = []  # tensors some node stopped reading
        self._stale: dict[int, gs.Tensor] = {}

    def rewire(self, node: gs.Node, inputs: list[gs.Tensor]) -> None:
        """Give ``node`` the inputs ``inputs`` (the readers lists of the tensors it stops
        reading are repaired by :meth:`settle`)."""
        old = list(node.inputs)
        list.__setitem__(node.inputs, slice(None), list(inputs))
        for t in inputs:
            list.append(t.outputs, node)
        for t in old:
            self._stale[id(t)] = t
            self.touched.append(t)

    def remove(self, *nodes: gs.Node) -> None:
        """Mark ``nodes`` removed; what they read becomes a candidate for pruning."""
        for n in nodes:
            self.touched.extend(t for t in n.inputs if t.name)
            self.dead.add(id(n))

    def take_output(self, producer: gs.Node, consumer: gs.Node) -> None:
        """Make ``producer`` produce ``consumer``'s (first) output, keeping its name and type,
        and remove ``consumer``."""
        out = consumer.outputs[0]
        consumer.outputs.clear()  # its inputs are unlinked with the other removed nodes
        producer.outputs[0] = out
        self.remove(consumer)

    def settle(self) -> None:
        """Repair the readers lists of every tensor a rewired node stopped reading."""
        for t in self._stale.values():
            fixed, seen = [], set()
            for c in t.outputs:
                if id(c) not in seen:
                    seen.add(id(c))
                    fixed.extend(c for x in c.inputs if x is t)
            list.__setitem__(t.outputs, slice(None), fixed)
        self._stale.clear()

    def commit(self, model: Model, graphs: list[gs.Graph] | None = None) -> tuple[int, int]:
        """Apply the bookkeeping: repair readers lists, take the removed nodes out and prune
        what became unused. Returns ``(nodes_removed, initializers_released)``, the marked
        nodes included. ``graphs``: as for :func:`drop_nodes`."""
        self.settle()
        graphs = graphs if graphs is not None else list(iter_graphs(model.graph))
        read = drop_nodes(model, self.dead, graphs)
        pruned, released = prune_unused(model, read + self.touched, graphs)
        removed = len(self.dead) + pruned
        self.dead.clear()
        self.touched.clear()
        return removed, released
