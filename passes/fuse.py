"""fuse: merge short chains of nodes into one node that computes the same.

Each fusion is a small named rewrite that checks everything it needs before changing
anything, and counts why it declined where the pattern was there:

* ``conv-add``: a per-channel constant ``Add`` after a ``Conv``/``ConvTranspose``
  becomes the convolution's bias (added to the bias it has);
* ``gemm-add``: a constant ``Add`` after a ``Gemm`` becomes its ``C`` (``beta`` folded);
  both are the affine fold of :mod:`onnxopt.affine` with scale 1, guards included (the
  stats keep this pass's names for its reasons);
* ``matmul-add``: ``MatMul`` of two 2-D tensors followed by a constant ``Add`` becomes a
  ``Gemm``. Never with Reshapes around it for higher ranks: flattening a 3-D MatMul+Add
  into Gemm+Reshape hides the pattern onnxruntime fuses into BiasGelu and cost ~7 % on a
  BERT-like model. An Add feeding a Gelu (Erf, Gelu, FastGelu) is left for onnxruntime;
* ``transpose-transpose``: two Transposes become one (or none, when they cancel);
* ``reshape-reshape``: a Reshape to a fixed target (no 0 entries) of a Reshape, Flatten,
  Squeeze or Unsqueeze reads the data directly — the target depends only on the element
  count, which the inner node keeps;
* ``hardswish``: ``x * Clip(x + 3, 0, 6) / 6`` (how PyTorch and Paddle export hard-swish
  before opset 14) becomes ``HardSwish(x)`` from opset 14, and ``x * HardSigmoid(x)``
  (alpha 1/6, beta 1/2, the same function) before: four elementwise passes become one or
  two. Results differ by float rounding only.

A fused-away intermediate must have no other reader and must not be a graph output;
graph inputs and outputs keep their names and types. IR < 4 models cannot hold new
initializers, so rewrites that need one (a new bias) skip them. Only standard-domain
nodes are touched; subgraphs are handled like the main graph. Option ``skip`` names
rewrites not to run.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from functools import cached_property

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.affine import AffineFolder
from onnxopt.errors import PipelineError
from onnxopt.framework import Opt, Pass, PassContext, PassResult, register
from onnxopt.graph import NameAllocator, bypass
from onnxopt.model import Model, iter_graphs
from onnxopt.rewrite import Edits, const_value_if_small, gc_paused
from onnxopt.tensorinfo import ShapeIndex

__all__ = ["Fuse", "REWRITES"]

log = logging.getLogger(__name__)

_STANDARD = (None, "", "ai.onnx")
_FLOATS = ("float16", "float32", "float64")
_GELU_OPS = frozenset({"Gelu", "FastGelu", "BiasGelu", "Erf"})


class _Skip(Exception):
    """A rewrite declines: the message is the why-not reason."""


@register
class Fuse(Pass):
    """Apply the named fusions (see the module docstring) everywhere they match, with a
    count of each applied and of each reason one was declined."""

    name = "fuse"
    summary = "bias Add into Conv/Gemm, MatMul+Add → Gemm, consecutive Transpose/Reshape, hard-swish"
    exact = True
    options = {
        "skip": Opt(list, [], "rewrites not to run (conv-add; gemm-add; matmul-add; "
                    "transpose-transpose; reshape-reshape; hardswish)"),
    }

    def __init__(self, **values):
        super().__init__(**values)
        unknown = [s for s in self.opts.skip if s not in REWRITES]
        if unknown:
            raise PipelineError(f"option 'skip' of pass 'fuse': unknown rewrite {', '.join(unknown)}; "
                                f"valid: {', '.join(REWRITES)}")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        with gc_paused():  # see onnxopt.rewrite.gc_paused: keeps large graphs linear
            return self._run(model, ctx)

    def _run(self, model: Model, ctx: PassContext) -> PassResult:
        state = _State(model)
        active = {name: rw for name, rw in REWRITES.items() if name not in self.opts.skip}
        by_op: dict[str, list[tuple[str, Callable]]] = {}
        for name, (anchors, fn) in active.items():
            for op in anchors:
                by_op.setdefault(op, []).append((name, fn))
        graphs = list(iter_graphs(model.graph))
        state.prepare(graphs, set(by_op))
        for g in graphs:
            state.current = g
            for node in list(g.nodes):
                if id(node) in state.edits.dead or node.domain not in _STANDARD:
                    continue
                for name, fn in by_op.get(node.op, ()):
                    try:
                        done = fn(state, g, node)
                    except _Skip as why:
                        state.kept[f"kept_{name.replace('-', '_')}_{why}"] += 1
                        log.debug("fuse: %s declined at %s (%s): %s", name, node.name or "?", node.op, why)
                        continue
                    if done:
                        state.fused[f"fused_{name.replace('-', '_')}"] += 1
                        break
        removed, released = state.edits.commit(model, graphs)
        stats = {"fused": sum(state.fused.values()), "nodes_removed": removed,
                 "initializers_released": released}
        stats.update({k: state.fused.get(k, 0) for k in (f"fused_{n.replace('-', '_')}" for n in active)})
        stats.update(sorted(state.kept.items()))
        return PassResult(modified=bool(stats["fused"]), stats=stats)


class _State:
    def __init__(self, model: Model):
        self.model = model
        self.outputs: set[int] = set()
        self.opset = model.opset_imports.get("", 1)
        self.edits = Edits()  # new inputs, removed nodes: applied in bulk at the end
        self.fused: Counter = Counter()
        self.kept: Counter = Counter()
        self._names: NameAllocator | None = None
        self.graphs: list[gs.Graph] = []
        self.has_clip = False
        self.graph_of: dict[int, gs.Graph] = {}
        self.current: gs.Graph | None = None  # the graph being rewritten

    @cached_property
    def index(self) -> ShapeIndex:
        return ShapeIndex(self.model)

    @cached_property
    def affine(self) -> AffineFolder:
        """The shared affine fold (conv-add, gemm-add), recording into this pass's edits."""
        return AffineFolder(self.model, index=self.index, graphs=self.graphs, edits=self.edits, names=self.name)

    def prepare(self, graphs: list[gs.Graph], anchors: set[str]) -> None:
        """Build the shape index now if any rewrite may need it — before the first rewrite
        changes the graph — and skip shape inference altogether when nothing can match
        (the last round of a fixed point, typically)."""
        self.graphs = graphs
        self.has_clip = any(n.op == "Clip" for g in graphs for n in g.nodes)
        self.graph_of = {id(n): g for g in graphs for n in g.nodes}
        self.outputs = {id(t) for g in graphs for t in g.outputs}
        for g in graphs:
            for node in g.nodes:
                if node.op not in anchors or node.domain not in _STANDARD:
                    continue
                producers = {t.inputs[0].op for t in node.inputs if len(t.inputs) == 1}
                if node.op == "Add" and producers & {"Conv", "ConvTranspose", "Gemm", "MatMul"}:
                    break
                if node.op == "Transpose" and "Transpose" in producers:
                    break
                if node.op in ("Div", "Mul") and self.has_clip:
                    break
            else:
                continue
            self.index  # noqa: B018  (build it before anything changes)
            return

    def name(self, hint: str) -> str:
        """A fresh name; give unique hints (tensor names): NameAllocator probes suffixes
        one by one, so a hint repeated thousands of times would be quadratic."""
        if self._names is None:
            self._names = NameAllocator(self.model)
        return self._names(hint)

    def const(self, t: gs.Tensor) -> np.ndarray | None:
        return const_value_if_small(t)

    def sole_use(self, t: gs.Tensor) -> gs.Node | None:
        """The only node reading ``t`` if it has exactly one and ``t`` is no graph output."""
        if id(t) in self.outputs or len(t.outputs) != 1 or len(t.inputs) != 1:
            return None
        return t.outputs[0]

    def producer(self, t: gs.Tensor, op: str) -> gs.Node | None:
        """The ``op`` node producing ``t`` in the graph being rewritten (a producer in an
        enclosing graph is out of reach: fusing across scopes would move a computation
        into or out of a branch)."""
        if len(t.inputs) != 1:
            return None
        p = t.inputs[0]
        if p.op != op or p.domain not in _STANDARD or id(p) in self.edits.dead:
            return None
        return p if self.graph_of.get(id(p)) is self.current else None

    def float_dtype(self, *tensors: gs.Tensor) -> np.dtype:
        dtypes = {self.index.dtype(t) for t in tensors}
        if len(dtypes) != 1 or None in dtypes:
            raise _Skip("dtype_unknown")
        dt = dtypes.pop()
        if dt.name not in _FLOATS:
            raise _Skip("not_float")
        return dt


def _other(node: gs.Node, t: gs.Tensor) -> gs.Tensor:
    return node.inputs[1] if node.inputs[0] is t else node.inputs[0]


def _set_op(node: gs.Node, op: str, attrs: dict | None = None) -> None:
    node.op = op
    node.attrs = dict(attrs or {})
    vars(node).pop("attr_types", None)


# --------------------------------------------------------------------------------------
# Bias additions
# --------------------------------------------------------------------------------------


#: The shared fold's reasons, under the names this pass has always reported them by.
_CONV_REASONS = {"shared_output": "conv_output_shared", "graph_output": "conv_output_shared",
                 "operand_not_per_channel": "not_per_channel", "operand_type": "dtype_mismatch",
                 "weight_not_float": "not_float"}
_GEMM_REASONS = {"shared_output": "gemm_output_shared", "graph_output": "gemm_output_shared",
                 "operand_not_per_channel": "broadcast_changes_shape", "bias_not_constant": "c_not_constant",
                 "weight_not_float": "not_float"}


def _biased_producer(state: _State, add: gs.Node, ops: tuple[str, ...]) -> tuple[gs.Node | None, gs.Tensor | None]:
    """(producer, its output) when one input of the two-input ``add`` comes from a node of
    ``ops`` and the other input is constant; (None, None) otherwise."""
    if len(add.inputs) != 2:
        return None, None
    for t in add.inputs:
        for op in ops:
            p = state.producer(t, op)
            if p is not None and state.const(_other(add, t)) is not None:
                return p, t
    return None, None


def _fold_bias(state: _State, layer: gs.Node, add: gs.Node, reasons: dict[str, str]) -> bool:
    """The bias ``add`` after ``layer`` folded by the shared affine fold (scale 1)."""
    fold = state.affine.match(layer, add)
    if isinstance(fold, str):
        raise _Skip(reasons.get(fold, fold))
    state.affine.apply(fold)
    return True


def _conv_add(state: _State, g: gs.Graph, add: gs.Node) -> bool:
    conv, _ = _biased_producer(state, add, ("Conv", "ConvTranspose"))
    return conv is not None and _fold_bias(state, conv, add, _CONV_REASONS)


def _gemm_add(state: _State, g: gs.Graph, add: gs.Node) -> bool:
    gemm, _ = _biased_producer(state, add, ("Gemm",))
    return gemm is not None and _fold_bias(state, gemm, add, _GEMM_REASONS)


def _feeds_gelu(t: gs.Tensor) -> bool:
    for c in t.outputs:
        if c.op in _GELU_OPS:
            return True
        if c.op in ("Div", "Mul") and any(cc.op in _GELU_OPS for o in c.outputs for cc in o.outputs):
            return True
    return False


def _matmul_add(state: _State, g: gs.Graph, add: gs.Node) -> bool:
    mm, y = _biased_producer(state, add, ("MatMul",))
    if mm is None:
        return False
    if state.sole_use(y) is not add:
        raise _Skip("matmul_output_shared")
    a, b = mm.inputs[0], mm.inputs[1]
    ra, rb = state.index.rank(a), state.index.rank(b)
    if ra is None or rb is None:
        raise _Skip("rank_unknown")
    if ra != 2 or rb != 2:
        raise _Skip("not_2d")
    dt = state.float_dtype(a, b)
    if dt.name == "float16":
        raise _Skip("float16")  # onnxruntime's CPU Gemm has no float16 kernel
    c = state.const(_other(add, y))
    dims = state.index.dims(y)
    if c.dtype != dt or dims is None or c.ndim > 2 or any(
            cd != 1 and cd != yd for cd, yd in zip(reversed(c.shape), reversed(dims))):
        raise _Skip("broadcast_changes_shape")
    if _feeds_gelu(add.outputs[0]):
        raise _Skip("bias_gelu")
    c_tensor = _other(add, y)
    if not isinstance(c_tensor, gs.Constant):  # a Constant node's output, maybe placed after the MatMul
        c_tensor = gs.Constant(state.name(c_tensor.name), values=c)
    _set_op(mm, "Gemm")
    state.edits.rewire(mm, [a, b, c_tensor])
    state.edits.take_output(mm, add)
    return True


# --------------------------------------------------------------------------------------
# Layout chains
# --------------------------------------------------------------------------------------


def _perm(state: _State, node: gs.Node) -> list[int] | None:
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    rank = state.index.rank(node.inputs[0])
    return None if rank is None else list(reversed(range(rank)))


def _transpose_transpose(state: _State, g: gs.Graph, outer: gs.Node) -> bool:
    inner = state.producer(outer.inputs[0], "Transpose")
    if inner is None:
        return False
    p_in, p_out = _perm(state, inner), _perm(state, outer)
    if p_in is None or p_out is None:
        raise _Skip("rank_unknown")
    if len(p_in) != len(p_out):
        raise _Skip("rank_mismatch")
    composed = [p_in[p] for p in p_out]
    x = inner.inputs[0]
    if composed == list(range(len(composed))) and bypass(g, outer.outputs[0], x):
        state.edits.remove(outer)
        return True
    state.edits.rewire(outer, [x])
    outer.attrs["perm"] = composed
    return True


_RESHAPE_LIKE = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def _reshape_reshape(state: _State, g: gs.Graph, outer: gs.Node) -> bool:
    if len(outer.inputs) != 2:
        return False
    mid = outer.inputs[0]
    inner = next((p for op in _RESHAPE_LIKE if (p := state.producer(mid, op)) is not None), None)
    if inner is None:
        return False
    target = state.const(outer.inputs[1])
    if target is None:
        raise _Skip("target_not_constant")
    if np.any(target == 0):
        raise _Skip("target_copies_dims")  # 0 copies a dimension of the inner result
    state.edits.rewire(outer, [inner.inputs[0], outer.inputs[1]])
    return True


# --------------------------------------------------------------------------------------
# Hard-swish
# --------------------------------------------------------------------------------------


def _all_equal(v: np.ndarray | None, value: float, rtol: float = 0.0) -> bool:
    return v is not None and v.size > 0 and bool(np.all(np.isclose(v, value, rtol=rtol, atol=0.0)))


def _scalar_like(state: _State, x: gs.Tensor, c: np.ndarray) -> bool:
    rank = state.index.rank(x)
    return rank is not None and c.ndim <= rank and all(d == 1 for d in c.shape)


def _divided_by_six(state: _State, node: gs.Node) -> gs.Tensor | None:
    """If ``node`` is ``t / 6`` or ``t * (1/6)`` (constant on the right or, for Mul,
    either side), return ``t``."""
    if node.domain not in _STANDARD or len(node.inputs) != 2:
        return None
    if node.op == "Div":
        c = state.const(node.inputs[1])
        return node.inputs[0] if _all_equal(c, 6.0) and _scalar_like(state, node.inputs[0], c) else None
    if node.op == "Mul":
        for t in node.inputs:
            c = state.const(_other(node, t))
            if _all_equal(c, 1 / 6, rtol=1e-6) and _scalar_like(state, t, c):
                return t
    return None


def _clip_relu6(state: _State, t: gs.Tensor) -> gs.Tensor | None:
    """If ``t = Clip(Add(x, 3), 0, 6)``, return ``x``."""
    clip = state.producer(t, "Clip")
    if clip is None:
        return None
    if len(clip.inputs) >= 3 and clip.inputs[1].name and clip.inputs[2].name:
        lo, hi = state.const(clip.inputs[1]), state.const(clip.inputs[2])
    elif "min" in clip.attrs or "max" in clip.attrs:
        lo = np.array(clip.attrs.get("min", -np.inf))
        hi = np.array(clip.attrs.get("max", np.inf))
    else:
        return None
    if not (_all_equal(lo, 0.0) and _all_equal(hi, 6.0)):
        return None
    add = state.producer(clip.inputs[0], "Add")
    if add is None or len(add.inputs) != 2:
        return None
    for x in add.inputs:
        c = state.const(_other(add, x))
        if _all_equal(c, 3.0) and _scalar_like(state, x, c):
            return x
    return None


def _hardswish(state: _State, g: gs.Graph, final: gs.Node) -> bool:
    """``final`` is the last node: ``Div(Mul(x, clip), 6)`` or ``Mul(x, Div(clip, 6))``."""
    if not state.has_clip:
        return False
    chain: list[gs.Node] = [final]
    x = clip_out = None
    m = _divided_by_six(state, final)
    if m is not None:  # (x * clip) / 6
        mul = state.producer(m, "Mul")
        if mul is None or len(mul.inputs) != 2:
            return False
        for cand in mul.inputs:
            xx = _clip_relu6(state, cand)
            if xx is not None and _other(mul, cand) is xx:
                x, clip_out = xx, cand
        chain.append(mul)
        inner_out = m
    elif final.op == "Mul" and len(final.inputs) == 2:  # x * (clip / 6)
        for cand in final.inputs:
            div = cand.inputs[0] if len(cand.inputs) == 1 else None
            if div is None or id(div) in state.edits.dead or state.graph_of.get(id(div)) is not state.current:
                continue
            cl = _divided_by_six(state, div)
            if cl is None:
                continue
            xx = _clip_relu6(state, cl)
            if xx is not None and _other(final, cand) is xx:
                x, clip_out = xx, cl
                chain.append(div)
                inner_out = cand
        if x is None:
            return False
    else:
        return False
    if x is None:
        return False
    clip = clip_out.inputs[0]
    add = clip.inputs[0].inputs[0]
    for t, reader in ((inner_out, final), (clip_out, chain[1]), (clip.inputs[0], clip)):
        if state.sole_use(t) is not reader:
            raise _Skip("intermediate_shared")
    dt = state.index.dtype(x)
    if dt is None or dt.name not in _FLOATS:
        raise _Skip("not_float")
    out_dt = state.index.dtype(final.outputs[0])
    if out_dt is not None and out_dt != dt:
        raise _Skip("dtype_mismatch")
    state.edits.touched.extend(t for n in (add, clip, *chain) for t in n.inputs if t.name)
    if state.opset >= 14:
        state.edits.remove(add, clip, chain[1])
        state.edits.rewire(final, [x])
        _set_op(final, "HardSwish")
        return True
    # Before opset 14: x * HardSigmoid(x), HardSigmoid(x) = clip(x/6 + 1/2, 0, 1).
    state.edits.remove(add, chain[1])
    state.edits.rewire(clip, [x])
    _set_op(clip, "HardSigmoid", {"alpha": 1.0 / 6.0, "beta": 0.5})
    state.edits.rewire(final, [x, clip_out])
    _set_op(final, "Mul")
    return True


#: name -> (ops the rewrite is anchored on, function)
REWRITES: dict[str, tuple[tuple[str, ...], Callable]] = {
    "conv-add": (("Add",), _conv_add),
    "gemm-add": (("Add",), _gemm_add),
    "matmul-add": (("Add",), _matmul_add),
    "transpose-transpose": (("Transpose",), _transpose_transpose),
    "reshape-reshape": (("Reshape",), _reshape_reshape),
    "hardswish": (("Div", "Mul"), _hardswish),
}
