"""dedup-weights: one tensor for byte-identical constants.

Exporters often store tied or repeated weights twice (decoder embeddings, repeated
blocks), and Paddle or PyTorch exports repeat the same small Constant node (``3.0``,
``6.0``, an axes list) dozens of times. Identical bytes mean identical values, so every
consumer may read one tensor.

Candidates are initializers and Constant-node values of every element type, in every
graph. They are grouped by (element type, shape) from their headers first, then by a
digest of their bytes, and a merge is confirmed by comparing the bytes themselves; data
is read only for tensors that share a header with another (external data included).

Scope: a subgraph may read a tensor of an enclosing graph, not the other way round, and
sibling bodies cannot see each other. So a constant is replaced by an identical one of
its own graph or of an enclosing graph (the outermost one wins), never by one defined
deeper or in a sibling body; a Constant node is only used from an enclosing graph when
it comes before the node that holds the body, and never where a tensor of the same name
in between would shadow it.

Never merged: initializers that are also graph inputs (overridable defaults — a user may
feed them; every weight of an IR 3 model), constants that are graph outputs, sparse
constants, and constants nobody reads (``dead-nodes`` removes those).
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import SparseValues

from onnxopt.fingerprint import content_bytes, signature
from onnxopt.framework import Opt, Pass, PassContext, PassResult, register
from onnxopt.graph import constant_node_value, replace_uses
from onnxopt.model import Model, extras, iter_graphs, node_subgraphs, tensor_nbytes

__all__ = ["DedupWeights"]

log = logging.getLogger(__name__)

_DEFAULT_DOMAINS = (None, "", "ai.onnx")


@dataclass(eq=False)
class _Candidate:
    tensor: gs.Tensor  # what consumers read: the initializer, or the Constant node's output
    source: gs.Constant | np.ndarray  # where the bytes are
    graph: gs.Graph
    depth: int
    order: int  # -1 for initializers; the node's position for Constant nodes
    node: gs.Node | None = None
    sig: tuple = field(default=())

    @property
    def sort_key(self) -> tuple:
        # Outer graphs first; in a graph, initializers (visible everywhere) before nodes.
        return (self.depth, self.node is not None, self.order)


class _Scopes:
    """Where every graph and node sits: parents, depths, node positions and the names each
    graph defines (for visibility and shadowing checks)."""

    def __init__(self, model: Model):
        self.graphs = list(iter_graphs(model.graph))
        self.parent_node: dict[int, gs.Node | None] = {id(model.graph): None}
        self.graph_of: dict[int, gs.Graph] = {}
        self.position: dict[int, int] = {}
        for g in self.graphs:
            for i, n in enumerate(g.nodes):
                self.graph_of[id(n)] = g
                self.position[id(n)] = i
                for sub in node_subgraphs(n):
                    self.parent_node[id(sub)] = n
        self.depth: dict[int, int] = {}
        for g in self.graphs:  # outer before inner
            p = self.parent_node[id(g)]
            self.depth[id(g)] = 0 if p is None else self.depth[id(self.graph_of[id(p)])] + 1
        self._names: dict[int, dict[str, list[gs.Tensor]]] = {}

    def chain(self, g: gs.Graph) -> list[tuple[gs.Graph, gs.Node | None]]:
        """``g`` and its enclosing graphs, inner to outer, each with the node of that
        graph through which ``g`` is reached (None for ``g`` itself)."""
        out: list[tuple[gs.Graph, gs.Node | None]] = [(g, None)]
        node = self.parent_node[id(g)]
        while node is not None:
            outer = self.graph_of[id(node)]
            out.append((outer, node))
            node = self.parent_node[id(outer)]
        return out

    def names(self, g: gs.Graph) -> dict[str, list[gs.Tensor]]:
        found = self._names.get(id(g))
        if found is None:
            found = defaultdict(list)
            seen: set[int] = set()

            def add(t: gs.Tensor) -> None:
                if t.name and id(t) not in seen:
                    seen.add(id(t))
                    found[t.name].append(t)

            for t in extras(g).initializers:
                add(t)
            for t in g.inputs:
                add(t)
            for n in g.nodes:
                for t in n.outputs:
                    add(t)
                for t in n.inputs:
                    if isinstance(t, gs.Constant):
                        add(t)
            self._names[id(g)] = found
        return found


@register
class DedupWeights(Pass):
    """Make consumers of byte-identical constants (initializers and Constant nodes, every
    element type, across subgraphs) read one tensor; drop the copies.

    Edge cases: overridable initializers (graph inputs) and graph outputs are left alone;
    a constant is only replaced by one it can see (same or enclosing graph, not shadowed);
    a digest collision is caught by comparing bytes.
    """

    name = "dedup-weights"
    summary = "one tensor for byte-identical initializers and Constant nodes, across subgraphs"
    exact = True
    options = {
        "min_bytes": Opt(int, 0, "leave constants smaller than this many bytes alone", minimum=0),
    }

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        scopes = _Scopes(model)
        candidates, stats = _collect(model, scopes, self.opts.min_bytes)
        plan = _plan(candidates, scopes, stats)

        # Everything is decided: now rewire, then drop the copies.
        dropped_inits: set[int] = set()
        dropped_nodes: dict[int, set[int]] = defaultdict(set)
        graphs = {id(g): g for g in scopes.graphs}
        for dup, keep, nbytes in plan:
            replace_uses(dup.tensor, keep.tensor)
            stats["bytes_saved"] += nbytes
            if dup.node is None:
                dropped_inits.add(id(dup.tensor))
                stats["initializers_merged"] += 1
            else:
                dropped_nodes[id(dup.graph)].add(id(dup.node))
                stats["constant_nodes_removed"] += 1
        for g in scopes.graphs:
            ext = extras(g)
            if dropped_inits:
                ext.initializers = [t for t in ext.initializers if id(t) not in dropped_inits]
        for gid, dead in dropped_nodes.items():
            g = graphs[gid]
            kept = []
            for n in g.nodes:
                if id(n) in dead:
                    n.inputs.clear()
                    n.outputs.clear()
                else:
                    kept.append(n)
            g.nodes = kept
        stats["merged"] = len(plan)
        return PassResult(modified=bool(plan), stats=dict(stats))


def _node_source(node: gs.Node) -> gs.Constant | np.ndarray | None:
    """Where a Constant node's value is, without decoding a tensor attribute."""
    attrs = node.attrs
    if len(attrs) != 1:
        return None
    value = attrs.get("value")
    if isinstance(value, gs.Constant):
        return None if isinstance(value._values, SparseValues) else value
    if "value" in attrs or "sparse_value" in attrs:
        return None
    return constant_node_value(node)


def _collect(model: Model, scopes: _Scopes, min_bytes: int) -> tuple[list[_Candidate], dict]:
    stats: dict[str, int] = defaultdict(int)
    for key in ("merged", "initializers_merged", "constant_nodes_removed", "bytes_saved",
                "skipped_overridable", "skipped_graph_output", "skipped_out_of_scope"):
        stats[key] = 0
    input_ids = {id(t) for g in scopes.graphs for t in g.inputs}
    output_ids = {id(t) for g in scopes.graphs for t in g.outputs}
    owned: set[int] = set()
    found: list[_Candidate] = []

    def consider_constant(t: gs.Tensor, g: gs.Graph) -> None:
        if not isinstance(t, gs.Constant) or id(t) in owned:
            return
        owned.add(id(t))
        if id(t) in input_ids or vars(t).get("input_value_info") is not None:
            stats["skipped_overridable"] += 1
            return
        if id(t) in output_ids:
            stats["skipped_graph_output"] += 1
            return
        if not t.outputs or isinstance(t._values, SparseValues):
            return
        sig = signature(t)
        if sig is None:
            return
        found.append(_Candidate(t, t, g, scopes.depth[id(g)], -1, None, sig))

    for g in scopes.graphs:  # outer graphs first: a constant belongs to the outermost user
        for t in extras(g).initializers:
            consider_constant(t, g)
        for n in g.nodes:
            for t in n.inputs:
                consider_constant(t, g)
        for pos, n in enumerate(g.nodes):
            if n.op != "Constant" or n.domain not in _DEFAULT_DOMAINS or n.inputs or len(n.outputs) != 1:
                continue
            out = n.outputs[0]
            if id(out) in output_ids:
                stats["skipped_graph_output"] += 1
                continue
            if not out.outputs:
                continue
            source = _node_source(n)
            if source is None:
                continue
            sig = signature(source)
            if sig is None:
                continue
            found.append(_Candidate(out, source, g, scopes.depth[id(g)], pos, n, sig))
    if min_bytes:
        found = [c for c in found if _nbytes(c.source) >= min_bytes]
    return found, stats


def _nbytes(source: gs.Constant | np.ndarray) -> int:
    if isinstance(source, np.ndarray):
        return int(source.nbytes)
    return tensor_nbytes(source)


def _plan(candidates: list[_Candidate], scopes: _Scopes, stats: dict) -> list[tuple[_Candidate, _Candidate, int]]:
    """(duplicate, keeper, bytes) for every merge, deciding everything before any change."""
    by_sig: dict[tuple, list[_Candidate]] = defaultdict(list)
    for c in candidates:
        by_sig[c.sig].append(c)
    plan: list[tuple[_Candidate, _Candidate, int]] = []
    for group in by_sig.values():
        if len(group) < 2:
            continue
        by_digest: dict[bytes, list[_Candidate]] = defaultdict(list)
        for c in group:  # data is read only here, for tensors that share a header
            by_digest[hashlib.blake2b(content_bytes(c.source), digest_size=16).digest()].append(c)
        for same in by_digest.values():
            if len(same) < 2:
                continue
            same.sort(key=lambda c: c.sort_key)
            keepers: list[tuple[_Candidate, bytes]] = []
            for c in same:
                keep = next((k for k in keepers if _visible(k[0], c, scopes)), None)
                if keep is None:
                    if keepers:
                        stats["skipped_out_of_scope"] += 1
                        log.debug("dedup-weights: '%s' duplicates a constant it cannot see", c.tensor.name)
                    keepers.append((c, content_bytes(c.source)))
                    continue
                data = content_bytes(c.source)
                if data != keep[1]:  # a digest collision: not the same after all
                    keepers.append((c, data))
                    continue
                plan.append((c, keep[0], len(data)))
    return plan


def _visible(keep: _Candidate, dup: _Candidate, scopes: _Scopes) -> bool:
    """Whether every consumer of ``dup`` may read ``keep`` instead."""
    via = None
    for g, node in scopes.chain(dup.graph):
        if g is keep.graph:
            via = node
            break
    else:
        return False  # defined deeper, or in a sibling body
    if keep.node is not None:
        if via is None:  # same graph: the keeper node must come first
            if dup.node is None or keep.order >= dup.order:
                return False
        elif scopes.position[id(via)] <= keep.order:
            return False  # the body runs before the keeper is computed
    name = keep.tensor.name
    for consumer in dup.tensor.outputs:
        where = scopes.graph_of.get(id(consumer))
        if where is None:
            return False  # a consumer outside the model's graphs: leave it alone
        for g, _ in scopes.chain(where):
            if g is keep.graph:
                break
            for other in scopes.names(g).get(name, ()):
                if other is not dup.tensor and other is not keep.tensor:
                    return False  # a tensor of the same name in between would shadow it
    return True
