"""eliminate-noops: remove nodes whose output equals their input.

Exporters leave nodes that compute nothing: Identity, Dropout at inference, a Cast to
the type the tensor already has, a Transpose with the identity permutation, a Reshape
(Flatten, Squeeze, Unsqueeze) to the shape the tensor already has, a Slice/Pad/Expand/
Tile that keeps everything, ``x + 0``, ``x - 0``, ``x * 1``, ``x / 1``, ``x ** 1``, a
Concat/Sum/Max/Min/Mean of one input, and two Casts that go to a wider type and back.
Each is bypassed: its consumers read its input instead.

When is it safe:

* shapes come from :class:`onnxopt.tensorinfo.ShapeIndex` (inference on the graph
  itself, never declarations); a dimension that is dynamic or unknown is never assumed
  to equal anything, except where the op copies it by construction (Reshape's 0);
* ``x + c`` and friends only where the constant is the identity element in every
  position and broadcasting it does not change the shape of ``x`` (a ``[1, C]`` zero
  added to an ``[N]`` tensor makes it ``[N, C]``: kept);
* two Casts only when the middle type holds every value of the first exactly
  (float32 → float64 → float32 yes, float32 → float16 → float32 or int64 → float64 →
  int64 no);
* ``x + 0.0`` turns ``-0.0`` into ``+0.0``; they compare equal, and exporters add zeros
  only as padding of real biases, so it is removed too.

Graph outputs keep their names (:func:`onnxopt.graph.bypass`): where an output cannot
take another tensor's name (the node maps a graph input, a constant or, in a subgraph,
an outer-scope tensor straight to a graph output) the node is kept and counted. Nodes of other domains are never touched. Subgraphs are handled like the
main graph.
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import cached_property

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from onnxopt.framework import Pass, PassContext, PassResult, register
from onnxopt.graph import bypass
from onnxopt.model import Model, iter_graphs
from onnxopt.rewrite import const_value_if_small, drop_nodes, gc_paused, prune_unused
from onnxopt.tensorinfo import ShapeIndex

__all__ = ["EliminateNoops"]

log = logging.getLogger(__name__)

_STANDARD = (None, "", "ai.onnx")
_BIG = 2**62  # Slice ends at or past this take everything, whatever the dimension

# What each type can hold exactly, for Cast round trips.
_EXACT_INTO: dict[str, set[str]] = {
    "bool": {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
             "float16", "float32", "float64"},
    "int8": {"int16", "int32", "int64", "float16", "float32", "float64"},
    "uint8": {"int16", "int32", "int64", "uint16", "uint32", "uint64", "float16", "float32", "float64"},
    "int16": {"int32", "int64", "float32", "float64"},
    "uint16": {"int32", "int64", "uint32", "uint64", "float32", "float64"},
    "int32": {"int64", "float64"},
    "uint32": {"int64", "uint64", "float64"},
    "float16": {"float32", "float64"},
    "float32": {"float64"},
}


@register
class EliminateNoops(Pass):
    """Bypass nodes that return their input unchanged (see the module docstring for the
    list and the conditions). Counts what it removed by op and what it kept by reason."""

    name = "eliminate-noops"
    summary = "Identity, Dropout, same-type Cast, identity Transpose/Reshape/Slice/Pad, x+0, x*1 ..."
    exact = True
    options = {}

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        with gc_paused():  # see onnxopt.rewrite.gc_paused: keeps large graphs linear
            return self._run(model, ctx)

    def _run(self, model: Model, ctx: PassContext) -> PassResult:
        finder = _Finder(model)
        found: list[tuple[gs.Graph, gs.Node, int]] = []  # (graph, node, index of the input it forwards)
        graphs = list(iter_graphs(model.graph))
        for g in graphs:
            for node in g.nodes:
                if node.domain not in _STANDARD or not node.outputs or not node.inputs:
                    continue
                source = finder.noop_source(node)
                if source is not None:
                    found.append((g, node, source))

        removed: Counter = Counter()
        kept: Counter = finder.kept
        dead: set[int] = set()
        for g, node, source in found:
            out = node.outputs[0]
            src = _source_tensor(node, source)
            if src is None:
                kept["rewired"] += 1  # an earlier bypass changed what this node reads
                continue
            if not bypass(g, out, src):
                kept["graph_output"] += 1
                log.debug("eliminate-noops: kept %s (%s): its output is a graph output that %s "
                          "cannot be renamed to", node.name or "?", node.op, src.name)
                continue
            removed[node.op] += 1
            if not any(o.outputs or any(o is t for t in g.outputs) for o in node.outputs if o.name):
                dead.add(id(node))
        read = drop_nodes(model, dead, graphs)
        pruned, released = prune_unused(model, read, graphs)
        stats = {"removed": sum(removed.values()), "nodes_removed": len(dead) + pruned,
                 "initializers_released": released}
        stats.update({f"removed_{op}": n for op, n in sorted(removed.items())})
        stats.update({f"kept_{why}": n for why, n in sorted(kept.items())})
        return PassResult(modified=bool(removed), stats=stats)


def _source_tensor(node: gs.Node, source: int) -> gs.Tensor | None:
    """The tensor a no-op forwards, read at rewrite time (an earlier bypass may have
    rewired the node's input). ``source`` < 0 means the input of the Cast feeding input
    ``-source - 1`` (a Cast round trip)."""
    if source >= 0:
        return node.inputs[source]
    fed = node.inputs[-source - 1]
    if len(fed.inputs) != 1 or fed.inputs[0].op != "Cast":
        return None
    return fed.inputs[0].inputs[0]


class _Finder:
    """Decides, node by node, whether it is a no-op; records why not where it is close."""

    def __init__(self, model: Model):
        self.model = model
        self.opset = model.opset_imports.get("", 1)
        self.kept: Counter = Counter()

    @cached_property
    def index(self) -> ShapeIndex:
        """Built on first use: a graph with only Identity/Dropout-like no-ops (or none,
        the last round of a fixed point) needs no shape inference."""
        return ShapeIndex(self.model)

    def why_not(self, node: gs.Node, reason: str) -> None:
        self.kept[reason] += 1
        log.debug("eliminate-noops: kept %s (%s): %s", node.name or "?", node.op, reason)

    def noop_source(self, node: gs.Node) -> int | None:
        """Index of the input the node returns unchanged, or None."""
        op = node.op
        rule = getattr(self, f"_{op.lower()}", None)
        if rule is None:
            return None
        try:
            return rule(node)
        except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
            self.why_not(node, "not_understood")
            log.debug("eliminate-noops: %s (%s): %s", node.name or "?", op, exc)
            return None

    # ---- helpers ---------------------------------------------------------------------

    def const(self, t: gs.Tensor) -> np.ndarray | None:
        return const_value_if_small(t)

    def single_output(self, node: gs.Node) -> bool:
        return sum(1 for o in node.outputs if o.name) == 1 and bool(node.outputs[0].name)

    def same_shape(self, node: gs.Node) -> bool:
        """Inferred input and output shapes are equal and fully static."""
        a, b = self.index.static(node.inputs[0]), self.index.static(node.outputs[0])
        return a is not None and a == b

    def broadcast_keeps(self, x: gs.Tensor, c: np.ndarray) -> bool | None:
        """Whether broadcasting ``c`` against ``x`` leaves ``x``'s shape as it is (None:
        cannot tell, the shape of ``x`` is not known well enough)."""
        if c.ndim == 0:
            return True
        dims = self.index.dims(x)
        if dims is None:
            return None
        if c.ndim > len(dims):
            return False
        for cd, xd in zip(reversed(c.shape), reversed(dims)):
            if cd != 1 and cd != xd:
                return None if xd is None else False
        return True

    # ---- the rules ---------------------------------------------------------------------

    def _identity(self, node: gs.Node) -> int | None:
        return 0

    def _dropout(self, node: gs.Node) -> int | None:
        if len(node.outputs) > 1 and node.outputs[1].name and node.outputs[1].outputs:
            return self.why_not(node, "dropout_mask_used")
        if self.opset < 7 and not int(node.attrs.get("is_test", 0)):
            return self.why_not(node, "dropout_training")
        if len(node.inputs) > 2 and node.inputs[2].name:
            mode = self.const(node.inputs[2])
            if mode is None or bool(np.asarray(mode).item()):
                return self.why_not(node, "dropout_training")
        return 0

    def _cast(self, node: gs.Node) -> int | None:
        to = np.dtype(helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
        x = node.inputs[0]
        have = self.index.dtype(x)
        if have is not None and have == to:
            return 0
        # Cast(Cast(x, wider), back to x's type)
        if len(x.inputs) == 1:
            inner = x.inputs[0]
            if inner.op == "Cast" and inner.domain in _STANDARD and inner.inputs:
                origin = self.index.dtype(inner.inputs[0])
                mid = np.dtype(helper.tensor_dtype_to_np_dtype(int(inner.attrs["to"])))
                if origin is not None and origin == to:
                    if mid.name in _EXACT_INTO.get(origin.name, set()):
                        return -1
                    return self.why_not(node, "cast_round_trip_lossy")
        return None

    def _castlike(self, node: gs.Node) -> int | None:
        a, b = self.index.dtype(node.inputs[0]), self.index.dtype(node.inputs[1])
        return 0 if a is not None and a == b else None

    def _transpose(self, node: gs.Node) -> int | None:
        perm = node.attrs.get("perm")
        if perm is not None:
            return 0 if list(perm) == list(range(len(perm))) else None
        rank = self.index.rank(node.inputs[0])
        return 0 if rank is not None and rank <= 1 else None

    def _reshape(self, node: gs.Node) -> int | None:
        if self.same_shape(node):
            return 0
        if len(node.inputs) < 2:
            return None
        target = self.const(node.inputs[1])
        dims = self.index.dims(node.inputs[0])
        if target is None or dims is None or target.ndim != 1 or len(target) != len(dims):
            return None
        copy_zero = int(node.attrs.get("allowzero", 0)) == 0
        free = 0
        for want, have in zip(target.tolist(), dims):
            if want == -1:
                free += 1
            elif want == 0 and copy_zero:
                continue
            elif have is None or want != have:
                return None
        return 0 if free <= 1 else None

    def _flatten(self, node: gs.Node) -> int | None:
        if self.same_shape(node):
            return 0
        rank = self.index.rank(node.inputs[0])
        axis = int(node.attrs.get("axis", 1))
        return 0 if rank == 2 and axis in (1, -1) else None

    def _squeeze(self, node: gs.Node) -> int | None:
        return 0 if self.same_shape(node) else None

    def _unsqueeze(self, node: gs.Node) -> int | None:
        return 0 if self.same_shape(node) else None

    def _slice(self, node: gs.Node) -> int | None:
        x = node.inputs[0]
        dims = self.index.dims(x)
        if len(node.inputs) == 1:
            starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
            axes, steps = node.attrs.get("axes"), None
        else:
            parts = [self.const(t) if t.name else None for t in node.inputs[1:]]
            parts += [None] * (4 - len(parts))
            if any(p is None and t.name for p, t in zip(parts, node.inputs[1:])):
                return None  # a non-constant slice parameter
            starts, ends, axes, steps = (None if p is None else p.tolist() for p in parts)
        if starts is None or ends is None:
            return None
        if axes is None:
            axes = list(range(len(starts)))
        if steps is None:
            steps = [1] * len(starts)
        for start, end, axis, step in zip(starts, ends, axes, steps):
            if step != 1:
                return None
            dim = None
            if dims is not None and -len(dims) <= axis < len(dims):
                dim = dims[axis]
            if start != 0 and not (dim is not None and start <= -dim):
                return None
            if end < _BIG and not (dim is not None and end >= dim):
                return None
        return 0

    def _pad(self, node: gs.Node) -> int | None:
        if len(node.inputs) > 1 and node.inputs[1].name:
            pads = self.const(node.inputs[1])
            if pads is None:
                return None
            pads = pads.tolist()
        else:
            pads = node.attrs.get("pads", node.attrs.get("paddings"))
        return 0 if pads is not None and all(p == 0 for p in pads) else None

    def _expand(self, node: gs.Node) -> int | None:
        shape = self.const(node.inputs[1])
        dims = self.index.dims(node.inputs[0])
        if shape is None or dims is None or shape.ndim != 1 or len(shape) > len(dims):
            return None
        for want, have in zip(reversed(shape.tolist()), reversed(dims)):
            if want != 1 and (have is None or want != have):
                return None
        return 0

    def _tile(self, node: gs.Node) -> int | None:
        repeats = self.const(node.inputs[1])
        return 0 if repeats is not None and np.all(repeats == 1) else None

    def _neutral(self, node: gs.Node, element: float, commutes: bool) -> int | None:
        if len(node.inputs) != 2:
            return None
        candidates = [(0, 1), (1, 0)] if commutes else [(0, 1)]
        for keep, other in candidates:
            c = self.const(node.inputs[other])
            if c is None or c.dtype.kind not in "biuf" or not np.all(c == element):
                continue
            x = node.inputs[keep]
            keeps = self.broadcast_keeps(x, c)
            if not keeps:
                return self.why_not(node, "shape_unknown" if keeps is None else "broadcast_changes_shape")
            xt = self.index.dtype(x)
            if xt is None or (node.op != "Pow" and xt != c.dtype):
                return self.why_not(node, "dtype_unknown")
            if node.op == "Pow" and xt.kind != "f":
                return None  # integer Pow goes through double: x ** 1 may round a large int64
            return keep
        return None

    def _add(self, node: gs.Node) -> int | None:
        return self._neutral(node, 0, commutes=True)

    def _sub(self, node: gs.Node) -> int | None:
        return self._neutral(node, 0, commutes=False)

    def _mul(self, node: gs.Node) -> int | None:
        return self._neutral(node, 1, commutes=True)

    def _div(self, node: gs.Node) -> int | None:
        return self._neutral(node, 1, commutes=False)

    def _pow(self, node: gs.Node) -> int | None:
        return self._neutral(node, 1, commutes=False)

    def _single_input(self, node: gs.Node) -> int | None:
        return 0 if len(node.inputs) == 1 and self.single_output(node) else None

    _concat = _sum = _max = _min = _mean = _single_input
