"""Placement for the ``quantize`` pass: which ops get QuantizeLinear/DequantizeLinear,
and which layers the dynamic and weight-only modes rewrite, decided on the graph before
anything is rewritten.

A :class:`Unit` is one op that will run quantized: the inputs that get a
DequantizeLinear (activations, a weight, an int32 bias), an optional Relu/Clip tail and
the tensor whose QuantizeLinear ends it; a :class:`QuantizePlan` is every unit of a
static quantization. Two profiles:

``ort-cpu`` places Q/DQ exactly where onnxruntime's CPU provider fuses them into integer
kernels (its QDQ selectors): Conv → QLinearConv (a Relu/Clip right after is absorbed),
MatMul → MatMulIntegerToFloat or QLinearMatMul, Gemm (and MatMul + bias Add on 2-D
inputs, the bias as int32) → QGemm. Convolutions that the CPU provider runs faster in
float stay float: depthwise ones (unless ``depthwise=true``), those over 1x1 maps
(squeeze-excitation) and those over fewer than ``min_in_channels`` input channels (an
image's first layer). Cheap ops that onnxruntime also runs on 8-bit data (Add, Mul,
pooling, Concat, Sigmoid, Softmax; Reshape, Transpose, MaxPool ... which keep the input's
scale) are quantized only where that saves conversions, alone or as a connected group
(x * Sigmoid(x)): no Q/DQ pair is left around an op that would run in float anyway.

``tensorrt`` follows NVIDIA's explicit-quantization placement: symmetric int8 Q/DQ on the
activation inputs of Conv, ConvTranspose, Gemm and MatMul, per-channel int8 weights, both
inputs of residual Adds, float biases, no quantized outputs (TensorRT propagates scales).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import const_value
from onnxopt.model import iter_graphs
from onnxopt.tensorinfo import ShapeIndex

__all__ = ["PROFILES", "Unit", "QuantizePlan", "PlanContext", "make_plan", "matches", "cheap_unit", "tail_of",
           "COMPUTE_OPS", "calibration_tensors", "select_weight_layers"]

log = logging.getLogger(__name__)

PROFILES = ("ort-cpu", "tensorrt")
COMPUTE_OPS = {"ort-cpu": ("Conv", "MatMul", "Gemm"), "tensorrt": ("Conv", "ConvTranspose", "MatMul", "Gemm")}
#: Ops onnxruntime's CPU provider runs as QLinear* kernels when wrapped in DQ ... Q.
QLINEAR_OPS = ("Add", "Mul", "GlobalAveragePool", "AveragePool", "Sigmoid", "LeakyRelu", "Concat", "Softmax")
#: Ops onnxruntime runs directly on 8-bit data when the Q after them repeats the DQ before.
MOVE_OPS = ("MaxPool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice",
            "Gather", "Expand", "Tile")
_TAILS = ("Relu", "Clip")


@dataclass
class Unit:
    """One op that runs quantized."""

    node: gs.Node
    kind: str  # "compute" or "cheap"
    act_inputs: list[int]
    weight: tuple[int, int | None] | None = None  # (input index, channel axis or None)
    bias_index: int | None = None  # Conv/ConvTranspose/Gemm bias, quantized to int32
    bias_add: gs.Node | None = None  # MatMul's bias Add (2-D): its constant becomes int32
    bias_add_index: int | None = None
    tail: list[gs.Node] = field(default_factory=list)
    out: gs.Tensor | None = None  # tensor quantized after the unit (and its tail)
    shares_params: bool = False  # output keeps the input's scale (move ops)
    const_inputs: list[int] = field(default_factory=list)  # constant operands quantized offline
    channel_axis: int = 1

    @property
    def name(self) -> str:
        return self.node.name or self.node.op

    def float_output(self) -> gs.Tensor:
        """The unit's own output before any tail (what bias correction compares)."""
        return self.node.outputs[0]


@dataclass
class QuantizePlan:
    """Every decision of a quantization, before any rewrite."""

    profile: str
    units: list[Unit]
    symmetric: bool
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_nodes: list[tuple[str, str]] = field(default_factory=list)

    def act_tensors(self) -> list[gs.Tensor]:
        """Activation tensors that get a QuantizeLinear, in a stable order."""
        seen: set[int] = set()
        out: list[gs.Tensor] = []
        for u in self.units:
            for i in u.act_inputs:
                t = u.node.inputs[i]
                if id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
            if u.out is not None and id(u.out) not in seen:
                seen.add(id(u.out))
                out.append(u.out)
        return out

    def param_source(self) -> dict[int, gs.Tensor]:
        """For outputs of move ops: the tensor whose scale they keep (chains resolved)."""
        src: dict[int, gs.Tensor] = {}
        for u in self.units:
            if u.shares_params and u.out is not None:
                t = u.node.inputs[u.act_inputs[0]]
                src[id(u.out)] = src.get(id(t), t)
        return src

    def compute_units(self) -> list[Unit]:
        return [u for u in self.units if u.kind == "compute"]


def matches(node: gs.Node, patterns: Iterable[str]) -> bool:
    """Whether ``node`` is named by one of ``patterns``: an op type (``Conv``), a node name,
    or a glob over node names (``*attention*``)."""
    for p in patterns:
        if p == node.op or p == node.name or fnmatch.fnmatchcase(node.name or "", p):
            return True
    return False


class PlanContext:
    """What placement reads about a graph: dtypes, ranks (from a shape index of the model
    that holds ``graph``), which nodes are in the main graph."""

    def __init__(self, graph: gs.Graph, index: ShapeIndex, opset: int):
        self.graph = graph
        self.index = index
        self.opset = opset
        self.main = {id(n) for n in graph.nodes}
        self.outputs = {id(t) for t in graph.outputs}

    def dtype(self, t: gs.Tensor) -> np.dtype | None:
        dt = self.index.dtype(t)
        if dt is not None:
            return np.dtype(dt)
        if t.dtype is not None:
            try:
                return np.dtype(t.dtype)
            except TypeError:
                return None
        return None

    def rank(self, t: gs.Tensor) -> int | None:
        rank = self.index.rank(t)
        if rank is not None:
            return rank
        if isinstance(t, gs.Variable) and t.shape is not None:
            return len(t.shape)
        return None

    def is_float_act(self, t: gs.Tensor) -> bool:
        if not t.name or const_value(t) is not None:
            return False
        if isinstance(t, gs.Constant):  # an initializer a user may override
            return False
        return self.dtype(t) == np.float32

    def main_consumers(self, t: gs.Tensor) -> list[gs.Node]:
        return list(t.outputs)

    def only_main_consumers(self, t: gs.Tensor) -> bool:
        return all(id(c) in self.main for c in t.outputs)


def _is_default(node: gs.Node) -> bool:
    return node.domain in (None, "", "ai.onnx")


def _float_const(t: gs.Tensor) -> np.ndarray | None:
    v = const_value(t)
    if v is None:
        return None
    v = np.asarray(v)
    return v if v.dtype == np.float32 else None


def _compute_unit(node: gs.Node, ctx: PlanContext, profile: str, per_channel: bool,
                  depthwise: bool = False, min_in_channels: int = 1) -> Unit | str:
    """The unit for a Conv/ConvTranspose/MatMul/Gemm, or the reason it is skipped."""
    op = node.op
    ins = node.inputs
    if len(ins) < 2 or not ctx.is_float_act(ins[0]):
        return "input is not a float32 activation"
    if len(node.outputs) != 1:
        return "several outputs"
    if op in ("Conv", "ConvTranspose"):
        w = _float_const(ins[1])
        if w is None:
            return "weight is not a float32 constant"
        if w.ndim < 3:
            return "weight rank below 3"
        bias_index = None
        if len(ins) > 2 and ins[2].name:
            if _float_const(ins[2]) is None:
                return "bias is not a float32 constant"
            bias_index = 2
        group = int(node.attrs.get("group", 1))
        dims = ctx.index.dims(ins[0])
        if profile == "ort-cpu" and dims is not None and len(dims) >= 3 and all(d == 1 for d in dims[2:]):
            return "1x1 feature map (squeeze-excitation): nothing to gain in int8"
        if profile == "ort-cpu" and not depthwise and group > 1 and w.shape[1] == 1:
            return "depthwise convolution (the CPU provider's int8 depthwise kernel is slower than its float one)"
        if profile == "ort-cpu" and op == "Conv" and group == 1 and w.shape[1] < min_in_channels:
            return "few input channels (an image's first layer: the CPU provider's float kernel is faster)"
        axis: int | None = 0 if op == "Conv" else (1 if group == 1 else None)
        if not per_channel:
            axis = None
        if op == "ConvTranspose" and profile == "tensorrt":
            bias_index = None
        if profile == "tensorrt":
            bias_index = None
        return Unit(node, "compute", [0], (1, axis), bias_index, channel_axis=1)
    if op == "MatMul":
        b = ins[1]
        wv = _float_const(b)
        if wv is not None:
            if wv.ndim < 2:
                return "weight rank below 2"
            axis = (wv.ndim - 1) if per_channel and wv.ndim == 2 else None
            return Unit(node, "compute", [0], (1, axis), channel_axis=-1)
        if ctx.is_float_act(b):
            return Unit(node, "compute", [0, 1], None, channel_axis=-1)
        return "second input is neither a float32 constant nor a float32 activation"
    if op == "Gemm":
        if float(node.attrs.get("alpha", 1.0)) != 1.0:
            return "Gemm with alpha != 1"
        w = _float_const(ins[1])
        if w is None or w.ndim != 2:
            return "weight is not a 2-D float32 constant"
        trans_b = int(node.attrs.get("transB", 0))
        n = w.shape[0] if trans_b else w.shape[1]
        bias_index = None
        if len(ins) > 2 and ins[2].name:
            c = _float_const(ins[2])
            if c is None:
                return "bias is not a float32 constant"
            if float(node.attrs.get("beta", 1.0)) != 1.0:
                return "Gemm with beta != 1"
            if c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2:
                return "bias is not a per-column vector"
            bias_index = 2 if profile == "ort-cpu" else None
        axis = (0 if trans_b else 1) if per_channel else None
        return Unit(node, "compute", [0], (1, axis), bias_index, channel_axis=-1)
    return f"{op} is not quantized by this profile"


def _bias_add(unit: Unit, ctx: PlanContext) -> tuple[gs.Node, int] | None:
    """A MatMul's following Add with a constant per-column bias, on 2-D inputs (where
    onnxruntime turns MatMul + Add into Gemm, which fuses to QGemm only when the bias is
    an int32 DequantizeLinear)."""
    node = unit.node
    if node.op != "MatMul" or unit.weight is None:
        return None
    t = node.outputs[0]
    if id(t) in ctx.outputs or len(t.outputs) != 1:
        return None
    add = t.outputs[0]
    if add.op != "Add" or id(add) not in ctx.main or len(add.inputs) != 2:
        return None
    if ctx.rank(node.inputs[0]) != 2:
        return None
    idx = 1 if add.inputs[0] is t else 0
    if add.inputs[1 - idx] is not t:
        return None
    c = _float_const(add.inputs[idx])
    w = _float_const(node.inputs[1])
    if c is None or w is None or c.size != w.shape[-1] or c.ndim > 1:
        return None
    return add, idx


def tail_of(t: gs.Tensor, ctx: PlanContext) -> list[gs.Node]:
    """A Relu, or a Clip with constant bounds, that alone reads ``t``."""
    if id(t) in ctx.outputs or len(t.outputs) != 1:
        return []
    c = t.outputs[0]
    if id(c) not in ctx.main or not _is_default(c) or c.op not in _TAILS:
        return []
    if c.op == "Clip":
        if len(c.inputs) < 3 or any(not x.name or const_value(x) is None for x in c.inputs[1:3]):
            if "min" not in c.attrs:
                return []
    return [c]


def make_plan(model, index: ShapeIndex, *, profile: str, per_channel: bool,
              symmetric: bool, exclude: Iterable[str] = (), op_types: Iterable[str] | None = None,
              skip_first: bool = False, skip_last: bool = False,
              excluded: frozenset[int] = frozenset(), cheap: bool = True, depthwise: bool = False,
              min_in_channels: int = 1) -> QuantizePlan:
    """Decide where Q/DQ go. ``index`` is the shape index of ``model``; ``excluded``
    holds ids of nodes to keep in float (the accuracy guard, fusion pruning); ``exclude``
    are the user's patterns."""
    graph = model.graph
    opset = int(model.opset_imports.get("", 13))
    ctx = PlanContext(graph, index, opset)
    exclude = list(exclude)
    compute_ops = tuple(op_types) if op_types else COMPUTE_OPS[profile]
    plan = QuantizePlan(profile, [], symmetric)

    def skip(node: gs.Node, reason: str) -> None:
        plan.skipped[reason] = plan.skipped.get(reason, 0) + 1
        plan.skipped_nodes.append((node.name or node.op, reason))
        log.debug("quantize: %s (%s) kept in float: %s", node.name, node.op, reason)

    candidates = [n for n in graph.nodes if n.op in compute_ops and _is_default(n)
                  and n.op in ("Conv", "ConvTranspose", "MatMul", "Gemm")]
    firsts = {id(candidates[0])} if candidates and skip_first else set()
    lasts = {id(candidates[-1])} if candidates and skip_last else set()
    units: dict[int, Unit] = {}
    for node in candidates:
        if node.op == "ConvTranspose" and profile == "ort-cpu":
            skip(node, "ConvTranspose has no integer kernel on the CPU provider")
            continue
        if id(node) in firsts:
            skip(node, "first layer kept in float (skip_first)")
            continue
        if id(node) in lasts:
            skip(node, "last layer kept in float (skip_last)")
            continue
        if matches(node, exclude):
            skip(node, "excluded by the user")
            continue
        if id(node) in excluded:
            continue
        u = _compute_unit(node, ctx, profile, per_channel, depthwise, min_in_channels)
        if isinstance(u, str):
            skip(node, u)
            continue
        units[id(node)] = u
    for g_node in _subgraph_nodes(graph):
        if g_node.op in compute_ops:
            skip(g_node, "inside a subgraph (If/Loop/Scan bodies stay float)")

    if profile == "tensorrt":
        for node in graph.nodes:
            if node.op == "Add" and _is_default(node) and len(node.inputs) == 2 \
                    and all(ctx.is_float_act(t) for t in node.inputs) \
                    and not matches(node, exclude) and id(node) not in excluded:
                units[id(node)] = Unit(node, "cheap", [0, 1], channel_axis=1)
        plan.units = [units[id(n)] for n in graph.nodes if id(n) in units]
        return plan

    # ort-cpu: MatMul bias Adds, then the cheap ops that save conversions.
    for u in units.values():
        ba = _bias_add(u, ctx)
        if ba is not None:
            u.bias_add, u.bias_add_index = ba
    absorbed = {id(u.bias_add) for u in units.values() if u.bias_add is not None}
    if cheap:
        _choose_cheap(graph, ctx, units, exclude, excluded, absorbed)
    # Outputs and tails.
    for u in units.values():
        _set_output(u, units, ctx)
    plan.units = [units[id(n)] for n in graph.nodes if id(n) in units]
    return plan


def calibration_tensors(model, index: ShapeIndex, plan: QuantizePlan) -> list[str]:
    """Names of every activation tensor that ``plan``, or a plan of the same model with
    some layers kept in float, might quantize: what calibration must observe."""
    names: dict[str, None] = {}
    for t in plan.act_tensors():
        names[t.name] = None
    ctx = PlanContext(model.graph, index, int(model.opset_imports.get("", 13)))

    def add_output(out: gs.Tensor) -> None:
        tail = tail_of(out, ctx)
        if tail and ctx.is_float_act(tail[0].outputs[0]):
            names[tail[0].outputs[0].name] = None

    for u in plan.units:
        out = u.node.outputs[0]
        if ctx.is_float_act(out):
            names[out.name] = None
        add_output(out)
    if plan.profile == "ort-cpu":
        for node in model.graph.nodes:
            cu = cheap_unit(node, ctx)
            if cu is None:
                continue
            for i in cu.act_inputs:
                names[node.inputs[i].name] = None
            names[node.outputs[0].name] = None
            add_output(node.outputs[0])
    return list(names)


def _subgraph_nodes(graph: gs.Graph) -> list[gs.Node]:
    return [n for g in iter_graphs(graph) if g is not graph for n in g.nodes]


def cheap_unit(node: gs.Node, ctx: PlanContext) -> Unit | None:
    op = node.op
    if not _is_default(node) or len(node.outputs) < 1 or not node.outputs[0].name:
        return None
    out = node.outputs[0]
    if ctx.dtype(out) != np.float32:
        return None
    if op in ("Add", "Mul"):
        if len(node.inputs) != 2:
            return None
        acts = [i for i, t in enumerate(node.inputs) if ctx.is_float_act(t)]
        consts = [i for i, t in enumerate(node.inputs) if _float_const(t) is not None]
        if not acts or len(acts) + len(consts) != 2:
            return None
        return Unit(node, "cheap", acts, const_inputs=consts)
    if op in ("GlobalAveragePool", "AveragePool", "Sigmoid", "LeakyRelu", "Softmax"):
        if len(node.outputs) != 1 or not ctx.is_float_act(node.inputs[0]):
            return None
        if op == "Softmax" and ctx.opset < 13:
            return None
        return Unit(node, "cheap", [0])
    if op == "Concat":
        if not node.inputs or not all(ctx.is_float_act(t) for t in node.inputs):
            return None
        return Unit(node, "cheap", list(range(len(node.inputs))))
    if op in MOVE_OPS:
        if not node.inputs or not ctx.is_float_act(node.inputs[0]):
            return None
        if op == "MaxPool" and (ctx.opset < 12 or len([o for o in node.outputs if o.name]) != 1):
            return None
        if any(t.name and ctx.is_float_act(t) for t in node.inputs[1:]):
            return None
        return Unit(node, "cheap", [0], shares_params=True)
    return None


def _choose_cheap(graph: gs.Graph, ctx: PlanContext, units: dict[int, Unit], exclude: list[str],
                  excluded: frozenset[int], absorbed: set[int]) -> None:
    """Add cheap ops where quantizing them needs fewer conversions than leaving them float."""
    cands: list[tuple[gs.Node, Unit]] = []
    for node in graph.nodes:
        if id(node) in units or id(node) in absorbed or id(node) in excluded or matches(node, exclude):
            continue
        u = cheap_unit(node, ctx)
        if u is not None:
            cands.append((node, u))

    by_bias_add = {id(u.bias_add): u for u in units.values() if u.bias_add is not None}

    def producer_unit(t: gs.Tensor) -> Unit | None:
        if len(t.inputs) != 1:
            return None
        p = t.inputs[0]
        u = units.get(id(p))
        if u is not None:
            return u
        # a tail (Relu/Clip) of a unit, after its bias Add if it has one
        if p.op in _TAILS and len(p.inputs) >= 1 and len(p.inputs[0].inputs) == 1:
            before = p.inputs[0].inputs[0]
            pu = units.get(id(before)) or by_bias_add.get(id(before))
            if pu is not None and tail_of(p.inputs[0], ctx):
                return pu
        return None

    def int8(t: gs.Tensor) -> bool:
        u = producer_unit(t)
        if u is None:
            return False
        if u.node.op in ("MatMul", "Gemm") and t is u.node.outputs[0]:
            return u.bias_add is None and _all_quantized_consumers(t, units)
        return True

    def quantized_by_other(t: gs.Tensor, me: gs.Node) -> bool:
        return any(id(c) in units and c is not me and any(c.inputs[i] is t for i in units[id(c)].act_inputs)
                   for c in t.outputs)

    changed = True
    rounds = 0
    while changed and rounds < 8:
        changed = False
        rounds += 1
        for node, u in cands:
            if id(node) in units:
                continue
            cost_q = cost_f = 0
            for i in u.act_inputs:
                t = node.inputs[i]
                if int8(t):
                    float_users = [c for c in t.outputs if c is not node and id(c) not in units]
                    cost_f += 0 if (float_users or id(t) in ctx.outputs) else 1
                elif not quantized_by_other(t, node):
                    cost_q += 1
            out = node.outputs[0]
            tail = tail_of(out, ctx)
            final = tail[0].outputs[0] if tail else out
            users = list(final.outputs)
            float_users = [c for c in users if id(c) not in units] or (id(final) in ctx.outputs and [None])
            unit_users = [c for c in users if id(c) in units]
            if float_users:
                cost_q += 1
            if unit_users:
                cost_f += 1
            if cost_q < cost_f:
                units[id(node)] = u
                changed = True
        if not changed:
            changed = _choose_region(cands, units, ctx, int8, quantized_by_other)


def _choose_region(cands: list[tuple[gs.Node, Unit]], units: dict[int, Unit], ctx: PlanContext,
                   int8, quantized_by_other) -> bool:
    """Quantize the first connected group of remaining candidates (linked by tensors)
    whose conversions, counted at its border, are fewer quantized than float: e.g.
    x * Sigmoid(x) between int8 layers, where neither op alone saves anything."""
    left = {id(n): (n, u) for n, u in cands if id(n) not in units}
    seen: set[int] = set()
    for start, _ in cands:
        if id(start) not in left or id(start) in seen:
            continue
        group: dict[int, tuple[gs.Node, Unit]] = {}
        stack = [start]
        while stack:
            n = stack.pop()
            if id(n) in group:
                continue
            group[id(n)] = left[id(n)]
            for t in n.outputs:
                stack.extend(c for c in t.outputs if id(c) in left)
            for i in left[id(n)][1].act_inputs:
                t = n.inputs[i]
                if len(t.inputs) == 1 and id(t.inputs[0]) in left:
                    stack.append(t.inputs[0])
        seen.update(group)
        if len(group) < 2:
            continue
        cost_q = cost_f = 0
        entering: dict[int, gs.Tensor] = {}
        for n, u in group.values():
            for i in u.act_inputs:
                t = n.inputs[i]
                if not (len(t.inputs) == 1 and id(t.inputs[0]) in group):
                    entering[id(t)] = t
        for t in entering.values():
            if int8(t):
                outside_float = [c for c in t.outputs if id(c) not in group and id(c) not in units]
                cost_f += 0 if (outside_float or id(t) in ctx.outputs) else 1
            elif not any(quantized_by_other(t, n) for n, _ in group.values()):
                cost_q += 1
        for n, _ in group.values():
            out = n.outputs[0]
            users = [c for c in out.outputs if id(c) not in group]
            if any(id(c) not in units for c in users) or id(out) in ctx.outputs:
                cost_q += 1
            if any(id(c) in units for c in users):
                cost_f += 1
        if cost_q < cost_f:
            for n, u in group.values():
                units[id(n)] = u
            return True
    return False


def _all_quantized_consumers(t: gs.Tensor, units: dict[int, Unit]) -> bool:
    if not t.outputs:
        return False
    for c in t.outputs:
        u = units.get(id(c))
        if u is None or not any(c.inputs[i] is t for i in u.act_inputs):
            return False
    return True


def _set_output(u: Unit, units: dict[int, Unit], ctx: PlanContext) -> None:
    node = u.node
    out = node.outputs[0]
    if node.op in ("MatMul", "Gemm"):
        tail = tail_of(u.bias_add.outputs[0] if u.bias_add is not None else out, ctx)
        if tail:
            # onnxruntime leaves DQ -> MatMul -> Relu unfused unless a Q follows the Relu
            u.tail = tail
            u.out = tail[0].outputs[0]
        elif u.bias_add is None and id(out) not in ctx.outputs and _all_quantized_consumers(out, units) \
                and ctx.only_main_consumers(out):
            u.out = out
        return
    tail = tail_of(out, ctx) if not u.shares_params else []
    u.tail = tail
    u.out = tail[0].outputs[0] if tail else out
    if ctx.dtype(u.out) not in (None, np.dtype(np.float32)):
        u.out = None


# --------------------------------------------------------------------------------------
# Dynamic and weight-only modes: which layers get quantized weights
# --------------------------------------------------------------------------------------

#: Ops each weight mode rewrites (``op_types`` narrows them).
WEIGHT_MODE_OPS = {"dynamic": ("MatMul", "Gemm", "LSTM"), "weight-only": ("MatMul",)}


def select_weight_layers(model, index: ShapeIndex, *, mode: str, op_types: Iterable[str] | None,
                         exclude: Iterable[str] = (), skip_first: bool = False,
                         skip_last: bool = False) -> tuple[list[str], dict[str, int]]:
    """The names of the main-graph layers that ``mode`` (``dynamic`` or ``weight-only``)
    rewrites, in graph order, and the count of each reason another layer of the chosen op
    types stays float. ``index`` is the shape index of ``model``."""
    graph = model.graph
    ctx = PlanContext(graph, index, int(model.opset_imports.get("", 13)))
    supported = WEIGHT_MODE_OPS[mode]
    wanted = tuple(op_types) if op_types else supported
    exclude = list(exclude)
    skipped: dict[str, int] = {}
    chosen: list[str] = []
    cands = [n for n in graph.nodes if n.op in ("MatMul", "Gemm", "Conv", "LSTM", "GRU")]
    firsts = {cands[0].name} if cands and skip_first else set()
    lasts = {cands[-1].name} if cands and skip_last else set()
    for n in cands:
        if n.op not in wanted:
            continue
        if n.op not in supported:
            reason = f"{n.op} is not supported by mode={mode}"
        elif n.op == "LSTM":
            reason = _lstm_reason(n, ctx)
        elif n.name in firsts:
            reason = "first layer kept in float (skip_first)"
        elif n.name in lasts:
            reason = "last layer kept in float (skip_last)"
        elif matches(n, exclude):
            reason = "excluded by the user"
        else:
            reason = _weight_reason(n, ctx)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            log.debug("quantize: %s kept in float: %s", n.name, reason)
        else:
            chosen.append(n.name)
    for n in _subgraph_nodes(graph):
        if n.op in wanted:
            skipped["inside a subgraph"] = skipped.get("inside a subgraph", 0) + 1
    return chosen, skipped


def _weight_reason(node: gs.Node, ctx: PlanContext) -> str | None:
    """Why a MatMul/Gemm cannot have its weight quantized offline, or None."""
    if not ctx.is_float_act(node.inputs[0]):
        return "input is not a float32 activation"
    w = const_value(node.inputs[1])
    if w is None:
        return "second operand is not a constant (activation x activation)"
    if np.asarray(w).dtype != np.float32:
        return "weight is not float32"
    if np.asarray(w).ndim != 2:
        return "weight is not 2-D"
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)) or float(node.attrs.get("alpha", 1.0)) != 1.0:
            return "Gemm with transA or alpha != 1"
        if len(node.inputs) > 2 and node.inputs[2].name:
            if float(node.attrs.get("beta", 1.0)) != 1.0:
                return "Gemm with beta != 1"
    return None


def _lstm_reason(node: gs.Node, ctx: PlanContext) -> str | None:
    """Why an LSTM cannot become a DynamicQuantizeLSTM, or None."""
    if not ctx.is_float_act(node.inputs[0]):
        return "input is not a float32 activation"
    for t in node.inputs[1:3]:
        w = const_value(t)
        if w is None or np.asarray(w).dtype != np.float32 or np.asarray(w).ndim != 3:
            return "LSTM weights are not float32 constants"
    if node.attrs.get("layout", 0) or node.attrs.get("input_forget", 0):
        return "LSTM with layout=1 or input_forget"
    return None
