"""Fold a per-channel affine op into the Conv / ConvTranspose / Gemm / MatMul before it.

In inference, ``BatchNormalization(y) = a * y + d`` per channel, with
``a = scale / sqrt(var + epsilon)`` and ``d = bias - mean * a``; a constant ``Mul`` is the
same with ``d = 0``, ``Div`` with ``a = 1 / c``, ``Add`` with ``a = 1``, ``y - c`` with
``d = -c`` and ``c - y`` with ``a = -1``. When ``y`` is a linear layer's output, ``a`` goes
into the weight of each output channel and ``d`` into the bias (one is created when
absent), and the affine node disappears. This is the one implementation of that rewrite:
the ``fold-batchnorm`` pass folds every chain it finds, ``fuse`` folds a bias ``Add``
through it (the case ``a = 1``), and quantization folds before it places Q/DQ (a
quantized Conv must be followed directly by its QuantizeLinear to run as an integer
kernel, and a weight scaled after quantization quantizes worse than one scaled before).

Folding is done in float64 and cast back to the weight's type. The weight is rewritten
only when ``a`` is not 1 — then it must be a constant; a bias ``Add`` or ``Sub`` needs only
the weight's shape and type — and new weights and biases are new tensors, so a tensor that
other nodes share is never changed under them.

Layouts: Conv weight ``[C_out, C_in/group, k...]`` (output channels on axis 0, bias
``[C_out]``); ConvTranspose weight ``[C_in, C_out/group, k...]`` (output channel
``g * C_out/group + j`` is column ``j`` of group ``g``); Gemm output columns are the rows
of ``B`` when ``transB`` and its columns otherwise, ``C`` becoming ``beta*C*a + d`` with
``beta = 1`` (an added operand may also vary along the rows, as ``C`` may; without ``C`` a
constant operand becomes ``C`` itself); MatMul with a 2-D constant right operand scales its
columns — it has no bias, so a folded BatchNormalization leaves an ``Add`` of ``d`` behind
and an ``Add``/``Sub`` is left alone (``fuse`` turns MatMul+Add into Gemm where it pays).

Folded only when: the layer's output feeds exactly this one node, in the same graph, and
is no graph output; the weight (when scaled) and the bias are constant floats; the operand
is constant (read by the caller's reader), of the weight's type, and broadcasts along the
channel axis only (it must not change the output's shape); a divisor has no zero; the
BatchNormalization is in inference mode (one output, ``training_mode=0``, ``spatial=1``);
an IR < 4 model gets no new initializer (there every initializer must be a graph input).
Anything else is declined with a reason. Chains (Conv -> BatchNormalization -> Mul -> Add)
fold one after the other.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .graph import NameAllocator, const_value
from .model import Model, iter_graphs
from .rewrite import Edits, const_value_if_small
from .tensorinfo import ShapeIndex

__all__ = ["LAYERS", "FOLLOWERS", "AffineFold", "AffineFolder", "AffineStats", "fold_affine"]

log = logging.getLogger(__name__)

#: Ops whose weight and bias absorb the affine map.
LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: Ops that are a per-channel affine map of one input.
FOLLOWERS = frozenset({"BatchNormalization", "Mul", "Div", "Add", "Sub"})
_KINDS = {"BatchNormalization": "bn", "Mul": "mul", "Div": "div", "Add": "add", "Sub": "sub"}
_FLOATS = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})
_DEFAULT_DOMAINS = (None, "", "ai.onnx")

Reader = Callable[[gs.Tensor], "np.ndarray | None"]


def _is_layer(node: gs.Node) -> bool:
    return node.op in LAYERS and node.domain in _DEFAULT_DOMAINS


def _is_follower(node: gs.Node) -> bool:
    return node.op in FOLLOWERS and node.domain in _DEFAULT_DOMAINS


@dataclass
class AffineFold:
    """One decided rewrite: what the layer reads afterwards, and what becomes of the follower."""

    layer: gs.Node
    follower: gs.Node
    kind: str  # "bn", "mul", "div", "add", "sub"
    weight: np.ndarray | None  # None: the weight stays as it is
    bias: np.ndarray | gs.Tensor | None  # None: the bias stays; a tensor: read it as Gemm's C
    gemm_beta_one: bool = False
    matmul_add: np.ndarray | None = None  # MatMul + BN: the Add of d left behind


@dataclass
class AffineStats:
    """What :func:`fold_affine` did."""

    folded: Counter = field(default_factory=lambda: Counter({k: 0 for k in _KINDS.values()}))
    skipped: Counter = field(default_factory=Counter)
    biases_created: int = 0
    nodes_removed: int = 0
    initializers_released: int = 0

    @property
    def total(self) -> int:
        return sum(self.folded.values())


def fold_affine(model: Model, *, index: ShapeIndex | None = None, read: Reader | None = None) -> AffineStats:
    """Fold every affine chain after a Conv/ConvTranspose/Gemm/MatMul of ``model``,
    subgraphs included, and remove what became unused. ``read`` gives an operand's value
    (default: a constant's own, never loading a large one); ``index`` may pass a
    :class:`ShapeIndex` built for this model state (one is built if a fold may need it)."""
    graphs = list(iter_graphs(model.graph))
    layers = [n for g in graphs for n in g.nodes
              if _is_layer(n) and any(_is_follower(u) for t in n.outputs for u in t.outputs)]
    if not layers:
        return AffineStats()
    folder = AffineFolder(model, index=index, read=read, graphs=graphs)
    for layer in layers:
        folder.fold_chain(layer)
    removed, released = folder.edits.commit(model, graphs)
    return AffineStats(folder.folded, folder.skipped, folder.biases_created, removed, released)


class AffineFolder:
    """Decides (:meth:`match`) and applies (:meth:`apply`) affine folds on one model.

    Create it before changing the model: the shape index it builds when none is given
    describes the model as it is then. Applied folds are recorded in ``edits`` (an
    :class:`onnxopt.rewrite.Edits` the caller may share with its own rewrites), whose
    ``commit`` takes the removed nodes out and prunes what became unused. ``names`` may pass
    the caller's name allocator, so that two allocators never hand out the same name.
    """

    def __init__(self, model: Model, *, index: ShapeIndex | None = None, read: Reader | None = None,
                 graphs: list[gs.Graph] | None = None, edits: Edits | None = None,
                 names: Callable[[str], str] | None = None):
        self.model = model
        self.index = index if index is not None else ShapeIndex(model)
        self.read: Reader = read if read is not None else _look
        self.edits = edits if edits is not None else Edits()
        self._names = names
        graphs = graphs if graphs is not None else list(iter_graphs(model.graph))
        self.graph_of = {id(n): g for g in graphs for n in g.nodes}
        self.outputs = {id(t) for g in graphs for t in g.outputs}
        self.opset = model.opset_imports.get("", model.graph.opset)
        self.ir3 = model.ir_version < 4
        self.folded: Counter = Counter({k: 0 for k in _KINDS.values()})
        self.skipped: Counter = Counter()
        self.biases_created = 0

    def names(self, hint: str) -> str:
        if self._names is None:
            self._names = NameAllocator(self.model)
        return self._names(hint)

    def fold_chain(self, layer: gs.Node) -> int:
        """Fold the affine nodes after ``layer`` one after the other; count why the chain
        stopped where an affine node was there. Returns the number folded."""
        done = 0
        while len(layer.outputs) == 1 and layer.outputs[0].name:
            follower = next((u for u in layer.outputs[0].outputs if _is_follower(u)), None)
            if follower is None:
                break
            fold = self.match(layer, follower)
            if isinstance(fold, str):
                self.skipped[fold] += 1
                log.debug("affine fold: %s '%s' + %s '%s' not folded: %s", layer.op, layer.name,
                          follower.op, follower.name, fold)
                break
            self.apply(fold)
            done += 1
        return done

    # ---- match -----------------------------------------------------------------------

    def match(self, layer: gs.Node, follower: gs.Node) -> AffineFold | str:
        """The fold of ``follower`` into ``layer``, or the reason it is declined. Changes nothing."""
        if not _is_layer(layer) or not _is_follower(follower):
            return "not_affine"
        if len(layer.outputs) != 1 or len(layer.inputs) < 2:
            return "malformed"
        y = layer.outputs[0]
        if len(y.outputs) != 1 or y.outputs[0] is not follower:
            return "shared_output"
        if id(y) in self.outputs:
            return "graph_output"
        if self.graph_of.get(id(follower)) is not self.graph_of.get(id(layer)):
            return "other_graph"
        if layer.op == "MatMul" and follower.op in ("Add", "Sub"):
            return "matmul_has_no_bias"
        scales = follower.op in ("BatchNormalization", "Mul", "Div") or (
            follower.op == "Sub" and len(follower.inputs) == 2 and follower.inputs[1] is y)
        weight = self._weight(layer, scales)
        if isinstance(weight, str):
            return weight
        w, wshape, dtype = weight
        bias = None
        if len(layer.inputs) > 2 and layer.inputs[2].name:
            bias = const_value(layer.inputs[2], load=False)
            if bias is None:
                return "bias_not_constant"
            bias = np.asarray(bias)
        geometry = self._geometry(layer, wshape)
        if isinstance(geometry, str):
            return geometry
        affine = self._follower_affine(layer, follower, dtype, *geometry)
        if isinstance(affine, str):
            return affine
        return self._rewrite(layer, follower, w, dtype, bias, geometry[0], *affine)

    def _weight(self, layer: gs.Node, scales: bool):
        """(value or None, shape, dtype) of the layer's weight, or a reason. The value is read
        only when the fold rescales the weight; a bias fold needs its shape and type only."""
        t = layer.inputs[1]
        if scales:
            w = const_value(t, load=False)
            if w is None:
                return "weight_not_constant"
            w = np.asarray(w)
            shape, dtype = w.shape, w.dtype
        else:
            w, shape, dtype = None, self.index.static(t), self.index.dtype(t)
            if shape is None:
                return "weight_shape_unknown"
            if dtype is None:
                return "dtype_unknown"
        if np.dtype(dtype) not in _FLOATS:
            return "weight_not_float"
        return w, tuple(shape), np.dtype(dtype)

    def _geometry(self, layer: gs.Node, wshape: tuple) -> tuple[int, int | None, int] | str:
        """(output channels, output rank or None, channel axis; negative from the end)."""
        op, ndim = layer.op, len(wshape)
        if op == "Conv":
            return (wshape[0], ndim, 1) if ndim >= 3 else "malformed"
        if op == "ConvTranspose":
            group = int(layer.attrs.get("group", 1))
            if ndim < 3 or group < 1 or wshape[0] % group:
                return "malformed"
            return wshape[1] * group, ndim, 1
        if op == "Gemm":
            if ndim != 2:
                return "malformed"
            return (wshape[0] if layer.attrs.get("transB", 0) else wshape[1]), 2, -1
        # MatMul: a 2-D constant right operand; the output's rank follows the left one.
        if ndim != 2:
            return "matmul_weight_not_2d"
        rank = self.index.rank(layer.inputs[0])
        rank = None if rank is None else (max(rank, 2) if rank >= 2 else 1)
        return wshape[1], rank, -1

    def _follower_affine(self, layer, follower, dtype, channels, rank, axis):
        """(kind, a, d, operand): the follower as ``a * y + d`` in float64 (``a`` per channel;
        ``d`` per channel, or shaped as Gemm's C for an added operand) and the operand
        tensor (None for a BatchNormalization), or a reason."""
        if follower.op == "BatchNormalization":
            found = self._batchnorm_affine(follower, channels, rank, axis)
            return found if isinstance(found, str) else ("bn", *found, None)
        if len(follower.inputs) != 2 or len(follower.outputs) != 1:
            return "malformed"
        y = layer.outputs[0]
        first = follower.inputs[0] is y
        other = follower.inputs[1] if first else follower.inputs[0]
        if other is y:
            return "operand_not_constant"
        c = self.read(other)
        if c is None:
            return "operand_not_constant"
        c = np.asarray(c)
        if c.dtype != dtype:
            return "operand_type"
        op = follower.op
        if layer.op == "Gemm" and op in ("Add", "Sub"):
            vector = _gemm_operand(c, channels, self.index.dims(y))
        else:
            vector = _per_channel(c, channels, rank, axis)
        if vector is None:
            return "operand_not_per_channel"
        ones, zeros = np.ones(channels), np.zeros(channels)
        if op == "Mul":
            return "mul", vector, zeros, other
        if op == "Div":
            if not first:
                return "divisor_not_constant"  # c / y is not affine in y
            if np.any(vector == 0):
                return "divisor_has_zero"
            return "div", 1.0 / vector, zeros, other
        if op == "Add":
            return "add", ones, vector, other
        return ("sub", ones, -vector, other) if first else ("sub", -ones, vector, other)

    def _batchnorm_affine(self, bn: gs.Node, channels: int, rank: int | None, axis: int):
        outs = [t for t in bn.outputs if t.name]
        if len(outs) != 1 or bn.outputs[0] is not outs[0]:
            return "bn_training_outputs"
        if int(bn.attrs.get("training_mode", 0)) != 0:
            return "bn_training_mode"
        if self.opset < 9 and int(bn.attrs.get("spatial", 1)) != 1:
            return "bn_not_spatial"
        if self.opset < 7 and int(bn.attrs.get("is_test", 0)) != 1:
            return "bn_training_mode"
        if len(bn.inputs) != 5:
            return "malformed"
        params = [self.read(t) for t in bn.inputs[1:]]
        if any(p is None for p in params):
            return "bn_params_not_constant"
        scale, b, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
        if any(p.size != channels for p in (scale, b, mean, var)):
            return "bn_params_shape"
        # BatchNormalization normalizes axis 1: the layer's channel axis only when the
        # output is [N, C, ...] for Conv, or 2-D for Gemm/MatMul.
        if axis != 1 and rank != 2:
            return "bn_axis_not_channels"
        eps = float(bn.attrs.get("epsilon", 1e-5))
        a = scale / np.sqrt(var + eps)
        return a, b - mean * a

    # ---- rewrite (computed before anything changes) ------------------------------------

    def _rewrite(self, layer, follower, w, dtype, bias, channels, kind, a, d, operand) -> AffineFold | str:
        op = layer.op
        fold = AffineFold(layer, follower, kind, None if w is None else _scaled(layer, w, a), None)
        adds = kind not in ("mul", "div")
        if op == "MatMul":
            if kind == "bn":
                fold.matmul_add = d.astype(dtype)
        elif op == "Gemm":
            if bias is not None and (bias.ndim > 2 or (bias.ndim and bias.shape[-1] not in (1, channels))):
                return "gemm_bias_shape"
            if bias is None and kind == "add" and isinstance(operand, gs.Constant) \
                    and const_value(operand, load=False) is not None:
                fold.bias = operand  # an initializer is a valid C as it is (a Constant node may come later)
            elif bias is not None or adds:
                beta = float(layer.attrs.get("beta", 1.0))
                c = 0.0 if bias is None else beta * bias.astype(np.float64) * a
                fold.bias = np.asarray(c + d).astype(dtype)
            fold.gemm_beta_one = fold.bias is not None
        elif bias is not None or adds:  # Conv / ConvTranspose: bias [C_out]
            if bias is not None and bias.size != channels:
                return "bias_shape"
            b = np.zeros(channels) if bias is None else bias.astype(np.float64).reshape(-1)
            fold.bias = (b * a + d).astype(dtype)
        if self.ir3 and (fold.weight is not None or isinstance(fold.bias, np.ndarray)
                         or fold.matmul_add is not None):
            return "ir3_no_new_initializers"
        return fold

    def apply(self, fold: AffineFold) -> None:
        """Rewrite the graph as ``fold`` decided: the layer reads its new weight and bias and
        produces the follower's output; the follower goes (or becomes MatMul's bias Add)."""
        layer, follower = fold.layer, fold.follower
        y = layer.outputs[0]
        inputs = list(layer.inputs)
        base = inputs[1].name or layer.name or layer.op
        if fold.weight is not None:
            inputs[1] = gs.Constant(self.names(f"{base}_folded"), fold.weight)
        if fold.bias is not None:
            b = fold.bias if isinstance(fold.bias, gs.Tensor) else gs.Constant(
                self.names(f"{base}_bias_folded"), fold.bias)
            if len(inputs) < 3 or not inputs[2].name:
                self.biases_created += 1
            inputs[2:3] = [b]
        self.edits.rewire(layer, inputs)
        if fold.gemm_beta_one:
            layer.attrs["beta"] = 1.0
        if fold.matmul_add is not None:
            # MatMul + BatchNormalization: the shift stays as an Add, in the BN's place.
            follower.op = "Add"
            follower.attrs.clear()
            vars(follower).get("attr_types", {}).clear()
            self.edits.rewire(follower, [y, gs.Constant(self.names(f"{base}_shift"), fold.matmul_add)])
        else:
            self.edits.take_output(layer, follower)
        self.folded[fold.kind] += 1


def _look(t: gs.Tensor) -> np.ndarray | None:
    """The default operand reader: a constant's value, never loading a large one, and not
    kept on the tensor (a model that is only looked at is written back unchanged)."""
    return const_value_if_small(t, load=False)


def _scaled(layer: gs.Node, w: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The layer's weight with output channel ``i`` scaled by ``a[i]``."""
    w64 = w.astype(np.float64)
    if layer.op == "Conv":
        new = w64 * a.reshape((-1,) + (1,) * (w.ndim - 1))
    elif layer.op == "ConvTranspose":
        group = int(layer.attrs.get("group", 1))
        shape = (group, w.shape[0] // group, w.shape[1]) + w.shape[2:]
        factor = a.reshape((group, 1, w.shape[1]) + (1,) * (w.ndim - 2))
        new = (w64.reshape(shape) * factor).reshape(w.shape)
    elif layer.op == "Gemm" and layer.attrs.get("transB", 0):
        new = w64 * a[:, None]
    else:  # Gemm without transB, MatMul: columns are the output channels
        new = w64 * a[None, :]
    return new.astype(w.dtype)


def _per_channel(c: np.ndarray, channels: int, rank: int | None, axis: int) -> np.ndarray | None:
    """``c`` as a float64 vector over the channels, if ``c`` broadcast against an output of
    rank ``rank`` varies along the channel axis only and leaves the output's shape alone."""
    if c.size == 1:
        if rank is None and c.ndim > 1:
            return None
        if rank is not None and c.ndim > rank:
            return None
        return np.full(channels, float(c.reshape(-1)[0]))
    if rank is None:
        if axis != -1 or c.ndim != 1:
            return None
        rank = 1  # a 1-D operand broadcasts along the last axis of any output
    if c.ndim > rank:
        return None
    padded = (1,) * (rank - c.ndim) + c.shape
    ax = axis % rank
    if any(n != 1 for i, n in enumerate(padded) if i != ax) or padded[ax] != channels:
        return None
    return c.astype(np.float64).reshape(-1)


def _gemm_operand(c: np.ndarray, channels: int, dims: Iterable | None) -> np.ndarray | None:
    """``c`` in float64, if adding it to a Gemm's ``[M, channels]`` output leaves the
    output's shape alone (it may vary along the rows where ``M`` is known): Gemm's C takes it
    as it is."""
    if c.ndim > 2:
        return None
    rows, cols = (1,) * (2 - c.ndim) + c.shape
    known = tuple(dims) if dims is not None and len(tuple(dims)) == 2 else (None, None)
    if cols not in (1, channels) or (rows != 1 and rows != known[0]):
        return None
    return c.astype(np.float64)
