"""Channel-dependency groups: the channels of a model that must be removed together.

Removing output channel ``c`` of a convolution is only correct if every tensor that
carries that channel loses it too: the BatchNormalization parameters and per-channel
constants applied to it, the input channel ``c`` of every layer that reads it, the
matching channel of every tensor it is added to in a residual connection, its slot in a
Concat, the kernel of a depthwise convolution that filters it. :func:`analyze` walks the
main graph once, letting each op's rule carry the channels' layouts forward and join the
spaces that residual ops combine; a group is one connected component of those joins.

What the walk does not understand (a Softmax or reduction over the channels, a grouped
convolution, a reshape that splits the channel axis, a tensor read inside an If/Loop
body, a graph output, an unknown domain ...) makes every group it touches un-prunable,
with the reason recorded and logged at DEBUG. Weights may be initializers, Constant-node
outputs or short constant expressions, never overridable initializers. Subgraph bodies
are left alone. ``onnxopt inspect --channel-groups`` shows the result.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from ..graph import implicit_inputs
from ..model import Model, node_subgraphs
from .flow import ChannelFlow, label
from .layer_ops import LAYER_RULES

if TYPE_CHECKING:
    import networkx as nx
from .layout import Layout, Member
from .per_channel_ops import ELEMENTWISE, PER_CHANNEL_RULES
from .shape_ops import SHAPE_RULES

__all__ = ["ChannelGroup", "ChannelGroups", "analyze"]

log = logging.getLogger(__name__)

_STD = (None, "", "ai.onnx")
#: Ops that read a tensor's shape or size, never its channels' values.
_HARMLESS = frozenset(["Shape", "Size"])
_RULES = {**PER_CHANNEL_RULES, **SHAPE_RULES}


@dataclass
class ChannelGroup:
    """Channels removed together: ``size`` channels, the members rewritten with them, the
    tensors carrying them; ``prunable`` or the ``reasons`` why not."""

    id: int
    size: int
    spaces: list[int]
    members: list[Member]
    tensors: list[tuple[gs.Tensor, Layout]]
    prunable: bool
    reasons: list[str]
    sources: list[str]

    def describe(self) -> dict:
        roles = Counter(m.role or m.kind for m in self.members)
        return {"id": self.id, "channels": self.size, "prunable": self.prunable,
                "reasons": list(self.reasons), "sources": list(self.sources),
                "members": dict(sorted(roles.items())), "tensors": len(self.tensors)}

    def members_with(self, *roles: str) -> list[Member]:
        return [m for m in self.members if m.role in roles]


class ChannelGroups:
    """The result of :func:`analyze`: the groups, by id, and counts for the report."""

    def __init__(self, model: Model, groups: list[ChannelGroup], members: list[Member],
                 tensors: list[tuple[gs.Tensor, Layout]], root: dict[int, int],
                 skipped: Mapping[str, int] | None = None, joins: nx.Graph | None = None):
        self.skipped = dict(skipped or {})
        #: spaces (nodes) and the residual joins between them (edges, ``where`` = the op)
        if joins is None:
            import networkx as nx  # imported where used: the pass library loads without it

            joins = nx.Graph()
        self.joins = joins
        self.model = model
        self.groups = groups
        self.by_id = {g.id: g for g in groups}
        self.members = members
        self.tensors = tensors
        self._root = root

    def root(self, space: int) -> int:
        return self._root.get(space, space)

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def stats(self) -> dict:
        reasons = Counter()
        for g in self.groups:
            if not g.prunable:
                reasons[g.reasons[0].split(":", 1)[0] if g.reasons else "unknown"] += 1
        return {"groups": len(self.groups), "prunable": len(self.prunable),
                "layers_skipped": dict(sorted(self.skipped.items())),
                "unprunable": len(self.groups) - len(self.prunable),
                "channels": sum(g.size for g in self.groups),
                "prunable_channels": sum(g.size for g in self.prunable),
                "unprunable_reasons": dict(sorted(reasons.items()))}

    def describe(self) -> list[dict]:
        return [g.describe() for g in self.groups]


def analyze(model: Model) -> ChannelGroups:
    """The channel-dependency groups of ``model``'s main graph (never raises on odd
    graphs: what it does not understand is un-prunable)."""
    flow = ChannelFlow(model)
    _walk(flow)
    return _groups(flow)


def _walk(flow: ChannelFlow) -> None:
    """Run every node's rule in graph order; block what reaches a graph output."""
    graph = flow.graph
    for node in graph.nodes:
        try:
            _visit(flow, node)
        except Exception as exc:  # never let an odd node break the analysis
            for t in node.inputs:
                flow.block_layout(flow.lay(t), f"error: {label(node)}: {type(exc).__name__}: {exc}")
            log.debug("channel groups: %s raised %s", label(node), exc)
    for tid in {id(t) for t in graph.outputs}:
        lay = flow.layouts.get(tid)
        if lay is not None:
            name = next(t.name for t in graph.outputs if id(t) == tid)
            flow.block_layout(lay, f"output: reaches graph output '{name}'")


def _visit(flow: ChannelFlow, node: gs.Node) -> None:
    op = node.op
    lays = [flow.lay(t) for t in node.inputs]
    implicit = implicit_inputs(node) if node_subgraphs(node) else []
    for t in implicit:
        flow.block_layout(flow.lay(t), f"subgraph: read inside a subgraph of {label(node)}")
    if node.domain not in _STD:
        for lay in lays:
            flow.block_layout(lay, f"op: {node.domain}.{op} {label(node)} is not understood")
        return
    if op in LAYER_RULES:
        LAYER_RULES[op](flow, node)
        return
    if all(lay is None for lay in lays) or op in _HARMLESS:
        return
    if op not in ELEMENTWISE and op != "Concat":
        # Single-data ops: channels on a parameter input (a shape, scales, bounds)
        # would change what the op does.
        for lay in lays[1:]:
            flow.block_layout(lay, f"op: {label(node)} uses the channels as a parameter")
        if lays[0] is None:
            return
    rule = _RULES.get(op)
    if rule is None:
        for lay in lays:
            flow.block_layout(lay, f"op: {op} {label(node)} consumes the channels")
        return
    rule(flow, node)


def _groups(flow: ChannelFlow) -> ChannelGroups:
    """The connected components of the join graph, as groups; a group's id is its
    smallest space."""
    roots: dict[int, list[int]] = {}
    root_of: dict[int, int] = {}
    import networkx as nx

    for component in nx.connected_components(flow.joins):
        spaces = sorted(component)
        roots[spaces[0]] = spaces
        for s in spaces:
            root_of[s] = spaces[0]
    members_by_root: dict[int, list[Member]] = {r: [] for r in roots}
    for m in flow.members:
        for r in {root_of[s] for s in m.spaces()}:
            members_by_root[r].append(m)
    tensors_by_root: dict[int, list] = {r: [] for r in roots}
    all_tensors = []
    for tid in flow.order:
        t, lay = flow.tensor_of[tid], flow.layouts[tid]
        all_tensors.append((t, lay))
        for r in {root_of[s] for s in lay.spaces()}:
            tensors_by_root[r].append((t, lay))
    groups = []
    for r, spaces in sorted(roots.items()):
        reasons: list[str] = []
        for s in spaces:
            for why in flow.reasons.get(s, []):
                if why not in reasons:
                    reasons.append(why)
        size = flow.size[r]
        if not reasons and size < 2:
            reasons.append("size: a single channel")
        groups.append(ChannelGroup(r, size, sorted(spaces), members_by_root[r], tensors_by_root[r],
                                   not reasons, reasons, [flow.origin[s] for s in sorted(spaces)]))
    return ChannelGroups(flow.model, groups, flow.members, all_tensors,
                         root_of, flow.skipped, flow.joins)
