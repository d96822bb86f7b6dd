"""fold-constants: evaluate what does not depend on the model's inputs.

A node whose inputs are all constant computes the same tensor on every run: it is
evaluated once here and replaced by that tensor. The same holds for shape arithmetic over
static dimensions (``Shape(x)``, and a ``Gather``/``Slice`` picking only static dimensions
out of it) — a dynamic dimension is never frozen: a ``Reshape`` target assembled from the
data's own dimensions becomes a constant with 0 (copy) entries. Constant nodes become
initializers. Shapes come from :class:`onnxopt.tensorinfo.ShapeIndex`.

The folded values are the ones onnxruntime computes (the model is validated and served
on onnxruntime): nodes that only move, select, cast or do integer arithmetic on values are
evaluated with numpy (:mod:`onnxopt.node_eval`), which gives the same values to the bit
without importing the runtime; every other node runs on onnxruntime, one single-node
session per node signature, reused across nodes.

Never folded: other domains than the standard one, non-deterministic ops,
QuantizeLinear/DequantizeLinear (a quantized weight folded back to float undoes the
quantization), If/Loop/Scan (their bodies are folded instead), results that are not plain
numeric tensors, and results that would inflate the file: above ``size_limit`` bytes unless
no larger than the constant inputs they replace, or adding more than ``grow_limit`` bytes
beyond the constant inputs only they read — unless the group of folds a result joins (slices
of a weight joined again into one tensor) adds no more than that as a whole. Two kinds of
shape values stay computed because onnxruntime checks a constant more strictly than a
computed value: those reaching an If condition, and those on the way to a Range operand
that is not a scalar. Each skipped node is counted by reason in the stats.

Initializers listed as graph inputs (IR < 4) are not constant: a user may feed them; IR < 4
models keep folded values as Constant nodes. A folded graph output keeps its name. Nodes and
initializers that only fed folded nodes are removed.
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import cached_property

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from onnxopt.framework import Opt, Pass, PassContext, PassResult, register
from onnxopt.graph import NameAllocator, const_value, constant_node_value, replace_uses
from onnxopt.model import Model, RawAttribute, iter_graphs, node_subgraphs, tensor_nbytes
from onnxopt.node_eval import NodeEvaluator, NotEvaluable
from onnxopt.rewrite import drop_nodes, gc_paused, prune_unused
from onnxopt.tensorinfo import ShapeIndex
from onnxopt.weights.decode import COMPACT, decoder_cone, storage_of
from onnxopt.weights.sites import WEIGHT_OPS

__all__ = ["FoldConstants"]

log = logging.getLogger(__name__)

_STANDARD = (None, "", "ai.onnx")
_NONDETERMINISTIC = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
    "Bernoulli", "Dropout",
})
_QUANTIZATION = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
#: Ops whose result can be much larger than their inputs: evaluated only when the size
#: of the result is known beforehand.
_EXPANDING = frozenset({
    "ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot",
    "EyeLike", "MatMul", "Gemm", "Einsum", "ConvTranspose", "CenterCropPad", "Col2Im",
})
#: Constant-node attributes whose value is read as an array (not sparse_value).
_DECODABLE = frozenset({"value", "value_float", "value_floats", "value_int", "value_ints",
                        "value_string", "value_strings"})
_INT_TYPES = frozenset(np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64,
                                             np.uint8, np.uint16, np.uint32, np.uint64))


@register
class FoldConstants(Pass):
    """Replace nodes whose outputs do not depend on the graph inputs by their values.

    Edge cases: see the module docstring — dynamic dimensions stay dynamic, custom
    domains, random ops and Q/DQ are left alone, large results are capped, IR < 4 keeps
    folded values as Constant nodes, graph outputs keep their names.
    """

    name = "fold-constants"
    summary = "evaluate constant subgraphs; a size cap keeps folding from inflating the file"
    exact = True
    options = {
        "size_limit": Opt(int, 1 << 20, "largest folded tensor in bytes, unless no larger than the "
                          "constant inputs it replaces", minimum=0),
        "grow_limit": Opt(int, 4096, "most bytes one folded node, or one group of linked folds, may "
                          "add to the file: what it writes minus the constant inputs only it reads "
                          "(a slice of a shared weight copies bytes the weight still holds)",
                          minimum=0),
        "shapes": Opt(bool, True, "fold shape arithmetic where inferred dimensions are static"),
        "constant_nodes": Opt(bool, True, "turn Constant nodes into initializers (IR >= 4)"),
        "keep_compact": Opt(bool, True, "leave the compact weight storage of prune-magnitude and "
                            "share-weights unexpanded (the materialize pass expands it)"),
    }

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        with gc_paused():  # see onnxopt.rewrite.gc_paused: keeps large graphs linear
            return self._run(model, ctx)

    def _run(self, model: Model, ctx: PassContext) -> PassResult:
        graphs = list(iter_graphs(model.graph))  # walked once: on large graphs every walk counts
        plan = _FoldPlanner(model, graphs, self.opts.size_limit, self.opts.shapes)
        plan.grow_limit = self.opts.grow_limit
        if self.opts.keep_compact:
            plan.protected = _compact_storage_nodes(graphs)
        plan.decide()
        stats = Counter({"folded": 0, "shape_folded": 0, "reshape_targets": 0, "constant_nodes": 0,
                         "nodes_removed": 0, "constants_created": 0, "bytes_created": 0,
                         "initializers_released": 0})
        stats.update(plan.skipped)
        _Rewriter(plan, stats).apply(self.opts.constant_nodes)
        modified = bool(stats["nodes_removed"] or stats["reshape_targets"] or stats["constant_nodes"]
                        or stats["folded"])
        return PassResult(modified=modified, stats=dict(stats))


# --------------------------------------------------------------------------------------
# Match: decide what folds, computing values without touching the graph
# --------------------------------------------------------------------------------------


class _Sym:
    """A dimension known only by where it comes from: dimension ``axis`` of ``tensor``."""

    __slots__ = ("tensor", "axis")

    def __init__(self, tensor: gs.Tensor, axis: int):
        self.tensor, self.axis = tensor, axis


class _Partial:
    """A 1-D (or 0-d) integer tensor of dimensions, some known (int), some symbolic
    (:class:`_Sym`), some unknown (None)."""

    def __init__(self, entries: np.ndarray, dtype: np.dtype):
        self.entries = entries  # object array
        self.dtype = dtype

    @property
    def known(self) -> bool:
        return all(isinstance(e, int) for e in self.entries.flat)

    def value(self) -> np.ndarray:
        return np.array([int(e) for e in self.entries.flat], dtype=self.dtype).reshape(self.entries.shape)


class _FoldPlanner:
    def __init__(self, model: Model, graphs: list[gs.Graph], size_limit: int, use_shapes: bool):
        self.model = model
        self.graphs = graphs
        self.size_limit = size_limit
        self.use_shapes = use_shapes
        self.values: dict[int, np.ndarray] = {}  # id(tensor) -> value of folded outputs
        self.partial: dict[int, _Partial] = {}
        self.folded: dict[int, gs.Node] = {}  # id(node) -> node, in decision order
        self.shape_folded: set[int] = set()
        self.reshape_targets: list[tuple[gs.Node, np.ndarray]] = []
        self.skipped: Counter = Counter()
        self.outputs = {id(t) for g in graphs for t in g.outputs}
        self.evaluator = NodeEvaluator(model.opset_imports, model.ir_version)
        self.cone = _condition_cone(graphs) if use_shapes else set()
        self.protected: set[int] = set()  # nodes that expand compact weight storage
        self.grow_limit: int | None = None  # most bytes one fold may add (None: no bound)
        self.growing: set[int] = set()  # folds refused by the grow rule alone, pending their group

    @cached_property
    def range_cone(self) -> set[int]:
        if not any(n.op == "Range" for g in self.graphs for n in g.nodes):
            return set()
        return _range_cone(self.graphs, self.index)

    @cached_property
    def index(self) -> ShapeIndex:
        """Built on first use: a graph with nothing to fold (the last round of a fixed
        point) needs no shape inference."""
        return ShapeIndex(self.model)

    # ---- queries ---------------------------------------------------------------------

    def known(self, t: gs.Tensor) -> bool:
        """Whether ``t``'s value is known, without loading it."""
        if not t.name:
            return True  # an omitted optional input
        if id(t) in self.values:
            return True
        if isinstance(t, gs.Constant):
            return vars(t).get("input_value_info") is None
        if len(t.inputs) == 1:
            p = t.inputs[0]
            return (p.op == "Constant" and p.domain in _STANDARD and not p.inputs
                    and any(k in _DECODABLE and not isinstance(v, RawAttribute) for k, v in p.attrs.items()))
        return False

    def value(self, t: gs.Tensor) -> np.ndarray | None:
        found = self.values.get(id(t))
        if found is not None:
            return found
        if isinstance(t, gs.Constant):
            return const_value(t, load=False)  # not cached on the tensor: it may stay on disk
        return constant_node_value(t.inputs[0])

    def nbytes(self, t: gs.Tensor) -> int:
        if id(t) in self.values:
            return int(self.values[id(t)].nbytes)
        if isinstance(t, gs.Constant):
            return tensor_nbytes(t)
        held = t.inputs[0].attrs.get("value") if t.inputs else None
        return tensor_nbytes(held) if isinstance(held, gs.Constant) else 8

    def needed(self, node: gs.Node) -> bool:
        return any(t.outputs or id(t) in self.outputs for t in node.outputs)

    # ---- the walk --------------------------------------------------------------------

    def decide(self) -> None:
        for g in self.graphs:
            for node in g.nodes:
                if node.op == "Constant" and node.domain in _STANDARD:
                    continue
                if self.use_shapes and node.domain in _STANDARD and self._shape_arith(node):
                    continue
                if all(self.known(t) for t in node.inputs) and node.inputs and self.needed(node):
                    self._try_fold(node)
        if self.growing:
            self._settle_growth()

    def skip(self, node: gs.Node, reason: str) -> None:
        self.skipped[f"skipped_{reason}"] += 1
        log.debug("fold-constants: not folding %s (%s): %s", node.name or "?", node.op, reason)

    def _try_fold(self, node: gs.Node) -> None:
        if id(node) in self.protected:
            return self.skip(node, "compact_storage")
        if node.domain not in _STANDARD:
            return self.skip(node, "custom_domain")
        if node.op in _NONDETERMINISTIC:
            return self.skip(node, "nondeterministic")
        if node.op in _QUANTIZATION:
            return self.skip(node, "quantization")
        if node_subgraphs(node):
            return self.skip(node, "control_flow")
        if not any(o.name for o in node.outputs):
            return None
        replaced = sum(self.nbytes(t) for t in node.inputs
                       if t.name and len(t.outputs) == 1 and id(t) not in self.outputs)
        cap = max(self.size_limit, replaced)
        grows = cap if self.grow_limit is None else min(cap, replaced + self.grow_limit)
        estimate = self._estimate(node)
        if estimate is None and node.op in _EXPANDING:
            return self.skip(node, "unknown_size")
        if estimate is not None and estimate > cap:
            return self.skip(node, "size_limit")
        inputs = [self.value(t) if t.name else None for t in node.inputs]
        if any(v is None and t.name for v, t in zip(inputs, node.inputs)):
            return self.skip(node, "unsupported_type")  # a value gs cannot give as an array
        if any(v is not None and not _plain(v.dtype) for v in inputs):
            return self.skip(node, "unsupported_type")
        try:
            results = self.evaluator.run(node, inputs)
        except NotEvaluable as exc:
            log.debug("fold-constants: cannot evaluate %s (%s): %s", node.name or "?", node.op, exc)
            return self.skip(node, "eval_failed")
        if any(r is not None and not _plain(r.dtype) for r in results):
            return self.skip(node, "unsupported_type")
        made = sum(r.nbytes for r in results if r is not None)
        if made > cap:
            return self.skip(node, "size_limit")
        if made > grows:
            self.growing.add(id(node))  # kept only if its group of folds does not grow the file
        self._record(node, results)
        return None

    def _settle_growth(self) -> None:
        """Undo the groups of folds (folded nodes linked by the values they pass on) that
        hold a fold refused by the grow rule and add more than ``grow_limit`` bytes: what
        the group writes (values read by a node left in place, or graph outputs) less the
        constants only the group reads. The folds of such a group that depend on a refused
        one go with it (their inputs would not exist)."""
        groups: dict[int, list[gs.Node]] = {}
        root: dict[int, int] = {}
        for node in self.folded.values():  # decision order: producers before consumers
            links = {root[id(p)] for t in node.inputs for p in t.inputs if id(p) in root}
            key = min(links) if links else id(node)
            for other in links - {key}:
                for n in groups.pop(other):
                    root[id(n)] = key
                    groups.setdefault(key, []).append(n)
            root[id(node)] = key
            groups.setdefault(key, []).append(node)
        for members in groups.values():
            inside = {id(n) for n in members}
            if not inside & self.growing:
                continue
            written = sum(int(self.values[id(t)].nbytes) for n in members for t in n.outputs
                          if id(t) in self.values and (id(t) in self.outputs or
                                                       any(id(c) not in inside for c in t.outputs)))
            read = {id(t): t for n in members for t in n.inputs if t.name and id(t) not in self.values}
            freed = sum(self.nbytes(t) for t in read.values() if id(t) not in self.outputs
                        and all(id(c) in inside for c in t.outputs))
            if written - freed <= self.grow_limit:
                continue
            undone = set(self.growing & inside)
            for n in members:
                if id(n) in undone or any(id(p) in undone for t in n.inputs for p in t.inputs):
                    undone.add(id(n))
                    self.skip(n, "size_limit")
                    del self.folded[id(n)]
                    self.shape_folded.discard(id(n))
                    for t in n.outputs:
                        self.values.pop(id(t), None)

    def _record(self, node: gs.Node, results: list[np.ndarray | None], shape: bool = False) -> None:
        for t, r in zip(node.outputs, results):
            if t.name and r is not None:
                self.values[id(t)] = r
        self.folded[id(node)] = node
        if shape:
            self.shape_folded.add(id(node))

    def _estimate(self, node: gs.Node) -> int | None:
        """Bytes of the node's outputs if known before evaluating it."""
        total = 0
        for t in node.outputs:
            if not t.name:
                continue
            shape, dtype = self.index.static(t), self.index.dtype(t)
            if shape is None or dtype is None:
                return self._estimate_from_values(node)
            total += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return total

    def _estimate_from_values(self, node: gs.Node) -> int | None:
        try:
            op, ins = node.op, node.inputs
            if op == "ConstantOfShape":
                held = node.attrs.get("value")
                item = np.dtype(held.dtype).itemsize if isinstance(held, gs.Constant) else 4
                return int(np.prod(self.value(ins[0]), dtype=np.int64)) * item
            if op == "Expand":
                x = self.value(ins[0])
                return int(np.prod(np.broadcast_shapes(x.shape, tuple(self.value(ins[1]))))) * x.itemsize
            if op == "Tile":
                x = self.value(ins[0])
                return int(x.size * np.prod(self.value(ins[1]), dtype=np.int64)) * x.itemsize
            if op == "Range":
                start, limit, delta = (self.value(t) for t in ins[:3])
                count = max(int(np.ceil((limit - start) / delta)), 0)
                return count * np.asarray(start).itemsize
        except (ValueError, TypeError, IndexError, ZeroDivisionError, AttributeError):
            return None
        return None

    # ---- shapes ----------------------------------------------------------------------

    def _shape_arith(self, node: gs.Node) -> bool:
        """Fold or track a node of shape arithmetic. True when handled here."""
        op = node.op
        if op == "Shape":
            return self._shape(node)
        if op == "Size":
            x = node.inputs[0]
            if self.known(x):
                return False
            shape = self.index.static(x)
            if shape is not None and id(node) in self.cone:
                self.skip(node, "if_condition")
                return True
            if shape is not None and id(node) in self.range_cone:
                self.skip(node, "range_operand_not_scalar")
                return True
            if shape is not None and self.needed(node):
                self._record(node, [np.array(int(np.prod(shape, dtype=np.int64)), np.int64)], shape=True)
                return True
            return False
        if op == "Reshape" and len(node.inputs) == 2:
            self._reshape_target(node)
            return False
        scan = node.inputs if op == "Concat" else node.inputs[:1]
        data = next((self.partial[id(t)] for t in scan if id(t) in self.partial), None)
        if data is None:
            return False
        try:
            result = self._partial_op(node, data)
        except (ValueError, TypeError, IndexError):
            result = None
        if result is None:
            return False
        return self._settle(node, result)

    def _settle(self, node: gs.Node, result: _Partial) -> bool:
        if result.known:
            if not self.needed(node):
                return True
            if id(node) in self.cone:
                self.skip(node, "if_condition")
                return True
            if id(node) in self.range_cone:
                self.skip(node, "range_operand_not_scalar")
                return True
            self._record(node, [result.value()], shape=True)
        else:
            self.partial[id(node.outputs[0])] = result
        return True

    def _shape(self, node: gs.Node) -> bool:
        x = node.inputs[0]
        if self.known(x):
            return False  # evaluated like any constant node
        dims = self.index.dims(x)
        if dims is None:
            return False
        entries = [d if d is not None else _Sym(x, i) for i, d in enumerate(dims)]
        rank = len(entries)
        start = _axis_clip(int(node.attrs.get("start", 0)), rank)
        end = _axis_clip(int(node.attrs.get("end", rank)), rank)
        picked = np.empty(max(end - start, 0), dtype=object)
        picked[:] = entries[start:end] if end > start else []
        return self._settle(node, _Partial(picked, np.dtype(np.int64)))

    def _partial_op(self, node: gs.Node, data: _Partial) -> _Partial | None:
        op, ins = node.op, node.inputs
        if op == "Identity":
            return data
        if op == "Cast":
            to = np.dtype(helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
            return _Partial(data.entries, to) if to in _INT_TYPES else None
        if op == "Gather" and len(ins) == 2 and self.known(ins[1]) and data.entries.ndim == 1:
            if int(node.attrs.get("axis", 0)) not in (0, -1):
                return None
            idx = np.asarray(self.value(ins[1])).astype(np.int64)
            n = data.entries.shape[0]
            if np.any((idx < -n) | (idx >= n)):
                return None
            picked = data.entries[np.where(idx < 0, idx + n, idx)]
            if not isinstance(picked, np.ndarray):  # a scalar index picks the element itself
                scalar = np.empty((), dtype=object)
                scalar[()] = picked
                picked = scalar
            return _Partial(picked, data.dtype)
        if op == "Slice" and data.entries.ndim == 1:
            return self._slice(node, data)
        if op == "Concat" and int(node.attrs.get("axis", 0)) in (0, -1):
            parts = []
            for t in ins:
                if id(t) in self.partial:
                    p = self.partial[id(t)]
                elif self.known(t):
                    v = np.asarray(self.value(t))
                    if v.ndim != 1 or v.dtype != data.dtype:
                        return None
                    p = _Partial(_objects(v), data.dtype)
                else:
                    return None
                if p.entries.ndim != 1 or p.dtype != data.dtype:
                    return None
                parts.append(p.entries)
            return _Partial(np.concatenate(parts), data.dtype)
        if op in ("Unsqueeze", "Squeeze"):
            axes = node.attrs.get("axes")
            if axes is None and len(ins) > 1 and ins[1].name:
                if not self.known(ins[1]):
                    return None
                axes = np.asarray(self.value(ins[1])).tolist()
            axes = [int(a) for a in (axes if axes is not None else [])]
            e = data.entries
            if op == "Unsqueeze" and e.ndim == 0 and axes in ([0], [-1]):
                return _Partial(e.reshape(1), data.dtype)
            if op == "Squeeze" and e.ndim == 1 and e.shape[0] == 1 and axes in ([], [0], [-1]):
                return _Partial(e.reshape(()), data.dtype)
        return None

    def _slice(self, node: gs.Node, data: _Partial) -> _Partial | None:
        ins = node.inputs
        if len(ins) == 1:  # opset < 10: attributes
            starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
            axes, steps = node.attrs.get("axes", [0]), [1]
        else:
            if not all(self.known(t) for t in ins[1:]):
                return None
            vals = [np.asarray(self.value(t)).tolist() if t.name else None for t in ins[1:]]
            vals += [None] * (4 - len(vals))
            starts, ends, axes, steps = vals
            axes = axes if axes is not None else [0]
            steps = steps if steps is not None else [1]
        if starts is None or ends is None or len(starts) != 1 or len(axes) != 1 or int(axes[0]) not in (0, -1):
            return None
        n = data.entries.shape[0]
        picked = _slice_indices(n, int(starts[0]), int(ends[0]), int(steps[0]))
        return None if picked is None else _Partial(data.entries[picked], data.dtype)

    def _reshape_target(self, node: gs.Node) -> None:
        target = self.partial.get(id(node.inputs[1]))
        if target is None or target.entries.ndim != 1 or int(node.attrs.get("allowzero", 0)) != 0:
            return
        data = node.inputs[0]
        out = []
        for i, e in enumerate(target.entries):
            if isinstance(e, int):
                out.append(e)
            elif isinstance(e, _Sym) and e.tensor is data and e.axis == i:
                out.append(0)  # copy dimension i of the data: stays dynamic
            else:
                return
        self.reshape_targets.append((node, np.array(out, dtype=np.int64)))


def _compact_storage_nodes(graphs: list[gs.Graph]) -> set[int]:
    """ids of the nodes that expand a layer's compact weight storage (sparse positions,
    codebook indices) at session creation. Folding them would write the dense weights
    back into the file and undo the compression that produced them."""
    protected: set[int] = set()
    for g in graphs:
        for node in g.nodes:
            if node.op not in WEIGHT_OPS or node.domain not in _STANDARD:
                continue
            for t in node.inputs[1:]:
                if not t.name or isinstance(t, gs.Constant) or not t.inputs:
                    continue
                if t.inputs[0].op == "Constant":
                    continue
                cone = decoder_cone(t)
                if cone and storage_of(t) in COMPACT:
                    protected.update(id(n) for n in cone)
    return protected


def _condition_cone(graphs: list[gs.Graph]) -> set[int]:
    """ids of the nodes that an If's condition depends on.

    onnxruntime inlines an If whose condition it can compute at load time, and then
    checks the taken branch more strictly than before: exported models that run today (a
    Range fed a 1-element vector inside a branch) would stop loading. Folding constant
    nodes changes nothing there (onnxruntime folds them too), but a value that only
    shape inference makes constant must not reach a condition."""
    return _cone([n.inputs[0] for g in graphs for n in g.nodes if n.op == "If" and n.inputs])


def _range_cone(graphs: list[gs.Graph], index: ShapeIndex) -> set[int]:
    """ids of the nodes that a Range operand of rank other than 0 depends on. Range takes
    scalars; onnxruntime accepts a one-element vector computed from a shape, but refuses to
    load a stored one where its shape inference can read it (e.g. inside a branch)."""
    return _cone([t for g in graphs for n in g.nodes if n.op == "Range"
                  for t in n.inputs[:3] if t.name and index.rank(t) != 0])


def _cone(starts: list[gs.Tensor]) -> set[int]:
    """ids of the nodes that the tensors ``starts`` depend on."""
    cone: set[int] = set()
    stack = list(starts)
    while stack:
        t = stack.pop()
        for p in t.inputs:
            if id(p) not in cone:
                cone.add(id(p))
                stack.extend(p.inputs)
    return cone


def _objects(v: np.ndarray) -> np.ndarray:
    out = np.empty(v.shape, dtype=object)
    out.flat[:] = [int(x) for x in v.flat]
    return out


def _axis_clip(a: int, rank: int) -> int:
    if a < 0:
        a += rank
    return min(max(a, 0), rank)


def _slice_indices(n: int, start: int, end: int, step: int) -> list[int] | None:
    """Indices picked by ONNX Slice on one axis of length ``n``."""
    if step == 0:
        return None
    if start < 0:
        start += n
    if end < 0:
        end += n
    if step > 0:
        start, end = min(max(start, 0), n), min(max(end, 0), n)
    else:
        start, end = min(max(start, -1), n - 1), min(max(end, -1), n - 1)
    return list(range(start, end, step))


def _plain(dtype) -> bool:
    """Whether values of this dtype can be folded: numpy's own numeric and bool types
    (gs gives ONNX enum ints for types numpy lacks, such as bfloat16)."""
    if isinstance(dtype, int):
        return False
    return np.dtype(dtype).kind in "biuf"


# --------------------------------------------------------------------------------------
# Rewrite: apply the plan
# --------------------------------------------------------------------------------------


class _Rewriter:
    def __init__(self, plan: _FoldPlanner, stats: Counter):
        self.plan = plan
        self.model = plan.model
        self.graphs = plan.graphs
        self.stats = stats
        self.as_nodes = self.model.ir_version < 4  # IR < 4: every initializer must be a graph input
        self._names: NameAllocator | None = None
        self.dead: set[int] = set()
        self.replacement: dict[int, list[gs.Node]] = {}  # id(node) -> Constant nodes put before it
        self.touched: list[gs.Tensor] = []  # tensors a rewrite stopped reading

    @property
    def names(self) -> NameAllocator:
        if self._names is None:
            self._names = NameAllocator(self.model)
        return self._names

    def apply(self, constant_nodes: bool) -> None:
        plan = self.plan
        for node in plan.folded.values():
            self._fold(node)
        for node, target in plan.reshape_targets:
            old = node.inputs[1]
            # Hints are unique (tensor names): NameAllocator probes suffixes one by one.
            node.inputs[1] = self._constant(self.names(f"{node.outputs[0].name}_shape"), target, node)
            self.touched.append(old)
            self.stats["reshape_targets"] += 1
        if constant_nodes and not self.as_nodes:
            self._extract_constant_nodes()
        self._rebuild()

    def _fold(self, node: gs.Node) -> None:
        plan = self.plan
        self.stats["folded"] += 1
        self.stats["shape_folded"] += id(node) in plan.shape_folded
        self.dead.add(id(node))
        keep = []
        for t in node.outputs:
            value = plan.values.get(id(t))
            if value is None:
                continue
            users = [c for c in t.outputs if id(c) not in plan.folded]
            is_output = id(t) in plan.outputs
            if not users and not is_output:
                continue
            self.stats["constants_created"] += 1
            self.stats["bytes_created"] += int(value.nbytes)
            if is_output or self.as_nodes:
                keep.append(t)  # stays a named tensor: produced by a Constant node
            else:
                replace_uses(t, gs.Constant(t.name, values=value))
        if keep:
            node.outputs.clear()
            made = []
            for t in keep:
                c = gs.Constant(self.names(f"{t.name}_value"), values=plan.values[id(t)])
                made.append(gs.Node("Constant", name=self.names(f"{t.name}_const"), attrs={"value": c},
                                    outputs=[t]))
            self.replacement[id(node)] = made

    def _constant(self, name: str, value: np.ndarray, before: gs.Node) -> gs.Tensor:
        if not self.as_nodes:
            return gs.Constant(name, values=value)
        out = gs.Variable(self.names(f"{name}_out"), dtype=value.dtype, shape=list(value.shape))
        made = gs.Node("Constant", name=name, attrs={"value": gs.Constant(name, values=value)}, outputs=[out])
        self.replacement.setdefault(id(before), []).append(made)
        return out

    def _extract_constant_nodes(self) -> None:
        outputs = self.plan.outputs
        for g in self.graphs:
            for node in g.nodes:
                if (node.op != "Constant" or node.domain not in _STANDARD or id(node) in self.dead
                        or node.inputs or len(node.outputs) != 1 or id(node) in self.replacement):
                    continue
                t = node.outputs[0]
                if id(t) in outputs or not any(id(c) not in self.dead for c in t.outputs):
                    continue  # a graph output keeps its name; an unused one is dead-nodes' job
                held = node.attrs.get("value")
                if isinstance(held, gs.Constant):
                    if not _plain(held.dtype):
                        continue
                    const = held  # the node goes away: its tensor becomes the initializer, still lazy
                    const.name = t.name
                else:
                    value = constant_node_value(node)
                    if value is None or not _plain(value.dtype):
                        continue
                    const = gs.Constant(t.name, values=value)
                replace_uses(t, const)
                self.dead.add(id(node))
                self.stats["constant_nodes"] += 1

    def _rebuild(self) -> None:
        before = sum(len(g.nodes) for g in self.graphs)
        if self.replacement:
            for g in self.graphs:
                if any(id(n) in self.replacement for n in g.nodes):
                    kept = []
                    for n in g.nodes:
                        kept.extend(self.replacement.get(id(n), []))
                        kept.append(n)
                    g.nodes = kept
        self.touched.extend(drop_nodes(self.model, self.dead, self.graphs))
        _, released = prune_unused(self.model, self.touched, self.graphs)
        after = sum(len(g.nodes) for g in iter_graphs(self.model.graph))
        self.stats["nodes_removed"] += before - after
        self.stats["initializers_released"] += released
