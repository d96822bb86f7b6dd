"""Channel-dependency groups: the channels of a model that must be removed together.

Removing output channel ``c`` of a convolution is only correct if every tensor that
carries that channel loses it too: the BatchNormalization parameters and per-channel
constants applied to it, the input channel ``c`` of every convolution or matrix product
that reads it, the matching channel of every tensor it is added to in a residual
connection, its slot in a Concat, the kernel of a depthwise convolution that filters it.
:func:`analyze` finds these groups on the main graph of a model; :func:`apply_keep`
removes channels from groups, rewriting every member consistently.

How it works. Every op that creates channels with its own weights — Conv, ConvTranspose
(``group=1``), Gemm, MatMul with a constant 2-D right operand — creates a *space* of
channels. Every tensor that carries channels gets a :class:`Layout`: the axis of its
channels and a list of segments, each a range of one space (Concat and Split/Slice make
several or partial segments; a segment of channels nobody may remove is *fixed*). Layouts
flow forward through the ops that keep channels apart (per-channel affine ops, pointwise
activations, pooling, Resize, Pad, Transpose, Reshape/Flatten that keep or merge the
channel axis, ...). Elementwise ops that combine two tensors with channels (residual
``Add``/``Mul``/``Sub``/``Sum``) join their spaces: a networkx graph whose nodes are the
spaces and whose edges are these joins; a group is one connected component. Channels end where a layer reads them with its weights (the
input channels of Conv/Gemm/MatMul; ``channel x spatial`` blocks of rows after a
Flatten).

Safety. An op or pattern the analysis does not understand (a Softmax or reduction over
the channels, a grouped convolution, a Reshape that splits the channel axis, a tensor
read inside an If/Loop body, a graph output, an unknown domain ...) makes every group it
touches un-prunable, with the reason recorded and logged at DEBUG. Graph outputs never
change shape. Weights may be initializers, Constant-node outputs or small constant
expressions (a Reshape of a constant), but never overridable initializers (IR < 4 graph
inputs). Subgraph bodies are left alone.

The result is also shown by ``onnxopt inspect --groups``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from .graph import NameAllocator, const_value, implicit_inputs
from .model import Model, iter_graphs, node_subgraphs
from .shapes import infer_shapes

__all__ = [
    "FIXED",
    "Seg",
    "Layout",
    "Member",
    "Group",
    "ChannelGroups",
    "analyze",
    "apply_keep",
    "write_constant",
    "param_value",
    "layer_key",
    "channel_maps",
    "CHANNEL_MAP_KEY",
    "LAYER_OPS",
]

log = logging.getLogger(__name__)

#: Space id of a segment of channels that may not be removed.
FIXED = -1
#: Metadata key under which pruning records, per tensor, which of the original
#: channels survive (used to match a student's layers with the teacher's).
CHANNEL_MAP_KEY = "onnxopt.channel_map"
#: Ops whose constant weights define or read channels.
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

_STD = (None, "", "ai.onnx")

_UNARY = frozenset("""
    Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Elu Selu Celu Gelu Softplus Softsign
    Mish Exp Log Abs Neg Sqrt Reciprocal Clip Floor Ceil Round Sign Erf Sin Cos Tan Asin Acos Atan
    Sinh Cosh Asinh Acosh Atanh Identity Cast Not IsNaN IsInf ThresholdedRelu Shrink Swish
    BitwiseNot
""".split())
_ELEMENTWISE = frozenset("""
    Add Sub Mul Div Pow Max Min Sum Mean PRelu Where Equal Less Greater LessOrEqual
    GreaterOrEqual And Or Xor Mod BitShift BitwiseAnd BitwiseOr BitwiseXor
""".split())
_POOL = frozenset("""
    MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool
""".split())
_REDUCE = frozenset("""
    ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceSumSquare
""".split())
_HARMLESS = frozenset(["Shape", "Size"])
_CONST_CHAIN = frozenset(["Reshape", "Unsqueeze", "Squeeze", "Identity", "Cast", "Flatten", "Transpose"])


# --------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seg:
    """Channels ``start..stop`` of space ``space`` (``FIXED``: channels kept as they are)."""

    space: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Layout:
    """Where the channels of a tensor are: along ``axis`` (of a tensor of rank ``rank``),
    in the order of ``segs``; each channel spans ``inner`` consecutive positions (a
    channel x spatial block after a Flatten)."""

    axis: int
    rank: int
    segs: tuple[Seg, ...]
    inner: int = 1

    @property
    def channels(self) -> int:
        return sum(s.size for s in self.segs)

    @property
    def width(self) -> int:
        return self.channels * self.inner

    def spaces(self) -> set[int]:
        return {s.space for s in self.segs if s.space != FIXED}

    def moved(self, axis: int, rank: int) -> Layout:
        return Layout(axis, rank, self.segs, self.inner)


@dataclass
class Member:
    """One thing to rewrite when channels of a group go.

    ``kind``: ``"slice"`` (constant input ``index`` of ``node`` is sliced along ``axis``),
    ``"group"`` (a depthwise convolution's ``group`` attribute), ``"shape"`` (entry
    ``info['pos']`` of constant input ``index`` is the channel width times
    ``info['factor']``), ``"reshape"`` (a computed Reshape target replaced by the constant
    ``info['shape']``), ``"split"``, ``"slice_bounds"``. ``role`` says what the sliced
    tensor is: ``out`` (a layer's weight, output axis), ``in`` (a layer's weight, input
    axis), ``tied`` (a depthwise kernel), ``bias``, ``bn_scale``/``bn_bias``/``bn_mean``/
    ``bn_var``, ``param`` (another per-channel constant).
    """

    kind: str
    node: gs.Node
    index: int
    axis: int
    layout: Layout
    role: str = ""
    info: dict = field(default_factory=dict)

    def spaces(self) -> set[int]:
        found = set(self.layout.spaces())
        for lay in self.info.get("outputs", []):
            found |= lay.spaces()
        return found


@dataclass
class Group:
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

    def __init__(self, model: Model, groups: list[Group], members: list[Member],
                 tensors: list[tuple[gs.Tensor, Layout]], root: dict[int, int],
                 skipped: Mapping[str, int] | None = None, joins: nx.Graph | None = None):
        self.skipped = dict(skipped or {})
        #: spaces (nodes) and the residual joins between them (edges, ``where`` = the op)
        self.joins = joins if joins is not None else nx.Graph()
        self.model = model
        self.groups = groups
        self.by_id = {g.id: g for g in groups}
        self.members = members
        self.tensors = tensors
        self._root = root

    def root(self, space: int) -> int:
        return self._root.get(space, space)

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def stats(self) -> dict:
        reasons = Counter()
        for g in self.groups:
            if not g.prunable:
                reasons[_reason_kind(g.reasons[0]) if g.reasons else "unknown"] += 1
        return {"groups": len(self.groups), "prunable": len(self.prunable),
                "layers_skipped": dict(sorted(self.skipped.items())),
                "unprunable": len(self.groups) - len(self.prunable),
                "channels": sum(g.size for g in self.groups),
                "prunable_channels": sum(g.size for g in self.prunable),
                "unprunable_reasons": dict(sorted(reasons.items()))}

    def describe(self) -> list[dict]:
        return [g.describe() for g in self.groups]


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


# --------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------


def param_value(tensor: gs.Tensor, depth: int = 4) -> np.ndarray | None:
    """The value of a constant weight: an initializer (not overridable), a Constant
    node's output, or a short chain of Reshape/Unsqueeze/Squeeze/Cast/Identity/Flatten/
    Transpose over constants (exporters write per-channel biases so). None otherwise."""
    value = const_value(tensor)
    if value is not None:
        return np.asarray(value)
    if depth <= 0 or not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.op not in _CONST_CHAIN or node.domain not in _STD or len(node.outputs) != 1:
        return None
    args = [param_value(t, depth - 1) if t.name else None for t in node.inputs]
    if not args or args[0] is None:
        return None
    x = args[0]
    try:
        if node.op in ("Identity",):
            return x
        if node.op == "Cast":
            import onnx

            return x.astype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
        if node.op == "Reshape":
            if len(args) < 2 or args[1] is None:
                return None
            shape = [int(d) for d in args[1]]
            if node.attrs.get("allowzero", 0):
                return x.reshape(shape)
            shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
            return x.reshape(shape)
        if node.op in ("Unsqueeze", "Squeeze"):
            axes = node.attrs.get("axes")
            if axes is None and len(args) > 1:
                if args[1] is None:
                    return None
                axes = [int(a) for a in args[1]]
            if node.op == "Squeeze":
                return np.squeeze(x, axis=tuple(axes)) if axes is not None else np.squeeze(x)
            out = x
            rank = x.ndim + len(axes)
            for a in sorted(a % rank for a in axes):
                out = np.expand_dims(out, a)
            return out
        if node.op == "Flatten":
            axis = int(node.attrs.get("axis", 1)) % max(x.ndim, 1)
            return x.reshape(int(np.prod(x.shape[:axis])), -1)
        if node.op == "Transpose":
            perm = node.attrs.get("perm")
            return np.transpose(x, perm)
    except (ValueError, KeyError, TypeError):
        return None
    return None


def layer_key(node: gs.Node) -> str:
    """How a layer is matched between a teacher and its compressed student: the name of
    its first output tensor (passes keep tensor names; exporters often leave node names
    empty)."""
    return node.outputs[0].name if node.outputs else node.name


def channel_maps(model: Model) -> dict[str, list[int]]:
    """Tensor name -> the original channels its channels are (recorded by pruning)."""
    for key, value in model.metadata_props:
        if key == CHANNEL_MAP_KEY:
            try:
                data = json.loads(value)
            except ValueError:
                return {}
            return {k: [int(i) for i in v] for k, v in data.items()}
    return {}


def _set_channel_maps(model: Model, maps: Mapping[str, list[int]]) -> None:
    text = json.dumps({k: list(map(int, v)) for k, v in sorted(maps.items())}, separators=(",", ":"))
    props = [(k, v) for k, v in model.metadata_props if k != CHANNEL_MAP_KEY]
    if maps:
        props.append((CHANNEL_MAP_KEY, text))
    model.metadata_props = props


# --------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------


class _Analysis:
    def __init__(self, model: Model):
        self.model = model
        self.graph = model.graph
        self.info = infer_shapes(model)
        self._concrete: dict | None = None
        self.skipped: Counter = Counter()
        self.layouts: dict[int, Layout] = {}
        self.tensor_of: dict[int, gs.Tensor] = {}
        self.order: list[int] = []
        self.size: dict[int, int] = {}
        self.origin: dict[int, str] = {}
        self.joins = nx.Graph()  # spaces; an edge = two spaces added position-wise
        self.reasons: dict[int, list[str]] = {}
        self.members: list[Member] = []
        self.main_nodes = {id(n) for n in self.graph.nodes}

    # ---- spaces ----------------------------------------------------------------------

    def new_space(self, size: int, origin: str) -> int:
        sid = len(self.size)
        self.size[sid] = size
        self.origin[sid] = origin
        self.joins.add_node(sid)
        return sid

    def union(self, a: int, b: int, where: str) -> None:
        self.joins.add_edge(a, b, where=where)

    def block(self, spaces: Iterable[int], reason: str) -> None:
        for s in spaces:
            if s == FIXED:
                continue
            self.reasons.setdefault(s, [])
            if reason not in self.reasons[s]:
                self.reasons[s].append(reason)
                log.debug("channels of %s not prunable: %s", self.origin[s], reason)

    def block_layout(self, lay: Layout | None, reason: str) -> None:
        if lay is not None:
            self.block(lay.spaces(), reason)

    # ---- tensors ---------------------------------------------------------------------

    def lay(self, t: gs.Tensor) -> Layout | None:
        return self.layouts.get(id(t))

    def set(self, t: gs.Tensor, lay: Layout | None) -> None:
        if lay is None or not lay.segs:
            return
        self.layouts[id(t)] = lay
        if id(t) not in self.tensor_of:
            self.tensor_of[id(t)] = t
            self.order.append(id(t))

    def shape(self, t: gs.Tensor) -> tuple | None:
        """Shape from symbolic inference (dims are ints or names), or None."""
        if isinstance(t, gs.Constant):
            return tuple(int(d) for d in t.shape)
        v = param_value(t)
        if v is not None:
            return tuple(v.shape)
        info = self.info.get(t.name)
        if info is not None and info.shape is not None:
            return tuple(info.shape)
        return None

    def cshape(self, t: gs.Tensor) -> tuple | None:
        """Shape with the inputs' dynamic dims set to example values: where symbolic
        inference loses track (a Reshape to a computed shape), this still gives ranks.
        Its dims are one example, never trusted as general sizes."""
        s = self.shape(t)
        return s if s is not None else self.example_shape(t)

    def example_shape(self, t: gs.Tensor) -> tuple | None:
        if isinstance(t, gs.Constant) or param_value(t) is not None:
            return self.shape(t)
        if self._concrete is None:
            self._concrete = _concrete_info(self.model)
        info = self._concrete.get(t.name)
        return None if info is None or info.shape is None else tuple(info.shape)

    def rank(self, t: gs.Tensor) -> int | None:
        lay = self.lay(t)
        if lay is not None:
            return lay.rank
        s = self.cshape(t)
        return None if s is None else len(s)

    def member(self, kind: str, node: gs.Node, index: int, axis: int, lay: Layout, role: str = "",
               **info) -> None:
        self.members.append(Member(kind, node, index, axis, lay, role, info))

    # ---- joining -------------------------------------------------------------------

    def full(self, seg: Seg) -> bool:
        return seg.space != FIXED and seg.start == 0 and seg.stop == self.size[seg.space]

    def join(self, a: Layout, b: Layout, where: str) -> bool:
        """Position-wise: channel i of ``a`` is channel i of ``b``."""
        if a.segs == b.segs and a.inner == b.inner:
            return True
        ok = a.inner == b.inner and len(a.segs) == len(b.segs)
        if ok:
            for sa, sb in zip(a.segs, b.segs):
                if sa == sb:
                    continue
                if sa.size != sb.size or not (self.full(sa) and self.full(sb)):
                    ok = False
                    break
        if not ok:
            self.block(a.spaces() | b.spaces(), f"layout: {where} combines channels laid out differently")
            return False
        for sa, sb in zip(a.segs, b.segs):
            if sa != sb:
                self.union(sa.space, sb.space, where)
        return True

    # ---- the walk --------------------------------------------------------------------

    def run(self) -> None:
        for node in self.graph.nodes:
            try:
                self.visit(node)
            except Exception as exc:  # never let an odd node break the analysis
                lays = [self.lay(t) for t in node.inputs if self.lay(t) is not None]
                for lay in lays:
                    self.block_layout(lay, f"error: {_label(node)}: {type(exc).__name__}: {exc}")
                log.debug("groups: %s raised %s", _label(node), exc)
        outputs = {id(t) for t in self.graph.outputs}
        for tid in outputs:
            lay = self.layouts.get(tid)
            if lay is not None:
                name = next(t.name for t in self.graph.outputs if id(t) == tid)
                self.block_layout(lay, f"output: reaches graph output '{name}'")

    def visit(self, node: gs.Node) -> None:
        op = node.op
        lays = [self.lay(t) for t in node.inputs]
        has = any(lay is not None for lay in lays)
        implicit = implicit_inputs(node) if node_subgraphs(node) else []
        for t in implicit:
            self.block_layout(self.lay(t), f"subgraph: read inside a subgraph of {_label(node)}")
        if node.domain not in _STD:
            for lay in lays:
                self.block_layout(lay, f"op: {node.domain}.{op} {_label(node)} is not understood")
            return
        if op in ("Conv", "ConvTranspose"):
            self.conv(node)
            return
        if op == "Gemm":
            self.gemm(node)
            return
        if op == "MatMul":
            self.matmul(node)
            return
        if not has:
            return
        handler = getattr(self, "op_" + op, None)
        if op in _UNARY:
            handler = self.unary
        elif op in _ELEMENTWISE:
            handler = self.elementwise
        elif op in _POOL:
            handler = self.pool
        elif op in _REDUCE:
            handler = self.reduce
        elif op in _HARMLESS:
            return
        if op not in _ELEMENTWISE and op != "Concat":
            # Single-data ops: channels on a parameter input (a shape, scales, bounds)
            # would change what the op does.
            for lay in lays[1:]:
                self.block_layout(lay, f"op: {_label(node)} uses the channels as a parameter")
            if lays[0] is None:
                return
        if handler is None:
            for lay in lays:
                self.block_layout(lay, f"op: {op} {_label(node)} consumes the channels")
            return
        handler(node)

    # ---- layers ------------------------------------------------------------------------

    def conv(self, node: gs.Node) -> None:
        x = node.inputs[0]
        lay = self.lay(x)
        where = _label(node)
        for t in node.inputs[1:]:
            self.block_layout(self.lay(t), f"weights: {where} reads the channels as weights")
        w = param_value(node.inputs[1]) if len(node.inputs) > 1 else None
        group = int(node.attrs.get("group", 1))
        transpose = node.op == "ConvTranspose"
        if w is None or w.ndim < 3:
            self.skipped["weights are not constant"] += 1
            self.block_layout(lay, f"weights: {where} has no constant weights")
            return
        # Conv weights are [out, in/group, k...]; ConvTranspose weights [in, out/group, k...].
        cin = w.shape[0] if transpose else w.shape[1] * group
        cout = w.shape[1] * group if transpose else w.shape[0]
        has_bias = len(node.inputs) > 2 and node.inputs[2].name != ""
        bias_ok = not has_bias or param_value(node.inputs[2]) is not None
        if lay is not None and (lay.axis != 1 or lay.width != cin):
            self.block_layout(lay, f"layout: {where} reads the channels on another axis")
            lay = None
        out = node.outputs[0]
        if group == 1:
            if lay is not None:
                self.member("slice", node, 1, 0 if transpose else 1, lay, "in")
            if not bias_ok:
                return
            space = self.new_space(cout, where)
            olay = Layout(1, w.ndim, (Seg(space, 0, cout),))
            self.member("slice", node, 1, 1 if transpose else 0, olay, "out")
            if has_bias:
                self.member("slice", node, 2, 0, olay, "bias")
            self.set(out, olay)
            return
        if group == cin and cout == cin and w.shape[1] == 1:
            # Depthwise: output channel c filters input channel c only; both go together.
            if lay is None:
                return
            if not bias_ok:
                self.block_layout(lay, f"weights: {where} has a computed bias")
                return
            self.member("slice", node, 1, 0, lay, "tied")
            if has_bias:
                self.member("slice", node, 2, 0, lay, "bias")
            self.member("group", node, 1, 0, lay, "attr")
            self.set(out, Layout(1, w.ndim, lay.segs))
            return
        self.skipped["grouped convolution"] += 1
        self.block_layout(lay, f"grouped: {where} is a grouped convolution (group={group})")

    def gemm(self, node: gs.Node) -> None:
        a = node.inputs[0]
        lay = self.lay(a)
        for t in node.inputs[1:]:
            self.block_layout(self.lay(t), f"weights: {_label(node)} reads the channels as weights")
        where = _label(node)
        w = param_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or w.ndim != 2:
            self.skipped["weights are not constant"] += 1
            self.block_layout(lay, f"weights: {where} has no constant weights")
            return
        trans_a = int(node.attrs.get("transA", 0))
        trans_b = int(node.attrs.get("transB", 0))
        k_axis, n_axis = (1, 0) if trans_b else (0, 1)
        if lay is not None:
            if trans_a or lay.axis != 1 or lay.width != w.shape[k_axis]:
                self.block_layout(lay, f"layout: {where} reads the channels on another axis")
            else:
                self.member("slice", node, 1, k_axis, lay, "in")
        n = w.shape[n_axis]
        bias = None
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = param_value(node.inputs[2])
            if bias is None:
                return
        space = self.new_space(n, where)
        olay = Layout(1, 2, (Seg(space, 0, n),))
        self.member("slice", node, 1, n_axis, olay, "out")
        if bias is not None and bias.ndim >= 1 and bias.shape[-1] == n and n > 1:
            self.member("slice", node, 2, bias.ndim - 1, olay, "bias")
        elif bias is not None and bias.size != 1 and (bias.ndim == 0 or bias.shape[-1] != 1):
            self.block([space], f"weights: {where} has a bias of shape {list(bias.shape)}")
        self.set(node.outputs[0], olay)

    def matmul(self, node: gs.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        la, lb = self.lay(a), self.lay(b)
        where = _label(node)
        w = param_value(b)
        self.block_layout(lb, f"weights: {where} multiplies by the channels")
        if w is None or w.ndim != 2:
            self.block_layout(la, f"weights: {where} has no constant 2-D weights")
            return
        ra = self.rank(a)
        if la is not None:
            if la.axis != la.rank - 1 or la.width != w.shape[0]:
                self.block_layout(la, f"layout: {where} reads the channels on another axis")
            else:
                self.member("slice", node, 1, 0, la, "in")
        if ra is None or ra < 2:
            return
        n = w.shape[1]
        space = self.new_space(n, where)
        olay = Layout(ra - 1, ra, (Seg(space, 0, n),))
        self.member("slice", node, 1, 1, olay, "out")
        self.set(node.outputs[0], olay)

    # ---- channel-preserving ops ----------------------------------------------------------

    def unary(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        for t in node.inputs[1:]:
            if t.name and node.op == "Clip":
                v = param_value(t)
                if v is None or v.size != 1:
                    self.block_layout(lay, f"param: {_label(node)} has non-scalar bounds")
        if lay is None:
            return
        for out in node.outputs:
            if out.name:
                self.set(out, lay)

    def op_Dropout(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        for out in node.outputs:
            if out.name:
                self.set(out, lay)

    def elementwise(self, node: gs.Node) -> None:
        where = _label(node)
        ranks = [self.rank(t) if t.name else 0 for t in node.inputs]
        with_lay = [(i, self.lay(t)) for i, t in enumerate(node.inputs) if self.lay(t) is not None]
        all_lays = [lay for _, lay in with_lay]
        if any(r is None for r in ranks):
            for lay in all_lays:
                self.block_layout(lay, f"shape: {where} has an operand of unknown rank")
            return
        out_rank = max(ranks)
        axes = {lay.axis + out_rank - lay.rank for lay in all_lays}
        if len(axes) != 1:
            for lay in all_lays:
                self.block_layout(lay, f"layout: {where} combines channels on different axes")
            return
        axis = axes.pop()
        base = all_lays[0]
        ok = True
        for lay in all_lays[1:]:
            ok &= self.join(base, lay, where)
        for i, t in enumerate(node.inputs):
            if not t.name or self.lay(t) is not None:
                continue
            r = ranks[i]
            ax = axis - (out_rank - r)
            if ax < 0:
                continue
            shape = self.shape(t)
            d = shape[ax] if shape is not None else None
            if d == 1:
                continue
            value = param_value(t)
            if value is not None and d == base.width:
                if node.op == "Where" and i == 0:
                    self.block_layout(base, f"param: {where} selects with a per-channel condition")
                    ok = False
                    continue
                self.member("slice", node, i, ax, base.moved(axis, out_rank), "param")
                continue
            self.block_layout(base, f"layout: {where} combines the channels with a tensor that does not carry them")
            ok = False
        if not ok:
            return
        for out in node.outputs:
            self.set(out, base.moved(axis, out_rank))

    def pool(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        if lay.axis != 1:
            self.block_layout(lay, f"layout: {_label(node)} pools over the channel axis")
            return
        if len(node.outputs) > 1 and node.outputs[1].name and node.outputs[1].outputs:
            self.block_layout(lay, f"op: {_label(node)} returns indices that count channels")
            return
        self.set(node.outputs[0], lay)

    def op_BatchNormalization(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        where = _label(node)
        if len([o for o in node.outputs if o.name]) > 1 or int(node.attrs.get("training_mode", 0)):
            self.block_layout(lay, f"op: {where} is in training mode")
            return
        if lay.axis != 1:
            self.block_layout(lay, f"layout: {where} normalizes another axis")
            return
        roles = ("bn_scale", "bn_bias", "bn_mean", "bn_var")
        for i in range(1, 5):
            v = param_value(node.inputs[i])
            if v is None or v.shape != (lay.width,):
                self.block_layout(lay, f"weights: {where} has non-constant parameters")
                return
        for i in range(1, 5):
            self.member("slice", node, i, 0, lay, roles[i - 1])
        self.set(node.outputs[0], lay)

    def op_InstanceNormalization(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        where = _label(node)
        if lay.axis != 1 or lay.inner != 1:
            self.block_layout(lay, f"layout: {where} normalizes another axis")
            return
        for i in (1, 2):
            v = param_value(node.inputs[i])
            if v is None or v.shape != (lay.width,):
                self.block_layout(lay, f"weights: {where} has non-constant parameters")
                return
        self.member("slice", node, 1, 0, lay, "param")
        self.member("slice", node, 2, 0, lay, "param")
        self.set(node.outputs[0], lay)

    def op_LayerNormalization(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        axis = int(node.attrs.get("axis", -1)) % lay.rank
        if lay.axis >= axis:
            self.block_layout(lay, f"reduce: {_label(node)} normalizes across the channels")
            return
        self.set(node.outputs[0], lay)

    def softmax_like(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        opset = self.model.opset_imports.get("", 13)
        axis = int(node.attrs.get("axis", -1 if opset >= 13 else 1)) % lay.rank
        if lay.axis == axis or (opset < 13 and lay.axis >= axis):
            self.block_layout(lay, f"reduce: {_label(node)} normalizes across the channels")
            return
        self.set(node.outputs[0], lay)

    op_Softmax = op_LogSoftmax = op_Hardmax = softmax_like

    def reduce(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
            v = param_value(node.inputs[1])
            if v is None:
                self.block_layout(lay, f"reduce: {_label(node)} reduces computed axes")
                return
            axes = [int(a) for a in np.ravel(v)]
        if not axes:
            if int(node.attrs.get("noop_with_empty_axes", 0)):
                self.set(node.outputs[0], lay)
                return
            self.block_layout(lay, f"reduce: {_label(node)} reduces across the channels")
            return
        axes = sorted(a % lay.rank for a in axes)
        if lay.axis in axes:
            self.block_layout(lay, f"reduce: {_label(node)} reduces across the channels")
            return
        if int(node.attrs.get("keepdims", 1)):
            self.set(node.outputs[0], lay)
        else:
            shift = sum(1 for a in axes if a < lay.axis)
            self.set(node.outputs[0], lay.moved(lay.axis - shift, lay.rank - len(axes)))

    def arg_reduce(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        axis = int(node.attrs.get("axis", 0)) % lay.rank
        if axis == lay.axis:
            self.block_layout(lay, f"reduce: {_label(node)} reduces across the channels")
            return
        if int(node.attrs.get("keepdims", 1)):
            self.set(node.outputs[0], lay)
        else:
            self.set(node.outputs[0], lay.moved(lay.axis - (1 if axis < lay.axis else 0), lay.rank - 1))

    op_ArgMax = op_ArgMin = arg_reduce

    def op_Resize(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        where = _label(node)
        axes = node.attrs.get("axes")
        rank = lay.rank
        pos = lay.axis
        if axes is not None:
            axes = [a % rank for a in axes]
            if lay.axis not in axes:
                self.set(node.outputs[0], lay)
                return
            pos = axes.index(lay.axis)
        scales = param_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        sizes = param_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
        if scales is not None and scales.size:
            if scales.size > pos and float(scales[pos]) == 1.0:
                self.set(node.outputs[0], lay)
                return
            self.block_layout(lay, f"layout: {where} scales the channel axis")
            return
        if sizes is not None and sizes.size > pos and int(sizes[pos]) == lay.width:
            self.member("shape", node, 3, 0, lay, "shape", pos=pos, factor=1)
            self.set(node.outputs[0], lay)
            return
        self.block_layout(lay, f"shape: {where} has computed scales or sizes")

    def op_Upsample(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        scales = node.attrs.get("scales")
        if scales is None and len(node.inputs) > 1:
            v = param_value(node.inputs[1])
            scales = None if v is None else list(np.ravel(v))
        if scales is not None and len(scales) > lay.axis and float(scales[lay.axis]) == 1.0:
            self.set(node.outputs[0], lay)
            return
        self.block_layout(lay, f"layout: {_label(node)} scales the channel axis")

    def op_Pad(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        where = _label(node)
        pads = node.attrs.get("pads")
        if pads is None and len(node.inputs) > 1:
            v = param_value(node.inputs[1])
            pads = None if v is None else [int(p) for p in np.ravel(v)]
        axes = None
        if len(node.inputs) > 3 and node.inputs[3].name:
            v = param_value(node.inputs[3])
            if v is None:
                self.block_layout(lay, f"shape: {where} pads computed axes")
                return
            axes = [int(a) % lay.rank for a in np.ravel(v)]
        if pads is None:
            self.block_layout(lay, f"shape: {where} has computed pads")
            return
        axes = axes if axes is not None else list(range(lay.rank))
        if lay.axis in axes:
            k = axes.index(lay.axis)
            if pads[k] != 0 or pads[k + len(axes)] != 0:
                self.block_layout(lay, f"layout: {where} pads the channel axis")
                return
        self.set(node.outputs[0], lay)

    def op_Transpose(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        perm = node.attrs.get("perm") or list(reversed(range(lay.rank)))
        perm = [int(p) for p in perm]
        self.set(node.outputs[0], lay.moved(perm.index(lay.axis), lay.rank))

    def _axes(self, node: gs.Node) -> list[int] | None:
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
            v = param_value(node.inputs[1])
            if v is None:
                return None
            axes = [int(a) for a in np.ravel(v)]
        return None if axes is None else [int(a) for a in axes]

    def op_Squeeze(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        axes = self._axes(node)
        if axes is None:
            shape = self.shape(node.inputs[0])
            if shape is None or any(not isinstance(d, int) for d in shape):
                self.block_layout(lay, f"shape: {_label(node)} squeezes unknown axes")
                return
            axes = [i for i, d in enumerate(shape) if d == 1]
        axes = [a % lay.rank for a in axes]
        if lay.axis in axes:
            self.block_layout(lay, f"layout: {_label(node)} squeezes the channel axis")
            return
        shift = sum(1 for a in axes if a < lay.axis)
        self.set(node.outputs[0], lay.moved(lay.axis - shift, lay.rank - len(axes)))

    def op_Unsqueeze(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        axes = self._axes(node)
        if axes is None:
            self.block_layout(lay, f"shape: {_label(node)} unsqueezes computed axes")
            return
        rank = lay.rank + len(axes)
        inserted = {a % rank for a in axes}
        src = 0
        for pos in range(rank):
            if pos in inserted:
                continue
            if src == lay.axis:
                self.set(node.outputs[0], lay.moved(pos, rank))
                return
            src += 1

    def op_Flatten(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        where = _label(node)
        shape = self.shape(node.inputs[0])
        axis = int(node.attrs.get("axis", 1)) % max(lay.rank, 1) if lay.rank else 0
        if shape is None:
            self.block_layout(lay, f"shape: {where} flattens a tensor of unknown shape")
            return
        if lay.axis < axis:
            before = shape[:lay.axis]
            after = shape[lay.axis + 1:axis]
            if _prod(before) != 1 or _prod(after) is None:
                self.block_layout(lay, f"shape: {where} merges the channels with dimensions before them")
                return
            self.set(node.outputs[0], Layout(0, 2, lay.segs, lay.inner * _prod(after)))
            return
        between = shape[axis:lay.axis]
        after = shape[lay.axis + 1:]
        if _prod(between) != 1 or _prod(after) is None:
            self.block_layout(lay, f"shape: {where} merges the channels with dimensions of unknown size")
            return
        self.set(node.outputs[0], Layout(1, 2, lay.segs, lay.inner * _prod(after)))

    def op_Reshape(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        where = _label(node)
        in_sym = self.shape(node.inputs[0])
        out_sym = self.shape(node.outputs[0])
        if out_sym is None:  # match on an example, rewrite only from what is general
            in_shape, out_shape = self.example_shape(node.inputs[0]), self.example_shape(node.outputs[0])
        else:
            in_shape, out_shape = in_sym, out_sym
        target = param_value(node.inputs[1])
        allowzero = int(node.attrs.get("allowzero", 0))
        if in_sym is None or in_shape is None or out_shape is None or len(in_shape) != lay.rank:
            self.block_layout(lay, f"shape: {where} reshapes a tensor of unknown shape")
            return
        a, width = lay.axis, lay.width
        if in_shape[a] != width:
            self.block_layout(lay, f"shape: {where} does not see the channel width it expects")
            return
        prefix = _squeeze_ones(in_shape[:a])
        after = _prod(in_sym[a + 1:])
        for j, d in enumerate(out_shape):
            if _squeeze_ones(out_shape[:j]) != prefix:
                continue
            if d == width:
                factor, inner = 1, lay.inner  # the channel axis survives (maybe moved)
            elif after is not None and j == len(out_shape) - 1 and d == width * after:
                factor, inner = after, lay.inner * after  # channels merged with what follows
            else:
                continue
            olay = Layout(j, len(out_shape), lay.segs, inner)
            if target is not None:
                flat = np.ravel(target)
                if flat.size != len(out_shape):
                    break
                entry = int(flat[j])
                if entry > 0:
                    self.member("shape", node, 1, 0, lay, "shape", pos=j, factor=factor)
                elif entry == 0 and (allowzero or j != a or factor != 1):
                    break
                self.set(node.outputs[0], olay)
                return
            # A computed target: replace it by a constant that copies the leading dims (0)
            # and infers the one unknown dim (-1); possible when they line up exactly.
            if allowzero or j != a or tuple(out_shape[:j]) != tuple(in_shape[:a]):
                break
            rest = list(out_shape[j + 1:])
            if factor != 1:
                new_shape = [0] * j + [-1]
            elif not rest and _prod(in_sym[a + 1:]) == 1:
                new_shape = [0] * (j + 1)
            elif len(rest) == 1:
                new_shape = [0] * (j + 1) + [-1]
            elif out_sym is not None:
                unknown = [k for k, dd in enumerate(rest) if not isinstance(dd, (int, np.integer))]
                if len(unknown) > 1:
                    break
                unknown = unknown or [len(rest) - 1]
                new_shape = [0] * (j + 1) + [-1 if k in unknown else int(dd) for k, dd in enumerate(rest)]
            else:
                break
            self.member("reshape", node, 1, 0, lay, "shape", shape=new_shape)
            self.set(node.outputs[0], olay)
            return
        self.block_layout(lay, f"shape: {where} splits or moves the channel axis")

    def op_Concat(self, node: gs.Node) -> None:
        where = _label(node)
        lays = [self.lay(t) for t in node.inputs]
        present = [lay for lay in lays if lay is not None]
        rank = present[0].rank
        axis = int(node.attrs.get("axis", 0)) % rank
        if any(lay.rank != rank for lay in present):
            for lay in present:
                self.block_layout(lay, f"shape: {where} concatenates tensors of different ranks")
            return
        if all(lay.axis == axis for lay in present):
            segs: list[Seg] = []
            for t, lay in zip(node.inputs, lays):
                if lay is not None:
                    if lay.inner != 1:
                        self.block_layout(lay, f"layout: {where} concatenates flattened channels")
                        for other in present:
                            self.block_layout(other, f"layout: {where} concatenates flattened channels")
                        return
                    segs.extend(lay.segs)
                    continue
                shape = self.shape(t)
                d = shape[axis] if shape is not None and len(shape) == rank else None
                if not isinstance(d, int):
                    for other in present:
                        self.block_layout(other, f"shape: {where} concatenates a tensor of unknown size")
                    return
                if d:
                    segs.append(Seg(FIXED, 0, d))
            self.set(node.outputs[0], Layout(axis, rank, tuple(_merge_fixed(segs))))
            return
        if all(lay.axis != axis for lay in present) and len(present) == len(lays) and \
                len({lay.axis for lay in present}) == 1:
            base = present[0]
            ok = True
            for lay in present[1:]:
                ok &= self.join(base, lay, where)
            if ok:
                self.set(node.outputs[0], base)
            return
        for lay in present:
            self.block_layout(lay, f"layout: {where} concatenates the channels with a tensor that does not carry them")

    def op_Split(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        where = _label(node)
        axis = int(node.attrs.get("axis", 0)) % lay.rank
        outs = [o for o in node.outputs]
        if axis != lay.axis:
            for o in outs:
                if o.name:
                    self.set(o, lay)
            return
        if lay.inner != 1:
            self.block_layout(lay, f"layout: {where} splits flattened channels")
            return
        split = node.attrs.get("split")
        from_input = False
        if split is None and len(node.inputs) > 1 and node.inputs[1].name:
            v = param_value(node.inputs[1])
            if v is None:
                self.block_layout(lay, f"shape: {where} splits by computed sizes")
                return
            split = [int(s) for s in np.ravel(v)]
            from_input = True
        if split is None:
            n = len(outs)
            if lay.width % n:
                self.block_layout(lay, f"shape: {where} splits unevenly")
                return
            split = [lay.width // n] * n
        if sum(split) != lay.width or len(split) != len(outs):
            self.block_layout(lay, f"shape: {where} split sizes do not add up")
            return
        pieces = []
        start = 0
        for size in split:
            pieces.append(_sub_layout(lay, start, start + size))
            start += size
        self.member("split", node, 1, 0, lay, "shape", outputs=pieces, from_input=from_input)
        for o, piece in zip(outs, pieces):
            if o.name:
                self.set(o, piece)

    def op_Slice(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        where = _label(node)
        if "starts" in node.attrs:  # opset < 10: bounds are attributes
            starts, ends = node.attrs["starts"], node.attrs["ends"]
            axes = node.attrs.get("axes", list(range(len(starts))))
            steps = [1] * len(starts)
            const_inputs = False
        else:
            ins = list(node.inputs) + [gs.Variable("")] * (5 - len(node.inputs))
            vals = [param_value(t) if t.name else None for t in ins[1:5]]
            if vals[0] is None or vals[1] is None or (ins[3].name and vals[2] is None) or \
                    (ins[4].name and vals[3] is None):
                self.block_layout(lay, f"shape: {where} slices by computed bounds")
                return
            starts = [int(v) for v in np.ravel(vals[0])]
            ends = [int(v) for v in np.ravel(vals[1])]
            axes = [int(v) for v in np.ravel(vals[2])] if vals[2] is not None else list(range(len(starts)))
            steps = [int(v) for v in np.ravel(vals[3])] if vals[3] is not None else [1] * len(starts)
            const_inputs = True
        axes = [a % lay.rank for a in axes]
        if lay.axis not in axes:
            self.set(node.outputs[0], lay)
            return
        k = axes.index(lay.axis)
        if steps[k] != 1 or lay.inner != 1:
            self.block_layout(lay, f"layout: {where} slices the channels with a step")
            return
        width = lay.width
        s, e = starts[k], ends[k]
        s = max(0, min(width, s + width if s < 0 else s))
        e = max(0, min(width, e + width if e < 0 else e))
        if e <= s:
            self.block_layout(lay, f"layout: {where} slices away every channel")
            return
        if not const_inputs:
            self.block_layout(lay, f"layout: {where} slices the channels (opset < 10)")
            return
        piece = _sub_layout(lay, s, e)
        self.member("slice_bounds", node, 1, 0, lay, "shape", k=k, start=s, stop=e)
        self.set(node.outputs[0], piece)

    def op_Gather(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        where = _label(node)
        self.block_layout(self.lay(node.inputs[1]), f"op: {where} uses the channels as indices")
        if lay is None:
            return
        axis = int(node.attrs.get("axis", 0)) % lay.rank
        if axis == lay.axis:
            self.block_layout(lay, f"layout: {where} gathers along the channel axis")
            return
        ir = self.rank(node.inputs[1])
        if ir is None:
            self.block_layout(lay, f"shape: {where} has indices of unknown rank")
            return
        new_axis = lay.axis if lay.axis < axis else lay.axis - 1 + ir
        self.set(node.outputs[0], lay.moved(new_axis, lay.rank - 1 + ir))

    def op_Tile(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        reps = param_value(node.inputs[1])
        if reps is not None and int(np.ravel(reps)[lay.axis]) == 1:
            self.set(node.outputs[0], lay)
            return
        self.block_layout(lay, f"layout: {_label(node)} tiles the channel axis")

    def op_Expand(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        shape = param_value(node.inputs[1])
        if shape is None:
            self.block_layout(lay, f"shape: {_label(node)} expands to a computed shape")
            return
        shape = [int(d) for d in np.ravel(shape)]
        rank = max(lay.rank, len(shape))
        axis = lay.axis + rank - lay.rank
        pos = axis - (rank - len(shape))
        if pos >= 0 and shape[pos] not in (1, lay.width):
            self.block_layout(lay, f"shape: {_label(node)} expands the channel axis")
            return
        if pos >= 0 and shape[pos] == lay.width and lay.width != 1:
            self.member("shape", node, 1, 0, lay, "shape", pos=pos, factor=1)
        self.set(node.outputs[0], lay.moved(axis, rank))

    def quant(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        where = _label(node)
        if int(node.attrs.get("block_size", 0)):
            self.block_layout(lay, f"op: {where} quantizes in blocks")
            return
        axis = int(node.attrs.get("axis", 1)) % lay.rank
        for i in (1, 2):
            if i >= len(node.inputs) or not node.inputs[i].name:
                continue
            v = param_value(node.inputs[i])
            if v is None:
                self.block_layout(lay, f"weights: {where} has computed quantization parameters")
                return
            if v.size == 1:
                continue
            if axis != lay.axis or v.shape != (lay.width,):
                self.block_layout(lay, f"layout: {where} quantizes per channel on another axis")
                return
            self.member("slice", node, i, 0, lay, "param")
        self.set(node.outputs[0], lay)

    op_QuantizeLinear = op_DequantizeLinear = quant

    def op_CastLike(self, node: gs.Node) -> None:
        self.set(node.outputs[0], self.lay(node.inputs[0]))


def _label(node: gs.Node) -> str:
    if node.name:
        return f"{node.op} '{node.name}'"
    out = node.outputs[0].name if node.outputs else "?"
    return f"{node.op} -> '{out}'"


def _concrete_info(model: Model) -> dict:
    """Shapes for one example input size (dynamic input dims set to defaults), with the
    small integer computations that feed Reshape/Expand/Slice evaluated along the way —
    ONNX inference gives up on ``Shape -> Cast -> Slice -> Concat -> Reshape`` chains,
    which exporters write for every dynamic reshape."""
    from .data import resolve_shapes

    try:
        shapes, _ = resolve_shapes(model)
    except Exception:
        return {}
    work = model.copy()
    for t in work.graph.inputs:
        if t.name in shapes and isinstance(t, gs.Variable):
            t.shape = list(shapes[t.name])
    info: dict = {}
    shape_inputs = {"Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4),
                    "Unsqueeze": (1,), "Squeeze": (1,), "ConstantOfShape": (0,), "Resize": (2, 3)}
    for _ in range(8):
        info = infer_shapes(work)
        memo: dict[int, np.ndarray | None] = {}
        changed = False
        for node in work.graph.nodes:
            for i in shape_inputs.get(node.op, ()):
                if i >= len(node.inputs) or not node.inputs[i].name or param_value(node.inputs[i]) is not None:
                    continue
                value = _int_value(node.inputs[i], info, memo)
                if value is not None:
                    node.inputs[i] = gs.Constant(node.inputs[i].name + "__example", value)
                    changed = True
        if not changed:
            break
    return info


_INT_OPS = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.floor_divide}


def _int_value(t: gs.Tensor, info: dict, memo: dict, depth: int = 0) -> np.ndarray | None:
    """The value of a small integer tensor computed from shapes, or None."""
    if id(t) in memo:
        return memo[id(t)]
    memo[id(t)] = None
    value = param_value(t)
    if value is None and depth < 32 and isinstance(t, gs.Variable) and len(t.inputs) == 1:
        node = t.inputs[0]
        args = node.inputs
        try:
            if node.op == "Shape":
                ti = info.get(args[0].name)
                if ti is not None and ti.shape is not None and all(isinstance(d, int) for d in ti.shape):
                    full = np.asarray(ti.shape, dtype=np.int64)
                    start = node.attrs.get("start", 0)
                    end = node.attrs.get("end", None)
                    value = full[start:end]
            else:
                vals = [_int_value(a, info, memo, depth + 1) if a.name else None for a in args]
                if node.op in ("Cast", "Identity") and vals[0] is not None:
                    value = vals[0].astype(np.int64) if vals[0].dtype.kind in "iuf" else None
                elif node.op == "Slice" and all(v is not None for v in vals[:3]):
                    steps = vals[4] if len(vals) > 4 and vals[4] is not None else [1]
                    value = vals[0][int(vals[1][0]):int(vals[2][0]):int(steps[0])]
                elif node.op == "Gather" and vals[0] is not None and vals[1] is not None:
                    value = np.take(vals[0], vals[1], axis=int(node.attrs.get("axis", 0)))
                elif node.op == "Concat" and all(v is not None for v in vals):
                    value = np.concatenate([np.atleast_1d(v) for v in vals])
                elif node.op in ("Unsqueeze", "Squeeze") and vals[0] is not None:
                    value = np.reshape(vals[0], (-1,)) if node.op == "Unsqueeze" else np.squeeze(vals[0])
                elif node.op in _INT_OPS and all(v is not None for v in vals):
                    value = _INT_OPS[node.op](vals[0], vals[1])
        except (IndexError, ValueError, TypeError, KeyError):
            value = None
    if value is not None and value.dtype.kind not in "iu":
        value = None
    memo[id(t)] = None if value is None else np.asarray(value, dtype=np.int64)
    return memo[id(t)]


def _prod(dims) -> int | None:
    total = 1
    for d in dims:
        if not isinstance(d, (int, np.integer)) or d < 0:
            return None
        total *= int(d)
    return total


def _squeeze_ones(dims) -> tuple:
    return tuple(d for d in dims if d != 1)


def _merge_fixed(segs: list[Seg]) -> list[Seg]:
    out: list[Seg] = []
    for s in segs:
        if out and s.space == FIXED and out[-1].space == FIXED:
            out[-1] = Seg(FIXED, 0, out[-1].size + s.size)
        else:
            out.append(s)
    return out


def _sub_layout(lay: Layout, start: int, stop: int) -> Layout:
    """Channels at positions ``start..stop`` of ``lay`` (inner must be 1)."""
    segs = []
    off = 0
    for s in lay.segs:
        lo, hi = max(start, off), min(stop, off + s.size)
        if lo < hi:
            if s.space == FIXED:
                segs.append(Seg(FIXED, 0, hi - lo))
            else:
                segs.append(Seg(s.space, s.start + lo - off, s.start + hi - off))
        off += s.size
    return Layout(lay.axis, lay.rank, tuple(segs), lay.inner)


def analyze(model: Model) -> ChannelGroups:
    """The channel-dependency groups of ``model``'s main graph (never raises on odd
    graphs: what it does not understand is un-prunable)."""
    a = _Analysis(model)
    a.run()
    # A group is a connected component of the join graph; its id is its smallest space.
    roots: dict[int, list[int]] = {}
    root_of: dict[int, int] = {}
    for component in nx.connected_components(a.joins):
        spaces = sorted(component)
        roots[spaces[0]] = spaces
        for s in spaces:
            root_of[s] = spaces[0]
    members_by_root: dict[int, list[Member]] = {r: [] for r in roots}
    for m in a.members:
        for r in {root_of[s] for s in m.spaces()}:
            members_by_root[r].append(m)
    tensors_by_root: dict[int, list] = {r: [] for r in roots}
    all_tensors = []
    for tid in a.order:
        t, lay = a.tensor_of[tid], a.layouts[tid]
        all_tensors.append((t, lay))
        for r in {root_of[s] for s in lay.spaces()}:
            tensors_by_root[r].append((t, lay))
    groups = []
    for r, spaces in sorted(roots.items()):
        reasons: list[str] = []
        for s in spaces:
            for why in a.reasons.get(s, []):
                if why not in reasons:
                    reasons.append(why)
        size = a.size[r]
        members = members_by_root[r]
        if not reasons and size < 2:
            reasons.append("size: a single channel")
        groups.append(Group(r, size, sorted(spaces), members, tensors_by_root[r], not reasons, reasons,
                            [a.origin[s] for s in sorted(spaces)]))
    return ChannelGroups(model, groups, a.members, all_tensors, root_of, a.skipped, a.joins)


# --------------------------------------------------------------------------------------
# Rewriting
# --------------------------------------------------------------------------------------


def _positions(lay: Layout, keep: Mapping[int, np.ndarray], root) -> np.ndarray:
    """Indices (along the tensor's channel axis, inner blocks expanded) of the channels
    that stay."""
    parts = []
    off = 0
    for s in lay.segs:
        r = root(s.space) if s.space != FIXED else FIXED
        if r in keep:
            k = keep[r]
            sel = k[(k >= s.start) & (k < s.stop)] - s.start + off
        else:
            sel = np.arange(off, off + s.size)
        parts.append(sel)
        off += s.size
    pos = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if lay.inner > 1:
        pos = (pos[:, None] * lay.inner + np.arange(lay.inner)[None, :]).ravel()
    return pos.astype(np.int64)


def _new_count(lay: Layout, keep, root) -> int:
    return int(_positions(lay, keep, root).size)


def _touched(lay: Layout, keep, root) -> bool:
    return any(root(s) in keep for s in lay.spaces())


@dataclass
class RewriteStats:
    """What :func:`apply_keep` changed."""

    channels_removed: int = 0
    groups_pruned: int = 0
    params_before: int = 0
    params_after: int = 0
    tensors_rewritten: int = 0


def apply_keep(model: Model, groups: ChannelGroups, keep: Mapping[int, Iterable[int]], *,
               overrides: Mapping[tuple[int, int], np.ndarray] | None = None) -> RewriteStats:
    """Keep only channels ``keep[group_id]`` (indices into the group) of each listed
    group; rewrite every member. ``overrides`` gives new full-size values for constant
    inputs ``(id(node), input_index)`` before slicing (neuron merging adds outgoing
    weights so). Everything is computed before the graph is touched; a group that is not
    prunable raises ``ValueError`` without changing anything."""
    overrides = dict(overrides or {})
    root = groups.root
    kept: dict[int, np.ndarray] = {}
    for gid, idx in keep.items():
        g = groups.by_id.get(gid)
        if g is None or not g.prunable:
            raise ValueError(f"group {gid} is not prunable")
        arr = np.unique(np.asarray(list(idx), dtype=np.int64))
        if arr.size == 0 or arr[0] < 0 or arr[-1] >= g.size:
            raise ValueError(f"group {gid}: keep indices out of range (size {g.size})")
        if arr.size < g.size:
            kept[gid] = arr
    stats = RewriteStats()
    if not kept and not overrides:
        return stats

    # ---- decide: new values for every constant input, new attributes -------------------
    slices: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    nodes: dict[int, gs.Node] = {}
    attr_updates: list[tuple[gs.Node, str, object]] = []
    input_values: dict[tuple[int, int], np.ndarray] = {}
    reshape_targets: list[tuple[gs.Node, np.ndarray]] = []
    for m in groups.members:
        if not any(_touched(lay, kept, root) for lay in [m.layout, *m.info.get("outputs", [])]):
            continue
        nodes[id(m.node)] = m.node
        key = (id(m.node), m.index)
        if m.kind == "slice":
            slices.setdefault(key, []).append((m.axis, _positions(m.layout, kept, root)))
        elif m.kind == "group":
            attr_updates.append((m.node, "group", _new_count(m.layout, kept, root)))
        elif m.kind == "shape":
            value = input_values.get(key)
            if value is None:
                value = np.array(param_value(m.node.inputs[m.index]), copy=True)
            flat = value.reshape(-1)
            flat[m.info["pos"]] = _new_count(m.layout, kept, root) * m.info["factor"]
            input_values[key] = flat.reshape(value.shape)
        elif m.kind == "reshape":
            reshape_targets.append((m.node, np.asarray(m.info["shape"], dtype=np.int64)))
        elif m.kind == "split":
            sizes = [_new_count(lay, kept, root) for lay in m.info["outputs"]]
            if any(s == 0 for s in sizes):
                raise ValueError(f"{_label(m.node)}: a split output would lose every channel")
            if m.info["from_input"]:
                input_values[key] = np.asarray(sizes, dtype=np.int64)
            elif "split" in m.node.attrs:
                attr_updates.append((m.node, "split", sizes))
            else:
                attr_updates.append((m.node, "__split__", sizes))
        elif m.kind == "slice_bounds":
            pos = _positions(m.layout, kept, root)
            k = m.info["k"]
            new_start = int(np.sum(pos < m.info["start"]))
            new_stop = int(np.sum(pos < m.info["stop"]))
            if new_stop <= new_start:
                raise ValueError(f"{_label(m.node)}: a slice would lose every channel")
            for idx, val in ((1, new_start), (2, new_stop)):
                kk = (id(m.node), idx)
                arr = input_values.get(kk)
                if arr is None:
                    arr = np.array(param_value(m.node.inputs[idx]), copy=True)
                flat = arr.reshape(-1)
                flat[k] = val
                input_values[kk] = flat.reshape(arr.shape)
                nodes[id(m.node)] = m.node
    for key in overrides:
        slices.setdefault(key, [])
    for key, cuts in slices.items():
        node = nodes.get(key[0])
        if node is None:
            node = next(m.node for m in groups.members if id(m.node) == key[0])
            nodes[key[0]] = node
        base = overrides.get(key)
        value = np.asarray(base if base is not None else param_value(node.inputs[key[1]]))
        before = value.size
        for axis, pos in cuts:
            value = np.take(value, pos, axis=axis)
        if any(d == 0 for d in value.shape):
            raise ValueError(f"{_label(node)}: a weight would lose every channel")
        stats.params_before += before
        stats.params_after += value.size
        input_values[key] = value

    # ---- mutate ----------------------------------------------------------------------
    names = NameAllocator(model)
    replaced: list[gs.Tensor] = []
    for (nid, index), value in input_values.items():
        node = nodes[nid]
        _write_input(model, node, index, value, names, replaced)
        stats.tensors_rewritten += 1
    for node, target in reshape_targets:
        old = node.inputs[1]
        node.inputs[1] = gs.Constant(names(old.name + "_pruned"), target)
        replaced.append(old)
    for node, attr, value in attr_updates:
        if attr == "__split__":
            node.attrs.pop("num_outputs", None)
            opset = model.opset_imports.get("", 13)
            if opset >= 13:
                t = gs.Constant(names(node.outputs[0].name + "_split"), np.asarray(value, dtype=np.int64))
                while len(node.inputs) < 2:
                    node.inputs.append(gs.Variable(""))
                node.inputs[1] = t
            else:
                node.attrs["split"] = value
        else:
            node.attrs[attr] = value
    _drop_dead(model, replaced)

    # declared shapes of the tensors that carry pruned channels
    for t, lay in groups.tensors:
        if not _touched(lay, kept, root) or not isinstance(t, gs.Variable) or t.shape is None:
            continue
        shape = list(t.shape)
        if len(shape) == lay.rank and isinstance(shape[lay.axis], (int, np.integer)):
            shape[lay.axis] = _new_count(lay, kept, root)
            t.shape = shape

    # which original channels survive, per layer output
    maps = channel_maps(model)
    for t, lay in groups.tensors:
        if not _touched(lay, kept, root) or not t.inputs:
            continue
        producer = t.inputs[0]
        if producer.op not in LAYER_OPS and not (producer.op in ("Add", "BatchNormalization") and any(
                i.inputs and i.inputs[0].op in LAYER_OPS for i in producer.inputs)):
            continue
        pos = _positions(lay, kept, root)
        previous = maps.get(t.name)
        maps[t.name] = [int(previous[p]) for p in pos] if previous is not None else [int(p) for p in pos]
    _set_channel_maps(model, maps)
    stats.groups_pruned = len(kept)
    stats.channels_removed = sum(groups.by_id[g].size - len(k) for g, k in kept.items())
    return stats


def write_constant(model: Model, node: gs.Node, index: int, value: np.ndarray) -> None:
    """Give input ``index`` of ``node`` the constant ``value`` (same dtype as the old
    one): in place when nobody else reads the old constant, else as a new constant; a
    missing optional input (a Conv bias) is added. What becomes unused is dropped."""
    if index >= len(node.inputs) or not node.inputs[index].name:
        while len(node.inputs) <= index:
            node.inputs.append(gs.Variable(""))
        names = NameAllocator(model)
        node.inputs[index] = gs.Constant(names((node.outputs[0].name if node.outputs else "w") + "_bias"),
                                         np.ascontiguousarray(value))
        return
    replaced: list = []
    _write_input(model, node, index, value, NameAllocator(model), replaced)
    _drop_dead(model, replaced)


def _write_input(model: Model, node: gs.Node, index: int, value: np.ndarray, names: NameAllocator,
                 replaced: list) -> None:
    """Give input ``index`` of ``node`` the constant ``value``: in place when nobody else
    reads the old constant, else as a new constant."""
    old = node.inputs[index]
    uses = sum(1 for c in old.outputs for t in c.inputs if t is old)
    in_io = any(old is t for g in iter_graphs(model.graph) for t in list(g.inputs) + list(g.outputs))
    dtype = None
    try:
        dtype = param_value(old).dtype
    except AttributeError:
        pass
    value = np.ascontiguousarray(value.astype(dtype) if dtype is not None else value)
    if uses == 1 and not in_io:
        if isinstance(old, gs.Constant):
            old.values = value
            return
        if old.inputs and old.inputs[0].op == "Constant" and len(old.inputs[0].outputs) == 1:
            producer = old.inputs[0]
            for key in [k for k in producer.attrs if k.startswith("value")]:
                del producer.attrs[key]
            producer.attrs["value"] = gs.Constant(old.name, value)
            types = vars(producer).get("attr_types")
            if types:
                types.pop("value", None)
            old.shape = list(value.shape)
            return
    node.inputs[index] = gs.Constant(names(old.name or "pruned"), value)
    replaced.append(old)


def _drop_dead(model: Model, tensors: list[gs.Tensor]) -> None:
    """Remove what became unused: constants and the nodes that computed them."""
    graph = model.graph
    outputs = {id(t) for g in iter_graphs(graph) for t in g.outputs}
    stack = list(tensors)
    dead: set[int] = set()
    while stack:
        t = stack.pop()
        if t.outputs or id(t) in outputs:
            continue
        if isinstance(t, gs.Constant):
            from .graph import release_constant

            release_constant(model, t)
            continue
        if len(t.inputs) != 1:
            continue
        producer = t.inputs[0]
        if id(producer) in dead or any(o.outputs or id(o) in outputs for o in producer.outputs):
            continue
        if not any(producer is n for n in graph.nodes):
            continue
        dead.add(id(producer))
        ins = list(producer.inputs)
        producer.inputs.clear()
        producer.outputs.clear()
        graph.nodes = [n for n in graph.nodes if n is not producer]
        stack.extend(ins)
