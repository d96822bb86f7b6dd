"""cse: merge nodes that compute the same thing.

Two nodes of one graph compute the same values when they have the same op type and
domain, the same attributes and the same inputs. Each node gets a key built from those
— inputs by the identity of the tensor they read, after earlier merges — so one walk in
topological order finds every duplicate, including chains that become identical once
their inputs are merged (linear in the graph's size, no pairwise comparison).

Subgraph attributes (If branches, Loop/Scan bodies) are compared structurally: tensors
of the body by position, outer-scope reads by identity, constants by content. Bodies are
simplified first, in place.

Never merged:
* ops that are not deterministic (RandomNormal/Uniform(Like), Multinomial, Bernoulli,
  Dropout in training mode) — nor nodes whose bodies hold one;
* ops outside the ONNX domains (custom ops may have state or randomness) and calls of
  local functions;
* DequantizeLinear nodes that feed different consumers: onnxruntime fuses each
  DQ -> op -> Q unit into an integer kernel only when every unit has its own DQ;
* two nodes whose outputs are both graph outputs (the graph's output names are its API).
When the duplicate's output is a graph output and the kept node's is not, the kept
node's output takes the name.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.fingerprint import fingerprint
from onnxopt.framework import Pass, PassContext, PassResult, register
from onnxopt.graph import bypass, const_value, detach_nodes, replace_uses
from onnxopt.model import Model, RawAttribute, iter_graphs, node_subgraphs

__all__ = ["CommonSubexpressions", "NON_DETERMINISTIC_OPS"]

log = logging.getLogger(__name__)

#: Ops that draw random numbers: two of them with the same inputs give different values.
NON_DETERMINISTIC_OPS = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
})
_ONNX_DOMAINS = {"", "ai.onnx", "ai.onnx.ml"}


def _domain(node: gs.Node) -> str:
    return node.domain or ""


@register
class CommonSubexpressions(Pass):
    """Merge nodes with the same op type, domain, attributes and inputs, inside subgraphs
    too; the merged node's consumers read the kept node's outputs.

    Edge cases: non-deterministic ops, custom-domain ops, DequantizeLinear nodes with
    different consumers and pairs whose outputs are both graph outputs are kept apart;
    graph output names never change.
    """

    name = "cse"
    summary = "merge nodes with the same op, attributes and inputs (subgraph bodies compared structurally)"
    exact = True
    options = {}

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        planner = _MergePlanner(model)
        planner.visit(model.graph)
        merges = planner.merges

        # Everything is decided: rewire consumers, then drop the duplicates.
        dead: dict[int, set[int]] = defaultdict(set)
        graphs = {id(g): g for g in iter_graphs(model.graph)}
        for g, dup, keep in merges:
            for old, new in zip(dup.outputs, keep.outputs):
                if not old.name:
                    continue
                if any(old is t for t in g.outputs):
                    if not bypass(g, old, new):  # pragma: no cover - the planner checked this
                        raise RuntimeError(f"cse: cannot move output '{old.name}' to '{new.name}'")
                else:
                    replace_uses(old, new)
            dead[id(g)].add(id(dup))
        detach_nodes([dup for _, dup, _ in merges])
        for gid, ids in dead.items():
            g = graphs[gid]
            g.nodes = [n for n in g.nodes if id(n) not in ids]
        stats = {"nodes_merged": len(merges), **planner.skipped}
        return PassResult(modified=bool(merges), stats=stats)


class _MergePlanner:
    """Walks the graphs in topological order and decides which node merges into which."""

    def __init__(self, model: Model):
        self.opset = model.opset_imports.get("", model.graph.opset)
        self.functions = {(f.domain or "", f.name) for f in model.functions}
        self.rep: dict[int, gs.Tensor] = {}  # merged output id -> the kept node's output
        self.merges: list[tuple[gs.Graph, gs.Node, gs.Node]] = []
        self.renamed: set[int] = set()  # outputs that will take a graph output's name
        graphs = list(iter_graphs(model.graph))
        self.output_of: dict[int, list[gs.Graph]] = defaultdict(list)
        for g in graphs:
            for t in g.outputs:
                self.output_of[id(t)].append(g)
        self.input_ids = {id(t) for g in graphs for t in g.inputs}
        self.skipped = {"skipped_non_deterministic": 0, "skipped_custom_domain": 0,
                        "skipped_dequantize": 0, "skipped_graph_outputs": 0, "skipped_unsorted_graph": 0}
        self._fp: dict[int, tuple] = {}
        self._nondet_graph: dict[int, bool] = {}

    # ---- the walk --------------------------------------------------------------------

    def visit(self, g: gs.Graph) -> None:
        if not _is_sorted(g):
            self.skipped["skipped_unsorted_graph"] += 1
            log.debug("cse: graph '%s' is not topologically sorted; left alone", g.name)
            for n in g.nodes:
                for sub in node_subgraphs(n):
                    self.visit(sub)
            return
        table: dict[tuple, gs.Node] = {}
        for node in g.nodes:
            for sub in node_subgraphs(node):
                self.visit(sub)
            why = self._not_mergeable(node)
            if why:
                self.skipped[why] += 1
                continue
            key = self._node_key(node, [])
            keep = table.get(key)
            if keep is None:
                table[key] = node
                continue
            why = self._cannot_merge(g, node, keep)
            if why:
                self.skipped[why] += 1
                log.debug("cse: %s '%s' not merged into '%s' (%s)", node.op, node.name, keep.name, why)
                continue
            self.merges.append((g, node, keep))
            for old, new in zip(node.outputs, keep.outputs):
                if old.name:
                    self.rep[id(old)] = new
                    if self.output_of.get(id(old)):
                        self.renamed.add(id(new))

    def _not_mergeable(self, node: gs.Node) -> str:
        domain = _domain(node)
        if domain not in _ONNX_DOMAINS or (domain, node.op) in self.functions:
            return "skipped_custom_domain"
        if not self._deterministic(node):
            return "skipped_non_deterministic"
        return ""

    def _deterministic(self, node: gs.Node) -> bool:
        if node.op in NON_DETERMINISTIC_OPS:
            return False
        if node.op == "Dropout":
            if self.opset < 7:
                return node.attrs.get("is_test", 0) == 1
            if len(node.inputs) > 2 and node.inputs[2].name:
                mode = const_value(node.inputs[2], load=False)
                if mode is None or bool(np.asarray(mode).reshape(-1)[0]):
                    return False
        for sub in node_subgraphs(node):
            if self._graph_nondet(sub):
                return False
        return True

    def _graph_nondet(self, g: gs.Graph) -> bool:
        found = self._nondet_graph.get(id(g))
        if found is None:
            found = any(_domain(n) not in _ONNX_DOMAINS or (_domain(n), n.op) in self.functions
                        or not self._deterministic(n) for n in g.nodes)
            self._nondet_graph[id(g)] = found
        return found

    def _cannot_merge(self, g: gs.Graph, dup: gs.Node, keep: gs.Node) -> str:
        if dup.op == "DequantizeLinear" and _domain(dup) in ("", "ai.onnx"):
            a = {id(c) for t in dup.outputs for c in t.outputs}
            b = {id(c) for t in keep.outputs for c in t.outputs}
            if a != b:
                return "skipped_dequantize"
        for old, new in zip(dup.outputs, keep.outputs):
            if not old.name:
                continue
            holders = self.output_of.get(id(old), [])
            if not holders:
                continue
            # The duplicate's output is a graph output: the kept output must take its
            # name, which it can only do once, if it is no graph output itself, and only
            # for the graph they both live in.
            if any(h is not g for h in holders) or self.output_of.get(id(new)) or id(new) in self.renamed:
                return "skipped_graph_outputs"
            if not isinstance(new, gs.Variable) or id(new) in self.input_ids:
                return "skipped_graph_outputs"
        return ""

    # ---- keys --------------------------------------------------------------------------

    def _ref(self, t: gs.Tensor, scopes: list[dict[int, tuple]]) -> tuple:
        if not t.name:
            return ("none",)
        for local in reversed(scopes):
            found = local.get(id(t))
            if found is not None:
                return found
        t = self.rep.get(id(t), t)
        if scopes and isinstance(t, gs.Constant) and vars(t).get("input_value_info") is None:
            # inside a body compared structurally, a constant is its content
            return ("const",) + self._fingerprint(t)
        return ("id", id(t))

    def _fingerprint(self, t: gs.Constant) -> tuple:
        fp = self._fp.get(id(t))
        if fp is None:
            fp = fingerprint(t) or ("tensor", id(t))
            self._fp[id(t)] = fp
        return fp

    def _node_key(self, node: gs.Node, scopes: list[dict[int, tuple]]) -> tuple:
        attrs = tuple(sorted((k, self._attr_key(v, scopes)) for k, v in node.attrs.items()))
        inputs = tuple(self._ref(t, scopes) for t in node.inputs)
        outputs = tuple(bool(t.name) for t in node.outputs)
        return (_domain(node) if _domain(node) != "ai.onnx" else "", node.op, attrs, inputs, outputs)

    def _attr_key(self, v, scopes: list[dict[int, tuple]]) -> tuple:
        if isinstance(v, bool):
            return ("b", v)
        if isinstance(v, (int, np.integer)):
            return ("i", int(v))
        if isinstance(v, (float, np.floating)):
            return ("f", repr(float(v)))
        if isinstance(v, str):
            return ("s", v)
        if isinstance(v, gs.Graph):
            return ("g", self._graph_key(v, scopes))
        if isinstance(v, gs.Constant):
            return ("t",) + self._fingerprint(v)
        if isinstance(v, RawAttribute):
            proto = type(v.proto)()
            proto.CopyFrom(v.proto)
            proto.name = ""
            return ("r", proto.SerializeToString(deterministic=True))
        if isinstance(v, np.ndarray):
            return ("a", v.dtype.str, v.shape, v.tobytes())
        if isinstance(v, (list, tuple)):
            return ("l", tuple(self._attr_key(x, scopes) for x in v))
        return ("x", type(v).__name__, repr(v))

    def _graph_key(self, g: gs.Graph, scopes: list[dict[int, tuple]]) -> tuple:
        local: dict[int, tuple] = {}
        inner = scopes + [local]
        parts: list = []
        for i, t in enumerate(g.inputs):
            local[id(t)] = ("in", len(scopes), i)
            shape = None if t.shape is None else tuple(d if isinstance(d, int) else None for d in t.shape)
            parts.append(("input", str(t.dtype), shape))
        for j, n in enumerate(g.nodes):
            parts.append(self._node_key(n, inner))
            for k, t in enumerate(n.outputs):
                if t.name:
                    local[id(t)] = ("out", len(scopes), j, k)
        parts.append(("outputs", tuple(self._ref(t, inner) for t in g.outputs)))
        return tuple(parts)


def _is_sorted(g: gs.Graph) -> bool:
    """Whether every node comes after the producers (in this graph) of what it reads."""
    mine = {id(t) for n in g.nodes for t in n.outputs}
    done: set[int] = set()
    for n in g.nodes:
        for t in n.inputs:
            if id(t) in mine and id(t) not in done:
                return False
        done.update(id(t) for t in n.outputs)
    return True
