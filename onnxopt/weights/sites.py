"""Where a model's weights are: the weight operands of Conv/ConvTranspose/Gemm/MatMul,
their values and storage, and which of them a compression pass selects.

A weight is found wherever it is stored: an initializer, a Constant node (as Paddle
exports keep them) or a compact storage written earlier (read back through its decoder
cone). Weights a rewrite must not touch — overridable graph inputs, graph outputs,
tensors another node reads as data — are skipped and counted by reason, so that a pass
can report why it left a layer alone.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import PipelineError
from ..graph import GraphIndex, const_value
from ..model import Model, extras, iter_graphs
from .decode import FLOAT_DTYPES, cone_storage, decoder_cone, tensor_value

__all__ = ["WEIGHT_OPS", "WeightSite", "WeightUse", "check_selection", "check_targets", "find_weights",
           "pattern_value", "select_weights"]

#: Operators whose weight operand the compression passes know.
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

log = logging.getLogger(__name__)


@dataclass
class WeightUse:
    """One node reading a weight: the input slot and the weight's contraction axis."""

    node: gs.Node
    slot: int
    axis: int  # non-negative, for the weight's rank


@dataclass
class WeightSite:
    """A weight tensor, its current value and how it is stored.

    ``source`` is ``initializer``, ``constant-node`` or ``decoded`` (the output of a
    decoder cone); ``storage`` names the form (``dense``, ``sparse``, ``dense-idx``,
    ``sparse-idx`` or ``computed``); ``graph`` is the graph that defines it (where a new
    storage goes).
    """

    tensor: gs.Tensor
    value: np.ndarray
    uses: list[WeightUse]
    graph: gs.Graph
    source: str
    storage: str
    cone: list[gs.Node] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def ops(self) -> list[str]:
        return sorted({u.node.op for u in self.uses})

    @property
    def axis(self) -> int | None:
        """The contraction axis, if every use agrees on it."""
        axes = {u.axis for u in self.uses}
        return axes.pop() if len(axes) == 1 else None

    @property
    def size(self) -> int:
        return int(self.value.size)

    def matches(self, pattern: re.Pattern) -> bool:
        """Whether the weight's name or the name of a node using it matches."""
        names = [self.name] + [u.node.name or "" for u in self.uses]
        return any(pattern.search(n) for n in names)


def _is_valued(t: gs.Tensor) -> bool:
    return const_value(t, load=False) is not None or decoder_cone(t) is not None


def _weight_slots(node: gs.Node) -> list[tuple[int, int]]:
    """(slot, axis) of the weight operand(s) of ``node``; the axis may be negative."""
    op = node.op
    ins = node.inputs
    if op == "Conv" and len(ins) >= 2:
        return [(1, 1)]
    if op == "ConvTranspose" and len(ins) >= 2:
        return [(1, 0)]
    if op in ("Gemm", "MatMul") and len(ins) >= 2:
        a, b = _is_valued(ins[0]), _is_valued(ins[1])
        if a == b:  # both constant (constant folding's job) or neither (no weight)
            return []
        if op == "Gemm":
            if b:
                return [(1, 1 if node.attrs.get("transB", 0) else 0)]
            return [(0, 0 if node.attrs.get("transA", 0) else 1)]
        return [(1, -2)] if b else [(0, -1)]
    return []


def find_weights(model: Model, ops: Sequence[str] = WEIGHT_OPS,
                 memo: dict[int, np.ndarray] | None = None) -> tuple[list[WeightSite], Counter]:
    """Every weight operand of the nodes of type ``ops`` (standard domain, every graph),
    with its value; and a count of the weights skipped, by reason.

    A weight is skipped when it is an initializer a user may override (listed as a graph
    input), a graph output, read by another node or in another slot, not a float tensor,
    or computed by nodes that are not a decoder cone. ``memo`` caches evaluated tensors
    (the layers of a block share most of their decoder).
    """
    memo = {} if memo is None else memo
    skipped: Counter = Counter()
    index = GraphIndex(model)
    found: dict[int, list[WeightUse]] = {}
    tensors: dict[int, gs.Tensor] = {}
    order: list[int] = []
    for g in iter_graphs(model.graph):
        for node in g.nodes:
            if node.op not in ops or node.domain not in (None, "", "ai.onnx"):
                continue
            for slot, axis in _weight_slots(node):
                t = node.inputs[slot]
                if id(t) not in found:
                    found[id(t)] = []
                    tensors[id(t)] = t
                    order.append(id(t))
                found[id(t)].append(WeightUse(node, slot, axis))
    outputs = {id(t) for g in iter_graphs(model.graph) for t in g.outputs}
    inputs = {id(t) for g in iter_graphs(model.graph) for t in g.inputs}
    sites = []
    for key in order:
        t, uses = tensors[key], found[key]
        why = _site_problem(t, uses, outputs, inputs)
        if why:
            log.debug("weight %s skipped: %s", t.name, why)
            skipped[why] += 1
            continue
        site = _make_site(model, index, t, uses, memo)
        if isinstance(site, str):
            log.debug("weight %s skipped: %s", t.name, site)
            skipped[site] += 1
            continue
        sites.append(site)
    return sites, skipped


def _site_problem(t: gs.Tensor, uses: list[WeightUse], outputs: set[int], inputs: set[int]) -> str:
    if id(t) in outputs:
        return "graph output"
    if id(t) in inputs:
        return "overridable (graph input)"
    used = Counter(id(u.node) for u in uses)
    for consumer in t.outputs:
        n_in = sum(1 for x in consumer.inputs if x is t)
        if used.get(id(consumer), 0) != n_in:
            return "also read as data by another node"
    return ""


def _make_site(model: Model, index: GraphIndex, t: gs.Tensor, uses: list[WeightUse],
               memo: dict[int, np.ndarray]) -> WeightSite | str:
    cone: list[gs.Node] = []
    if isinstance(t, gs.Constant):
        value = const_value(t, load=False)
        if value is None:
            return "overridable (graph input)"
        source, storage = "initializer", "dense"
        graph = _owner_graph(model, index, t, uses)
    else:
        producer = t.inputs[0] if t.inputs else None
        if producer is None:
            return "not a constant"
        value = const_value(t, load=False)
        if value is not None:
            source, storage = "constant-node", "dense"
        else:
            cone = decoder_cone(t) or []
            if not cone:
                return "not a constant"
            value = tensor_value(t, memo)
            if value is None:
                return "not a constant"
            source, storage = "decoded", cone_storage(cone)
        graph = index.graph_of[id(producer)]
    value = np.asarray(value)
    if value.dtype not in FLOAT_DTYPES:
        return f"dtype {value.dtype}"
    rank = value.ndim
    for u in uses:
        if rank == 0:
            return "scalar weight"
        if rank == 1:
            u.axis = 0
        elif u.axis < 0:
            u.axis += rank
        if not 0 <= u.axis < rank:
            return "weight rank does not fit its op"
    return WeightSite(t, value, uses, graph, source, storage, cone)


def _owner_graph(model: Model, index: GraphIndex, t: gs.Constant, uses: list[WeightUse]) -> gs.Graph:
    for g in iter_graphs(model.graph):
        if any(x is t for x in extras(g).initializers):
            return g
    graphs = [index.graph_of[id(u.node)] for u in uses]
    return min(graphs, key=index.depth)


def select_weights(sites: Iterable[WeightSite], *, min_size: int = 0, include: Sequence[str] = (),
                   exclude: Sequence[str] = ()) -> tuple[list[WeightSite], Counter]:
    """The sites with at least ``min_size`` elements whose weight or node name matches one
    of the ``include`` patterns (all when empty) and none of ``exclude`` (regular
    expressions, searched)."""
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    kept, skipped = [], Counter()
    for s in sites:
        if s.size < min_size:
            skipped["smaller than min_size"] += 1
        elif inc and not any(s.matches(p) for p in inc):
            skipped["not included"] += 1
        elif any(s.matches(p) for p in exc):
            skipped["excluded"] += 1
        else:
            kept.append(s)
    return kept, skipped


def check_selection(pass_name: str, ops: Sequence[str], patterns: Sequence[str]) -> None:
    """Raise :class:`PipelineError` for op types this module does not know or name
    patterns that are not regular expressions."""
    unknown = [o for o in ops if o not in WEIGHT_OPS]
    if unknown or not ops:
        raise PipelineError(f"pass '{pass_name}': ops must be among {', '.join(WEIGHT_OPS)}; "
                            f"got {', '.join(unknown) or 'none'}")
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise PipelineError(f"pass '{pass_name}': bad name pattern {p!r}: {exc}") from None


def check_targets(pass_name: str, specs: Sequence[str], cast, low: float, high: float) -> list[str]:
    """Check per-layer ``PATTERN=VALUE`` specs (value converted by ``cast`` and within
    ``[low, high]``); raise :class:`PipelineError` naming the bad entry."""
    for spec in specs:
        pattern, sep, raw = spec.rpartition("=")
        if not sep or not pattern:
            raise PipelineError(f"pass '{pass_name}': layers entry {spec!r} is not PATTERN=VALUE")
        check_selection(pass_name, WEIGHT_OPS, [pattern])
        try:
            value = cast(raw)
        except ValueError:
            raise PipelineError(f"pass '{pass_name}': layers entry {spec!r}: {raw!r} is not a number") from None
        if not low <= value <= high:
            raise PipelineError(f"pass '{pass_name}': layers entry {spec!r}: value must be in [{low}, {high}]")
    return list(specs)


def pattern_value(specs: Sequence[str], site: WeightSite, cast):
    """The value of the first ``PATTERN=VALUE`` spec (checked by :func:`check_targets`)
    whose pattern matches ``site``, converted by ``cast``; None if none does."""
    for spec in specs:
        pattern, _, raw = spec.rpartition("=")
        if site.matches(re.compile(pattern)):
            return cast(raw)
    return None
