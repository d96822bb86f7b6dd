"""Compact weight storage that stock onnxruntime expands once, at session creation.

The compression passes (``prune-magnitude``, ``share-weights``) and ``materialize``
share this module: where the weights of a model are, what their values are, how they
are stored in few bytes, and what a model's storage costs.

Storage forms, chosen per layer (whichever is smallest):

``dense``
    a plain tensor (initializer, or Constant node) — what exporters write.
``sparse``
    the non-zero values as floats and their positions as gaps in few bits.
``dense-idx``
    one codebook index per weight, in few bits, and a small float codebook.
``sparse-idx``
    the positions of the non-zeros as gaps, and one codebook index per non-zero.
    Codebook entry 0 is exactly 0.0 whenever the layer has zeros, so zeros stay exact and
    outside the clusters (and the gap fillers below have a value).

The compact layers of a graph are stored together, one *block* per form (and index
width and dtype): the streams of all its layers are concatenated, expanded by one chain
of ordinary ONNX ops, and a ``Split`` plus one ``Reshape`` per layer give each weight
back. Onnxruntime materializes the output of every node it folds, so the cost of
session creation grows with the nodes and the bytes of the expansion: one decoder per
layer made session creation of the 60-layer PP-OCR detector 2.2-2.9x slower, one block
per form keeps it to a handful of nodes plus three per layer.

* Bit-packing: a stream of ``w``-bit values is packed into words of 8 or 32 bits
  (``32 // w`` values per uint32 ...), slot-major. The word row ``[1, n_words]`` is
  unpacked for all slots at once: ``BitShift(words, left_shifts, LEFT)`` (the shifts a
  column ``[slots, 1]``, broadcast) moves slot ``j`` to the top of the word and
  ``BitShift(·, word_bits - w, RIGHT)`` brings it down; ``Reshape`` (and ``Slice``, or
  the block's ``Split``) give the stream in order. A stream of exactly 8/16/32-bit
  values is stored as uint8/16/32 and only cast.
* Positions: gaps between consecutive stored entries (the paper's relative index) in
  the block's flat space. A gap that does not fit the chosen width gets filler entries
  (value 0), and the first entry is at position 0 (a filler if that weight is zero), so
  the positions are ``CumSum`` of the gaps (int32); ``ScatterElements`` writes the
  values into ``ConstantOfShape`` zeros. The gap width is chosen per block to minimise
  the bits.
* Codebooks: each layer keeps its own. ``dense-idx`` blocks split the index stream by
  layer; ``sparse-idx`` blocks scatter the entries' indices into a uint8 index buffer
  (zeros get index 0, which is 0.0) and split that. Each part is shaped like its weight,
  cast and looked up (``Gather``), so the lookup's output is the weight itself.

What onnxruntime folds is kept narrow (uint8 where it can, int32 indices, no 8-byte
words), because it materializes every intermediate of the expansion once.

Every operator is ordinary ONNX (``BitShift``/``CumSum``/``ScatterElements`` need opset 11;
below it a layer is stored as ``dense-idx`` with one uint8 index per weight, or dense)
and every input is a constant, so onnxruntime computes each weight once, when it creates
the session: the optimized graph is the original one, and inference speed does not
change. Stored constants are initializers, or Constant nodes in IR < 4 models (whose
initializers are graph inputs a user may override, which would stop the folding).

Reading weights back: :func:`tensor_value` evaluates a constant or the output of a
*decoder cone* — nodes of :data:`DECODER_OPS` whose leaves are all constants — with a
small numpy interpreter that computes exactly what onnxruntime computes (the ops move
values without float arithmetic). It recognises any storage written here, also after
other passes merged shared constants or nodes.
"""

from __future__ import annotations

import gzip
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import PipelineError
from .graph import GraphIndex, NameAllocator, const_value, release_constant, replace_uses
from .model import Model, extras, iter_graphs, tensor_nbytes

__all__ = [
    "DECODER_OPS",
    "WEIGHT_OPS",
    "COMPACT",
    "WeightUse",
    "WeightSite",
    "Plan",
    "find_weights",
    "select_weights",
    "check_selection",
    "check_targets",
    "pattern_value",
    "tensor_value",
    "decoder_cone",
    "storage_of",
    "plan_storage",
    "StorageWriter",
    "compression_report",
    "format_report",
    "gzip_size",
    "model_opset",
]

log = logging.getLogger(__name__)

#: Operators a decoder cone may contain: what this module writes, and what other passes
#: may turn it into (Identity, Unsqueeze/Squeeze, Concat of merged constants).
DECODER_OPS = frozenset({"BitShift", "Cast", "Gather", "Reshape", "Slice", "CumSum", "ConstantOfShape",
                         "ScatterND", "ScatterElements", "Split", "Add", "Unsqueeze", "Squeeze", "Identity", "Concat",
                         "Constant"})

#: Operators whose weight operand the compression passes know.
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

#: The compact storage forms (``dense`` is the plain tensor).
COMPACT = ("sparse", "dense-idx", "sparse-idx")

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_MIN_OPSET_PACKED = 11  # BitShift, CumSum, ScatterElements
_MIN_OPSET = 6  # Cast with a `to` attribute, Gather, Reshape with a shape input
_LAYER_BYTES = 40  # a layer's own structure in a block: its Reshape, shape and names


# --------------------------------------------------------------------------------------
# Where the weights are
# --------------------------------------------------------------------------------------


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
            source, storage = "decoded", _cone_storage(cone)
        graph = index.graph_of[id(producer)]
    value = np.asarray(value)
    if value.dtype not in _FLOATS:
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


# --------------------------------------------------------------------------------------
# Reading values back: decoder cones and their evaluation
# --------------------------------------------------------------------------------------


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


def tensor_value(t: gs.Tensor, memo: dict[int, np.ndarray] | None = None) -> np.ndarray | None:
    """The value of a constant or of a decoder cone's output; None for anything else.
    ``memo`` (tensor id -> value) caches what was evaluated, for the next calls."""
    v = const_value(t, load=False)
    if v is not None:
        return np.asarray(v)
    if decoder_cone(t) is None:
        return None
    try:
        return _evaluate(t, {} if memo is None else memo)
    except _NotDecodable as exc:
        log.debug("cannot evaluate %s: %s", t.name, exc)
        return None


class _NotDecodable(Exception):
    pass


def _evaluate(t: gs.Tensor, memo: dict[int, np.ndarray]) -> np.ndarray:
    if id(t) in memo:
        return memo[id(t)]
    v = const_value(t, load=False)
    if v is not None:
        out = np.asarray(v)
    else:
        node = t.inputs[0]
        args = [None if (isinstance(x, gs.Variable) and not x.name) else _evaluate(x, memo)
                for x in node.inputs]
        fn = _INTERPRETER.get(node.op)
        if fn is None:
            raise _NotDecodable(f"no evaluator for {node.op}")
        try:
            result = fn(node, args)
        except (ValueError, IndexError, TypeError, KeyError) as exc:
            raise _NotDecodable(f"{node.op}: {exc}") from exc
        if node.op == "Split":
            if len(result) != len(node.outputs):
                raise _NotDecodable("Split gives another number of outputs")
            for o, r in zip(node.outputs, result):
                memo[id(o)] = r
            out = memo[id(t)]
        elif len(node.outputs) != 1:
            raise _NotDecodable(f"{node.op} with {len(node.outputs)} outputs")
        else:
            out = result
    memo[id(t)] = out
    return out


def _np_dtype(onnx_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type))


def _attr_or_input(node: gs.Node, args: list, index: int, attr: str):
    if len(args) > index and args[index] is not None:
        return [int(v) for v in np.asarray(args[index]).ravel()]
    value = node.attrs.get(attr)
    return None if value is None else [int(v) for v in value]


def _op_bitshift(node, args):
    a, b = args
    if a.dtype.kind != "u":
        raise ValueError("BitShift on a signed type")
    b = b.astype(a.dtype)
    if node.attrs.get("direction") == "LEFT":
        return np.left_shift(a, b).astype(a.dtype)
    if node.attrs.get("direction") == "RIGHT":
        return np.right_shift(a, b).astype(a.dtype)
    raise ValueError("BitShift direction")


def _op_cast(node, args):
    return args[0].astype(_np_dtype(int(node.attrs["to"])))


def _op_gather(node, args):
    data, idx = args
    axis = int(node.attrs.get("axis", 0))
    idx = np.asarray(idx).astype(np.int64)
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    return np.take(data, idx, axis=axis)


def _op_reshape(node, args):
    data, shape = args
    shape = [int(s) for s in np.asarray(shape).ravel()]
    if not node.attrs.get("allowzero", 0):
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return data.reshape(shape)


def _op_slice(node, args):
    data = args[0]
    starts, ends = np.asarray(args[1]).ravel(), np.asarray(args[2]).ravel()
    axes = np.asarray(args[3]).ravel() if len(args) > 3 and args[3] is not None else np.arange(len(starts))
    steps = np.asarray(args[4]).ravel() if len(args) > 4 and args[4] is not None else np.ones(len(starts), np.int64)
    index = [slice(None)] * data.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = int(a) + (data.ndim if a < 0 else 0)
        dim = data.shape[a]
        s, e, st = int(s), int(e), int(st)
        if st == 0:
            raise ValueError("Slice step 0")
        s = max(min(s + dim if s < 0 else s, dim if st > 0 else dim - 1), 0 if st > 0 else -1)
        e = max(min(e + dim if e < 0 else e, dim if st > 0 else dim - 1), 0 if st > 0 else -1)
        index[a] = slice(s, None if (st < 0 and e < 0) else e, st)
    return data[tuple(index)]


def _op_cumsum(node, args):
    x, axis = args
    axis = int(np.asarray(axis).ravel()[0])
    if node.attrs.get("reverse", 0):
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis, dtype=x.dtype)
    if node.attrs.get("exclusive", 0):
        out = out - x
    if node.attrs.get("reverse", 0):
        out = np.flip(out, axis)
    return out


def _op_constant_of_shape(node, args):
    shape = [int(s) for s in np.asarray(args[0]).ravel()]
    value = node.attrs.get("value")
    fill = np.asarray(value.values).ravel() if isinstance(value, gs.Constant) else np.zeros(1, np.float32)
    return np.full(shape, fill[0], dtype=fill.dtype)


def _op_scatter_nd(node, args):
    data, indices, updates = args
    if node.attrs.get("reduction", "none") not in ("none", b"none"):
        raise ValueError("ScatterND with a reduction")
    out = np.array(data, copy=True)
    indices = np.asarray(indices).astype(np.int64)
    k = indices.shape[-1]
    flat_idx = indices.reshape(-1, k)
    upd = np.asarray(updates).reshape((flat_idx.shape[0],) + data.shape[k:])
    for dim in range(k):
        col = flat_idx[:, dim]
        flat_idx[:, dim] = np.where(col < 0, col + data.shape[dim], col)
    out[tuple(flat_idx.T)] = upd
    return out


def _op_unsqueeze(node, args):
    axes = _attr_or_input(node, args, 1, "axes")
    out = args[0]
    rank = out.ndim + len(axes)
    for a in sorted(a + rank if a < 0 else a for a in axes):
        out = np.expand_dims(out, a)
    return out


def _op_squeeze(node, args):
    axes = _attr_or_input(node, args, 1, "axes")
    if axes is None:
        return np.squeeze(args[0])
    return np.squeeze(args[0], axis=tuple(a + args[0].ndim if a < 0 else a for a in axes))


def _op_concat(node, args):
    return np.concatenate([a for a in args if a is not None], axis=int(node.attrs["axis"]))


def _op_split(node, args):
    data = args[0]
    axis = int(node.attrs.get("axis", 0))
    sizes = _attr_or_input(node, args, 1, "split")
    n = len(node.outputs)
    if sizes is None:
        dim = data.shape[axis]
        step = -(-dim // n)
        sizes = [min(step, dim - i * step) for i in range(n)]
    if sum(sizes) != data.shape[axis] or len(sizes) != n:
        raise ValueError("Split sizes do not match")
    return np.split(data, np.cumsum(sizes)[:-1], axis=axis)


def _op_add(node, args):
    a, b = args
    if a.dtype != b.dtype:
        raise ValueError("Add of two dtypes")
    return np.add(a, b, dtype=a.dtype)


def _op_scatter_elements(node, args):
    data, indices, updates = args
    if node.attrs.get("reduction", "none") not in ("none", b"none"):
        raise ValueError("ScatterElements with a reduction")
    axis = int(node.attrs.get("axis", 0))
    axis += data.ndim if axis < 0 else 0
    out = np.array(data, copy=True)
    idx = np.asarray(indices).astype(np.int64)
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    np.put_along_axis(out, idx, np.asarray(updates), axis=axis)
    return out


_INTERPRETER = {
    "ScatterElements": _op_scatter_elements,
    "Split": _op_split,
    "Add": _op_add,
    "BitShift": _op_bitshift,
    "Cast": _op_cast,
    "Gather": _op_gather,
    "Reshape": _op_reshape,
    "Slice": _op_slice,
    "CumSum": _op_cumsum,
    "ConstantOfShape": _op_constant_of_shape,
    "ScatterND": _op_scatter_nd,
    "Unsqueeze": _op_unsqueeze,
    "Squeeze": _op_squeeze,
    "Identity": lambda node, args: args[0],
    "Concat": _op_concat,
}


def _cone_storage(cone: list[gs.Node]) -> str:
    sparse = any(n.op in ("ScatterND", "ScatterElements") for n in cone)
    indexed = False
    for n in cone:
        if n.op == "Gather" and n.inputs:
            data = const_value(n.inputs[0], load=False)
            if data is not None and np.asarray(data).dtype in _FLOATS:
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
    return _cone_storage(cone) if cone else ""


# --------------------------------------------------------------------------------------
# Planning a layer's storage: pure numpy, nothing in the graph changes
# --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """How one layer is stored: its form and exact value; for the indexed forms the
    codebook and each element's codebook index; ``cost``, the estimated bytes the layer
    adds to its block."""

    kind: str
    value: np.ndarray
    codebook: np.ndarray | None = None
    lookup: np.ndarray | None = None
    cost: int = 0

    @property
    def width(self) -> int:
        """Bits of a codebook index (0 for the float forms)."""
        if self.codebook is None:
            return 0
        return max(1, math.ceil(math.log2(self.codebook.size))) if self.codebook.size > 1 else 1

    def nonzero(self) -> np.ndarray:
        """Flat positions of the elements that are not +0.0 (bit pattern), i.e. stored."""
        flat = np.ascontiguousarray(self.value).ravel()
        return np.flatnonzero(flat.view(np.dtype(f"u{flat.dtype.itemsize}")))


def _packed_bytes(count: int, width: int) -> int:
    """Bytes of ``count`` values of ``width`` bits in the best container (see _pack)."""
    best = None
    for bits in (8, 16, 32):
        if width <= bits:
            best = count * bits // 8
            break
    for bits in _WORD_BITS:
        if width < bits:
            size = -(-count // (bits // width)) * bits // 8
            best = size if best is None else min(best, size)
    return int(best)


def _best_gap_width(positions: np.ndarray, value_bits: int) -> tuple[int, int]:
    """(gap width, total bits) minimising the stored bits of the entries at sorted
    ``positions`` (plus position 0 and the fillers)."""
    if positions.size == 0:
        return 1, value_bits
    pos = positions if positions[0] == 0 else np.concatenate([[0], positions])
    gaps = np.diff(pos, prepend=0)
    best = (1, None)
    for w in range(1, min(max(int(gaps.max()).bit_length(), 1), 40) + 1):
        limit = (1 << w) - 1
        entries = pos.size + int(np.maximum(-(-gaps // limit) - 1, 0).sum())
        bits = entries * (w + value_bits)
        if best[1] is None or bits < best[1]:
            best = (w, bits)
    return best[0], int(best[1])


def _gap_entries(positions: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Entry positions (``positions`` plus position 0 and fillers) and their gaps."""
    limit = (1 << width) - 1
    pos = positions.astype(np.int64)
    if pos.size == 0 or pos[0] != 0:
        pos = np.concatenate([[0], pos]).astype(np.int64)
    gaps = np.diff(pos, prepend=0)
    fillers = np.maximum(-(-gaps // limit) - 1, 0)
    if not fillers.any():
        return pos, gaps
    reps = fillers + 1
    entry_gap = np.repeat(np.full(pos.size, limit, np.int64), reps)
    entry_gap[np.cumsum(reps) - 1] = gaps - fillers * limit
    return np.cumsum(entry_gap), entry_gap


def plan_storage(value: np.ndarray, *, opset: int, max_codebook: int = 256) -> Plan:
    """The cheapest storage of ``value`` among the forms the opset allows.

    Indexed forms are considered when the tensor takes at most ``max_codebook`` distinct
    values (after weight sharing, or any weight that happens to), sparse forms when it
    has zeros. Values are compared bit for bit (``-0.0`` is a value, not a zero), so the
    storage gives back exactly ``value``.
    """
    value = np.ascontiguousarray(value)
    flat = value.ravel()
    dense = Plan("dense", value, cost=int(value.nbytes))
    if opset < _MIN_OPSET or flat.size == 0 or value.dtype not in _FLOATS:
        return dense
    packed = opset >= _MIN_OPSET_PACKED
    pattern = flat.view(np.dtype(f"u{value.dtype.itemsize}"))
    zero = pattern == 0
    has_zeros = bool(zero.any())
    nonzero = np.flatnonzero(~zero)
    plans = [dense]
    uniq = np.unique(pattern[~zero])
    offset = 1 if has_zeros else 0
    if 0 < uniq.size + offset <= max_codebook:
        values = uniq.view(value.dtype)
        perm = np.argsort(values, kind="stable")  # a codebook in value order reads better
        rank = np.empty_like(perm)
        rank[perm] = np.arange(perm.size)
        codebook = np.concatenate([np.zeros(offset, value.dtype), values[perm]]).astype(value.dtype)
        lookup = np.zeros(flat.size, np.int64)
        lookup[nonzero] = rank[np.searchsorted(uniq, pattern[nonzero])] + offset
        idx = Plan("dense-idx", value, codebook, lookup)
        if packed:
            idx.cost = _packed_bytes(flat.size, idx.width) + codebook.nbytes + _LAYER_BYTES
            plans.append(idx)
            if has_zeros:
                _, bits = _best_gap_width(nonzero, idx.width)
                plans.append(Plan("sparse-idx", value, codebook, lookup,
                                  cost=-(-bits // 8) + codebook.nbytes + _LAYER_BYTES))
        elif idx.width <= 8:  # one uint8 index per weight, its own Cast-Gather-Reshape
            idx.cost = flat.size + codebook.nbytes + 3 * _LAYER_BYTES
            plans.append(idx)
    if packed and has_zeros:
        _, bits = _best_gap_width(nonzero, value.dtype.itemsize * 8)
        plans.append(Plan("sparse", value, cost=-(-bits // 8) + _LAYER_BYTES))
    return min(plans, key=lambda p: p.cost)  # the first of equals: dense wins ties


@dataclass
class _Stream:
    """``count`` unsigned values of ``width`` bits stored in ``words``.

    ``direct`` streams are the values themselves (uint8/16/32). Packed streams hold
    ``per_word`` values per word, slot-major: value ``k`` is in word ``k % n_words``, slot
    ``k // n_words`` (bits ``[width*slot, width*(slot+1))``), so that unpacking the words
    row ``[1, n_words]`` against the shift column ``[per_word, 1]`` gives the values in
    order, each row a long contiguous run (fast to broadcast).
    """

    count: int
    width: int
    words: np.ndarray
    direct: bool

    @property
    def per_word(self) -> int:
        return 1 if self.direct else self.words.dtype.itemsize * 8 // self.width

    @property
    def length(self) -> int:
        """Values the unpacking gives (padding included)."""
        return self.count if self.direct else self.words.size * self.per_word

    def cost(self) -> int:
        shifts = 0 if self.direct else (self.per_word + 1) * self.words.dtype.itemsize
        return int(self.words.nbytes) + shifts


#: Word sizes for packed streams: BitShift takes uint8/32/64, and 64-bit words would make
#: onnxruntime fold 8-byte intermediates (twice the work of uint32 for 2-7 % fewer bytes).
_WORD_BITS = (8, 32)


def _pack(values: np.ndarray, width: int) -> _Stream:
    """The smallest stream holding ``values`` (non-negative, below ``2**width``)."""
    values = np.asarray(values, dtype=np.uint64).ravel()
    n = values.size
    candidates = []
    for dtype in (np.uint8, np.uint16, np.uint32):
        if width <= np.dtype(dtype).itemsize * 8:
            candidates.append(_Stream(n, width, values.astype(dtype), True))
            break
    for bits in _WORD_BITS:
        if width >= bits:
            continue
        per = bits // width
        words = max(-(-n // per), 1)
        padded = np.zeros(words * per, np.uint64)
        padded[:n] = values
        slots = padded.reshape(per, words)
        packed = np.zeros(words, np.uint64)
        for j in range(per):
            packed |= slots[j] << np.uint64(width * j)
        dtype = np.dtype(f"u{bits // 8}")
        candidates.append(_Stream(n, width, packed.astype(dtype).reshape(1, words), False))
    return min(candidates, key=lambda s: s.cost())


# --------------------------------------------------------------------------------------
# Writing storages into the graph
# --------------------------------------------------------------------------------------


class _ShortNames:
    """Short fresh names (``c0``, ``c1`` ... base 36): at a few kilobytes per model, the
    names of the storage's tensors are a visible part of the file."""

    _DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"

    def __init__(self, model: Model):
        self.taken = NameAllocator(model).taken
        self.counter = 0

    def __call__(self) -> str:
        while True:
            n, s = self.counter, ""
            self.counter += 1
            while True:
                n, r = divmod(n, 36)
                s = self._DIGITS[r] + s
                if n == 0:
                    break
            if "c" + s not in self.taken:
                self.taken.add("c" + s)
                return "c" + s


@dataclass
class _Pending:
    site: WeightSite
    value: np.ndarray
    dense: bool


class StorageWriter:
    """Writes new weight values into a model, each in its cheapest storage.

    ``write(site, value)`` records a layer's new value (``dense=True``: as a plain
    tensor); :meth:`commit` then rebuilds the compact storage of every graph that holds a
    written layer — the written layers and the layers already stored compactly there,
    one block per form — checks that every block gives back exactly its values, rewires
    the weights' readers, and drops the nodes and constants nothing reads any more.
    Nothing in the graph changes before :meth:`commit`.
    """

    def __init__(self, model: Model, memo: dict[int, np.ndarray] | None = None):
        self.model = model
        self.memo = {} if memo is None else memo
        self.pending: dict[int, _Pending] = {}

    def write(self, site: WeightSite, value: np.ndarray, *, dense: bool = False) -> None:
        self.pending[id(site.tensor)] = _Pending(site, np.ascontiguousarray(value), dense)

    # -- commit --------------------------------------------------------------------------

    def commit(self) -> dict[str, int]:
        """Apply the writes; returns how many layers ended in each storage form."""
        if not self.pending:
            return {}
        model = self.model
        opset = model_opset(model)
        existing, _ = find_weights(model, WEIGHT_OPS, self.memo)
        members: dict[int, list[_Pending]] = {}
        graphs: dict[int, gs.Graph] = {}
        for p in self.pending.values():
            members.setdefault(id(p.site.graph), []).append(p)
            graphs[id(p.site.graph)] = p.site.graph
        for s in existing:
            if id(s.tensor) not in self.pending and s.storage in COMPACT and id(s.graph) in graphs:
                members[id(s.graph)].append(_Pending(s, s.value, False))
        self.names = _ShortNames(model)
        self.constant_nodes = model.ir_version < 4
        self.opset = opset
        self.new_nodes: dict[int, list[gs.Node]] = {}
        self.pool: dict[tuple, gs.Tensor] = {}
        counts: Counter = Counter()
        replacements: list[tuple[WeightSite, gs.Tensor]] = []
        dense: list[tuple[WeightSite, np.ndarray]] = []
        for g in iter_graphs(model.graph):  # outer graphs first, deterministic order
            todo = members.get(id(g))
            if not todo:
                continue
            blocks: dict[tuple, list[tuple[WeightSite, Plan]]] = {}
            for p in todo:
                plan = Plan("dense", p.value) if p.dense else plan_storage(p.value, opset=opset)
                counts[plan.kind] += 1
                if plan.kind == "dense":
                    dense.append((p.site, p.value))
                    continue
                key = (plan.kind, plan.width, plan.value.dtype.str)
                blocks.setdefault(key, []).append((p.site, plan))
            for (kind, width, _), layers in blocks.items():
                outs = self._block(g, kind, width, layers)
                replacements.extend(zip((s for s, _ in layers), outs))
        self._verify(replacements, {id(p.site.tensor): p.value for g in members.values() for p in g})
        # From here on the graph changes.
        for key, nodes in self.new_nodes.items():
            g = graphs.get(key) or next(x for x in iter_graphs(model.graph) if id(x) == key)
            g.nodes = nodes + list(g.nodes)
        dead: list[gs.Node] = []
        released: list[gs.Tensor] = []
        for site, out in replacements:
            self._replace(site, out, dead, released)
        for site, value in dense:
            self._write_plain(site, value, dead, released)
        self._sweep(dead, released)
        self.pending.clear()
        return dict(sorted(counts.items()))

    def _verify(self, replacements: list[tuple[WeightSite, gs.Tensor]], values: dict[int, np.ndarray]) -> None:
        memo: dict[int, np.ndarray] = {}
        for site, out in replacements:
            want = values[id(site.tensor)]
            try:
                got = _evaluate(out, memo)
            except _NotDecodable as exc:
                got = None
                log.error("storage of %s cannot be evaluated: %s", site.name, exc)
            if got is None or got.shape != want.shape or got.dtype != want.dtype or \
                    not np.array_equal(got.view(np.uint8), want.view(np.uint8)):
                for nodes in self.new_nodes.values():
                    for n in nodes:
                        n.inputs.clear()
                        n.outputs.clear()
                raise RuntimeError(f"the storage written for {site.name} does not give back its values")

    def _replace(self, site: WeightSite, out: gs.Tensor, dead: list, released: list) -> None:
        """Make the weight's readers read ``out``, which takes the weight's name."""
        old = site.tensor
        replace_uses(old, out)
        name = old.name
        if isinstance(old, gs.Constant):
            released.append(old)
        else:
            old.name = self.names()
            dead.extend(decoder_cone(old) or list(old.inputs))
        out.name = name

    def _write_plain(self, site: WeightSite, value: np.ndarray, dead: list, released: list) -> None:
        old = site.tensor
        if isinstance(old, gs.Constant):
            old.values = value
            return
        producer = old.inputs[0] if old.inputs else None
        if producer is not None and producer.op == "Constant":
            producer.attrs = {"value": gs.Constant("", value)}
            producer.attr_types = {"value": onnx.AttributeProto.TENSOR}
            return
        if self.constant_nodes:
            out = gs.Variable(self.names())
            node = gs.Node("Constant", inputs=[], outputs=[out], attrs={"value": gs.Constant("", value)})
            site.graph.nodes = [node] + list(site.graph.nodes)
        else:
            out = gs.Constant(old.name, value)
        self._replace(site, out, dead, released)

    def _sweep(self, dead: list[gs.Node], released: list[gs.Tensor]) -> None:
        candidates = {id(n): n for n in dead}
        live_outputs = {id(t) for g in iter_graphs(self.model.graph) for t in g.outputs}
        removed: set[int] = set()
        changed = True
        while changed:
            changed = False
            for key, node in list(candidates.items()):
                if any(t.outputs or id(t) in live_outputs for t in node.outputs):
                    continue
                for x in node.inputs:
                    if isinstance(x, gs.Constant):
                        released.append(x)
                    elif x.inputs and x.inputs[0].op in DECODER_OPS:
                        candidates.setdefault(id(x.inputs[0]), x.inputs[0])
                node.inputs.clear()
                node.outputs.clear()
                removed.add(key)
                del candidates[key]
                changed = True
        if removed:
            for g in iter_graphs(self.model.graph):
                if any(id(n) in removed for n in g.nodes):
                    g.nodes = [n for n in g.nodes if id(n) not in removed]
        for t in released:
            release_constant(self.model, t)

    # -- building blocks -------------------------------------------------------------------

    def _const(self, g: gs.Graph, array: np.ndarray, share: bool = False) -> gs.Tensor:
        array = np.ascontiguousarray(array)
        key = (id(g), array.dtype.str, array.shape, array.tobytes()) if share else None
        if key is not None and key in self.pool:
            return self.pool[key]
        if self.constant_nodes:
            out = self._node(g, "Constant", [], value=gs.Constant("", array))
        else:
            out = gs.Constant(self.names(), array)
        if key is not None:
            self.pool[key] = out
        return out

    def _node(self, g: gs.Graph, op: str, inputs: list, n_out: int = 1, **attrs) -> gs.Tensor | list:
        outs = [gs.Variable(self.names()) for _ in range(n_out)]
        node = gs.Node(op, inputs=list(inputs), outputs=outs, attrs=attrs)
        self.new_nodes.setdefault(id(g), []).append(node)
        return outs[0] if n_out == 1 else outs

    def _words(self, g: gs.Graph, s: _Stream, shape: list[int]) -> gs.Tensor:
        """A stream's values in their storage type, ``shape``d (a -1 in it takes the
        padding along: the caller slices or splits it off)."""
        if s.direct:
            return self._const(g, s.words.reshape(shape))
        dtype = s.words.dtype
        bits = dtype.itemsize * 8
        left = np.array([bits - s.width * (j + 1) for j in range(s.per_word)], dtype).reshape(-1, 1)
        x = self._node(g, "BitShift", [self._const(g, s.words), self._const(g, left, share=True)],
                       direction="LEFT")
        x = self._node(g, "BitShift", [x, self._const(g, np.array(bits - s.width, dtype), share=True)],
                       direction="RIGHT")
        return self._node(g, "Reshape", [x, self._const(g, np.array(shape, np.int64), share=True)])

    def _unpack(self, g: gs.Graph, s: _Stream, wide: bool) -> gs.Tensor:
        """A stream's values, 1-D, as int32 (int64 when ``wide``: positions past 2**31)."""
        x = self._words(g, s, [-1])
        if s.length != s.count:
            x = self._node(g, "Slice", [x, self._const(g, np.zeros(1, np.int64), share=True),
                                        self._const(g, np.array([s.count], np.int64))])
        return self._node(g, "Cast", [x], to=onnx.TensorProto.INT64 if wide else onnx.TensorProto.INT32)

    def _split(self, g: gs.Graph, x: gs.Tensor, sizes: list[int], total: int) -> list[gs.Tensor]:
        """``x`` (1-D, ``total`` long) cut into parts of ``sizes``; a remainder (padding)
        becomes one more output that nothing reads."""
        sizes = [int(v) for v in sizes]
        if total > sum(sizes):
            sizes.append(total - sum(sizes))
        if len(sizes) == 1:
            return [x]
        if self.opset >= 13:
            parts = self._node(g, "Split", [x, self._const(g, np.array(sizes, np.int64))], n_out=len(sizes))
        else:
            parts = self._node(g, "Split", [x], n_out=len(sizes), split=sizes)
        return parts

    def _indices(self, g: gs.Graph, s: _Stream, shape: list[int]) -> gs.Tensor:
        """A codebook-index stream as uint8 (the narrowest type the rest folds), with
        the padding still at the end when ``shape`` has a -1."""
        x = self._words(g, s, shape)
        if s.words.dtype != np.uint8:
            x = self._node(g, "Cast", [x], to=onnx.TensorProto.UINT8)
        return x

    def _lookups(self, g: gs.Graph, buffer: gs.Tensor, length: int,
                 layers: list[tuple[WeightSite, Plan]]) -> list[gs.Tensor]:
        """Each layer's weight from the block's uint8 index ``buffer`` (``length`` long):
        split it by layer, shape each part like its weight, cast, and look the codebook up
        — the Gather output is the weight itself."""
        parts = self._split(g, buffer, [p.value.size for _, p in layers], length)
        outs = []
        for part, (_, p) in zip(parts, layers):
            part = self._node(g, "Reshape", [part, self._const(g, np.array(p.value.shape, np.int64), share=True)])
            idx = self._node(g, "Cast", [part], to=onnx.TensorProto.INT32)
            outs.append(self._node(g, "Gather", [self._const(g, p.codebook), idx]))
        return outs

    def _block(self, g: gs.Graph, kind: str, width: int, layers: list[tuple[WeightSite, Plan]]) -> list[gs.Tensor]:
        """Emit one block holding ``layers``; returns each layer's output tensor."""
        sizes = [p.value.size for _, p in layers]
        starts = np.cumsum([0] + sizes)[:-1]
        total = int(sum(sizes))
        dtype = layers[0][1].value.dtype
        if kind == "dense-idx":
            local = np.concatenate([p.lookup for _, p in layers])
            if self.opset < _MIN_OPSET_PACKED:
                stream = _Stream(total, 8, local.astype(np.uint8), True)
            else:
                stream = _pack(local, width)
            if len(layers) == 1 and stream.length == total:
                idx = self._node(g, "Cast", [self._words(g, stream, list(layers[0][1].value.shape))],
                                 to=onnx.TensorProto.INT32)
                return [self._node(g, "Gather", [self._const(g, layers[0][1].codebook), idx])]
            return self._lookups(g, self._indices(g, stream, [-1]), stream.length, layers)
        positions = np.concatenate([start + p.nonzero() for start, (_, p) in zip(starts, layers)])
        value_bits = width if kind == "sparse-idx" else dtype.itemsize * 8
        gap_width, _ = _best_gap_width(positions, value_bits)
        pos, gaps = _gap_entries(positions, gap_width)
        wide = total >= 2**31
        at = self._unpack(g, _pack(gaps, gap_width), wide)
        at = self._node(g, "CumSum", [at, self._const(g, np.array(0, np.int64 if wide else np.int32), share=True)])
        size = self._const(g, np.array([total], np.int64), share=True)
        if kind == "sparse-idx":
            # Scatter the entries' codebook indices into a uint8 index buffer (zeros have
            # index 0), then look up as for dense-idx: every full-size intermediate but the
            # last two is one byte per weight.
            stream = _pack(np.concatenate([p.lookup for _, p in layers])[pos], width)
            values = self._indices(g, stream, [-1])
            if stream.length != stream.count:
                values = self._node(g, "Slice", [values, self._const(g, np.zeros(1, np.int64), share=True),
                                                 self._const(g, np.array([stream.count], np.int64))])
            zeros = self._node(g, "ConstantOfShape", [size], value=gs.Constant("", np.zeros(1, np.uint8)))
            return self._lookups(g, self._node(g, "ScatterElements", [zeros, at, values]), total, layers)
        values = self._const(g, np.concatenate([p.value.ravel() for _, p in layers])[pos])
        attrs = {} if dtype == np.float32 else {"value": gs.Constant("", np.zeros(1, dtype))}
        flat = self._node(g, "ScatterElements", [self._node(g, "ConstantOfShape", [size], **attrs), at, values])
        return [self._node(g, "Reshape", [part, self._const(g, np.array(p.value.shape, np.int64), share=True)])
                for part, (_, p) in zip(self._split(g, flat, sizes, total), layers)]


# --------------------------------------------------------------------------------------
# The compression report
# --------------------------------------------------------------------------------------


def gzip_size(data: bytes) -> int:
    """Bytes after general-purpose compression (gzip, level 9, no timestamp)."""
    return len(gzip.compress(data, compresslevel=9, mtime=0))


_PASS_THROUGH = ("Reshape", "Split", "Identity", "Squeeze", "Unsqueeze", "Cast")


def _entry_share(t: gs.Tensor, memo: dict) -> float | None:
    """For a layer of a sparse block: its share of the block's stored entries (those whose
    position falls in the layer's part of the scatter's output). None otherwise."""
    x, part = t, None
    while True:
        if isinstance(x, gs.Constant) or len(x.inputs) != 1:
            return None
        node = x.inputs[0]
        if node.op in ("ScatterND", "ScatterElements"):
            break
        if node.op == "Gather" and len(node.inputs) == 2:  # a codebook lookup: follow the indices
            x = node.inputs[1]
            continue
        if node.op not in _PASS_THROUGH:
            return None
        if node.op == "Split":
            part = (node, next(i for i, o in enumerate(node.outputs) if o is x))
        x = node.inputs[0]
    try:
        flat = _evaluate(node.outputs[0], memo)
        lo, hi = 0, flat.size
        if part is not None:
            split, k = part
            sizes = [_evaluate(o, memo).size for o in split.outputs]
            lo = int(sum(sizes[:k]))
            hi = lo + sizes[k]
        pos = _evaluate(node.inputs[1], memo).ravel()
    except _NotDecodable:
        return None
    return float(np.count_nonzero((pos >= lo) & (pos < hi))) / max(pos.size, 1)


def _blocks(sites: list[WeightSite]) -> list[list[WeightSite]]:
    """Compact layers grouped into blocks: layers whose decoders share a node (Constant
    nodes aside: small constants are shared between blocks)."""
    parent = list(range(len(sites)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for i, s in enumerate(sites):
        for n in s.cone:
            if n.op == "Constant":
                continue
            j = owner.setdefault(id(n), i)
            if j != i:
                parent[find(i)] = find(j)
    groups: dict[int, list[WeightSite]] = {}
    for i, s in enumerate(sites):
        groups.setdefault(find(i), []).append(s)
    return list(groups.values())


def _exclusive_leaves(cone: list[gs.Node]) -> list[gs.Tensor]:
    """The constants of a cone that nothing outside it reads."""
    inside = {id(n) for n in cone}
    leaves, seen = [], set()
    for node in cone:
        tensors = node.outputs if node.op == "Constant" else [x for x in node.inputs if isinstance(x, gs.Constant)]
        for x in tensors:
            if id(x) not in seen and all(id(r) in inside for r in x.outputs):
                seen.add(id(x))
                leaves.append(x)
    return leaves


def _raw(t: gs.Tensor) -> bytes:
    return np.ascontiguousarray(const_value(t, load=False)).tobytes()


def compression_report(model: Model, original: Model | None = None, *, ops: Sequence[str] = WEIGHT_OPS,
                       names: Sequence[str] | None = None) -> dict:
    """Per layer and in total: parameters, non-zeros, storage form, bits per weight,
    bytes stored, bytes after gzip and the ratio to the dense original; and the whole
    file's bytes, plain and gzipped, before (``original``) and after.

    A layer stored in a block is given its share of the block's bytes (plain and
    gzipped): by stored entries in sparse blocks, by elements in the others. The totals
    count each block once. ``names`` restricts the rows to those weights (and the totals
    to their blocks).
    """
    memo: dict[int, np.ndarray] = {}
    sites, _ = find_weights(model, ops, memo)
    wanted = None if names is None else set(names)
    figures: dict[int, tuple[int, int]] = {}
    total_bytes = total_gzip = 0
    compact = [s for s in sites if s.storage != "dense" and s.cone]
    for block in _blocks(compact):
        if wanted is not None and not any(s.name in wanted for s in block):
            continue
        cone: list[gs.Node] = []
        seen: set[int] = set()
        for s in block:
            for n in s.cone:
                if id(n) not in seen:
                    seen.add(id(n))
                    cone.append(n)
        leaves = _exclusive_leaves(cone)
        raw = b"".join(_raw(x) for x in leaves)
        nbytes = sum(tensor_nbytes(x) if isinstance(x, gs.Constant) else len(_raw(x)) for x in leaves)
        gz = gzip_size(raw)
        total_bytes += nbytes
        total_gzip += gz
        elements = sum(s.size for s in block)
        for s in block:
            share = _entry_share(s.tensor, memo)
            share = s.size / elements if share is None else share
            figures[id(s.tensor)] = (int(round(nbytes * share)), int(round(gz * share)))
    rows = []
    for s in sites:
        if wanted is not None and s.name not in wanted:
            continue
        if id(s.tensor) in figures:
            own, gz = figures[id(s.tensor)]
        else:
            raw = _raw(s.tensor) if s.storage == "dense" else b""
            own, gz = len(raw), gzip_size(raw) if raw else 0
            total_bytes += own
            total_gzip += gz
        params = s.size
        dense = params * s.value.dtype.itemsize
        rows.append({
            "layer": s.name,
            "op": "/".join(s.ops),
            "shape": list(s.value.shape),
            "params": params,
            "nonzeros": int(np.count_nonzero(s.value)),
            "storage": s.storage,
            "bits_per_weight": round(8.0 * own / params, 3) if params else 0.0,
            "bytes": own,
            "gzip_bytes": gz,
            "dense_bytes": dense,
            "ratio": round(dense / own, 3) if own else None,
        })
    params = sum(r["params"] for r in rows)
    dense = sum(r["dense_bytes"] for r in rows)
    total = {
        "layers": len(rows),
        "params": params,
        "nonzeros": sum(r["nonzeros"] for r in rows),
        "bits_per_weight": round(8.0 * total_bytes / params, 3) if params else 0.0,
        "bytes": total_bytes,
        "gzip_bytes": total_gzip,
        "dense_bytes": dense,
        "ratio": round(dense / total_bytes, 3) if total_bytes else None,
    }
    total.update(_file_figures(model, original))
    return {"layers": rows, "total": total}


def _file_figures(model: Model, original: Model | None) -> dict:
    out: dict = {}
    if model.has_external_data() or (original is not None and original.has_external_data()):
        return out
    data = model.to_bytes()
    out["file_bytes"] = len(data)
    out["file_gzip_bytes"] = gzip_size(data)
    if original is not None:
        ref = original.to_bytes()
        out["original_file_bytes"] = len(ref)
        out["original_file_gzip_bytes"] = gzip_size(ref)
        out["file_ratio"] = round(len(ref) / len(data), 3)
        out["file_gzip_ratio"] = round(len(ref) / out["file_gzip_bytes"], 3)
    return out


def format_report(report: dict, *, limit: int | None = None) -> str:
    """A compression report (or the stats of a compression pass) as a plain-text table:
    one row per layer, the total, and the file figures."""
    cols = ["layer", "storage", "params", "nonzeros", "bits_per_weight", "bytes", "gzip_bytes", "ratio"]
    head = ["layer", "storage", "params", "non-zeros", "bits/weight", "bytes", "gzip bytes", "ratio"]
    layers = report.get("layers", [])
    rows = layers if limit is None else layers[:limit]
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    if limit is not None and len(layers) > limit:
        cells.append([f"... {len(layers) - limit} more", "", "", "", "", "", "", ""])
    t = report["total"]
    cells.append(["total", ""] + [_cell(t.get(c)) for c in cols[2:]])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]

    def line(values):
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    lines = [line(head)] + [line(c) for c in cells]
    if "file_bytes" in t:
        text = f"file: {t['file_bytes']:,} bytes ({t['file_gzip_bytes']:,} gzipped)"
        if "original_file_bytes" in t:
            text += (f"; original {t['original_file_bytes']:,} ({t['original_file_gzip_bytes']:,} gzipped): "
                     f"{t['file_ratio']:.2f}x smaller, {t['file_gzip_ratio']:.2f}x once gzipped")
        lines.append(text)
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def model_opset(model: Model) -> int:
    """The model's version of the standard ONNX domain."""
    return int(model.opset_imports.get("", model.graph.opset or 1))
