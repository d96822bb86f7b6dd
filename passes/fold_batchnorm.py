"""fold-batchnorm: fold BatchNormalization, and per-channel constant Mul/Add, into the
preceding Conv / ConvTranspose / Gemm / MatMul.

In inference, ``BatchNormalization(y) = a * y + d`` per channel, with
``a = scale / sqrt(var + epsilon)`` and ``d = bias - mean * a``; a constant Mul is the
same with ``d = 0`` and a constant Add with ``a = 1``. When ``y`` is a linear layer's
output, ``a`` goes into the weight of each output channel and ``d`` into the bias (one is
created when absent), and the node disappears. Folding is done in float64 and cast back
to the weight's type; the new weight and bias are new tensors, so a weight that other
nodes share is never changed under them.

Layouts: Conv weight ``[C_out, C_in/group, k...]`` (output channels on axis 0, bias
``[C_out]``); ConvTranspose weight ``[C_in, C_out/group, k...]`` (output channel
``g * C_out/group + j`` is column ``j`` of group ``g``); Gemm output columns are the rows
of ``B`` when ``transB`` and its columns otherwise, ``C`` becoming ``beta*C*a + d`` with
``beta = 1``; MatMul with a 2-D constant right operand scales its columns — it has no
bias, so a folded BatchNormalization leaves an ``Add`` of ``d`` behind and a constant
Add is left alone (``fuse`` turns MatMul+Add into Gemm where it pays).

Folded only when: the layer's weight (and bias) are constant floats; its output feeds
exactly this one node, in the same graph, and is no graph output; the Mul/Add operand is
constant, of the same type, and broadcasts along the channel axis only (it must not
change the output's shape); the BatchNormalization is in inference mode (one output,
``training_mode=0``, ``spatial=1``). Anything else is skipped, logged at DEBUG and
counted. Chains (Conv -> BatchNormalization -> Mul -> Add) fold one after the other.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.framework import Pass, PassContext, PassResult, register
from onnxopt.graph import NameAllocator, const_value, graph_outputs
from onnxopt.model import Model, extras, iter_graphs
from onnxopt.shapes import infer_shapes

__all__ = ["FoldBatchNorm"]

log = logging.getLogger(__name__)

_LAYERS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
_FOLDABLE = {"BatchNormalization", "Mul", "Add"}
_FLOATS = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}
_DEFAULT_DOMAINS = (None, "", "ai.onnx")


@dataclass
class _Fold:
    """One decided rewrite: the layer's new weight and bias, and what to remove."""

    layer: gs.Node
    follower: gs.Node
    kind: str  # "bn", "mul", "add"
    weight: np.ndarray
    bias: np.ndarray | None  # None: leave the bias as it is
    gemm_beta_one: bool = False
    matmul_add: np.ndarray | None = None  # MatMul + BN: the Add of d left behind


@register
class FoldBatchNorm(Pass):
    """Fold inference-mode BatchNormalization and per-channel constant Mul/Add into the
    Conv, ConvTranspose, Gemm or MatMul (constant weight) that feeds it.

    Edge cases: a layer output with other consumers or that is a graph output, a
    non-constant or non-float weight, a Mul/Add operand that is not per-channel (or would
    broadcast the output to a larger shape) and training-mode BatchNormalization are left
    alone and counted in ``stats``.
    """

    name = "fold-batchnorm"
    summary = "fold BatchNormalization and per-channel Mul/Add into the preceding Conv/Gemm/MatMul"
    exact = True
    options = {}

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        folder = _Folder(model)
        for g in folder.graphs:
            for layer in list(g.nodes):
                if layer.op in _LAYERS and layer.domain in _DEFAULT_DOMAINS:
                    folder.fold_chain(g, layer)
        folder.drop_removed()
        stats = {"bn_folded": folder.done["bn"], "mul_folded": folder.done["mul"],
                 "add_folded": folder.done["add"], "biases_created": folder.biases_created,
                 "nodes_removed": folder.nodes_removed}
        stats.update({f"skipped_{k}": v for k, v in sorted(folder.skipped.items())})
        modified = any(folder.done.values())
        return PassResult(modified=modified, stats=stats)


class _Folder:
    def __init__(self, model: Model):
        self.model = model
        self.opset = model.opset_imports.get("", model.graph.opset)
        self.outputs = graph_outputs(model.graph)
        self.names = NameAllocator(model)
        self.done: Counter = Counter({"bn": 0, "mul": 0, "add": 0})
        self.skipped: Counter = Counter()
        self.biases_created = 0
        self.nodes_removed = 0
        self._shapes = None
        self.graphs = list(iter_graphs(model.graph))
        self.graph_of = {id(n): g for g in self.graphs for n in g.nodes}
        self.removed: set[int] = set()  # nodes to take out of their graphs at the end
        self.released: set[int] = set()  # initializers nobody reads any more

    def drop_removed(self) -> None:
        """Take the folded nodes and the weights nobody reads out of their graphs (once,
        at the end: removing them one by one would be quadratic)."""
        for g in self.graphs:
            if self.removed:
                g.nodes = [n for n in g.nodes if id(n) not in self.removed]
            if self.released:
                keep = {id(t) for t in (*g.inputs, *g.outputs)}
                ext = extras(g)
                ext.initializers = [t for t in ext.initializers
                                    if id(t) not in self.released or t.outputs or id(t) in keep]

    def shapes(self) -> dict:
        if self._shapes is None:
            self._shapes = infer_shapes(self.model)
        return self._shapes

    def skip(self, reason: str, layer: gs.Node, follower: gs.Node | None = None) -> None:
        self.skipped[reason] += 1
        log.debug("fold-batchnorm: %s '%s'%s not folded: %s", layer.op, layer.name,
                  f" + {follower.op} '{follower.name}'" if follower is not None else "", reason)

    # ---- match -----------------------------------------------------------------------

    def fold_chain(self, g: gs.Graph, layer: gs.Node) -> None:
        while True:
            if len(layer.outputs) != 1 or not layer.outputs[0].name:
                return
            y = layer.outputs[0]
            users = list(y.outputs)
            if not any(u.op in _FOLDABLE and u.domain in _DEFAULT_DOMAINS for u in users):
                return
            if len(users) != 1:
                self.skip("shared_output", layer)
                return
            follower = users[0]
            if id(y) in self.outputs:
                self.skip("graph_output", layer, follower)
                return
            if self.graph_of.get(id(follower)) is not g:
                self.skip("other_graph", layer, follower)
                return
            fold = self.decide(layer, follower)
            if fold is None:
                return
            self.apply(fold)

    def decide(self, layer: gs.Node, follower: gs.Node) -> _Fold | None:
        if layer.op == "MatMul" and follower.op == "Add":
            self.skip("matmul_has_no_bias", layer, follower)
            return None
        if len(layer.inputs) < 2:
            self.skip("malformed", layer, follower)
            return None
        w_tensor = layer.inputs[1]
        w = const_value(w_tensor, load=False)
        if w is None:
            self.skip("weight_not_constant", layer, follower)
            return None
        w = np.asarray(w)
        if w.dtype not in _FLOATS:
            self.skip("weight_not_float", layer, follower)
            return None
        bias_index = 2
        bias = None
        if len(layer.inputs) > bias_index and layer.inputs[bias_index].name:
            bias = const_value(layer.inputs[bias_index], load=False)
            if bias is None:
                self.skip("bias_not_constant", layer, follower)
                return None
            bias = np.asarray(bias)
        geometry = self.geometry(layer, w)
        if geometry is None:
            return None
        channels, rank, axis = geometry

        scale_shift = self.follower_affine(layer, follower, w.dtype, channels, rank, axis)
        if scale_shift is None:
            return None
        kind, a, d = scale_shift
        return self.rewrite(layer, follower, kind, w, bias, a, d, channels)

    def geometry(self, layer: gs.Node, w: np.ndarray) -> tuple[int, int | None, int] | None:
        """(output channels, output rank or None, channel axis; negative from the end)."""
        op = layer.op
        if op == "Conv":
            if w.ndim < 3:
                self.skip("malformed", layer)
                return None
            return w.shape[0], w.ndim, 1
        if op == "ConvTranspose":
            group = int(layer.attrs.get("group", 1))
            if w.ndim < 3 or group < 1 or w.shape[0] % group:
                self.skip("malformed", layer)
                return None
            return w.shape[1] * group, w.ndim, 1
        if op == "Gemm":
            if w.ndim != 2:
                self.skip("malformed", layer)
                return None
            return (w.shape[0] if layer.attrs.get("transB", 0) else w.shape[1]), 2, -1
        # MatMul: a 2-D constant right operand; the output's rank follows the left one.
        if w.ndim != 2:
            self.skip("matmul_weight_not_2d", layer)
            return None
        info = self.shapes().get(layer.inputs[0].name)
        rank = None if info is None or info.rank is None else (max(info.rank, 2) if info.rank >= 2 else 1)
        return w.shape[1], rank, -1

    def follower_affine(self, layer, follower, dtype, channels, rank, axis):
        """("bn"|"mul"|"add", a, d): the follower as ``a * y + d`` per channel (float64)."""
        if follower.op == "BatchNormalization":
            return self.batchnorm_affine(layer, follower, channels, rank, axis)
        if len(follower.inputs) != 2 or len(follower.outputs) != 1:
            self.skip("malformed", layer, follower)
            return None
        y = layer.outputs[0]
        other = follower.inputs[1] if follower.inputs[0] is y else follower.inputs[0]
        if other is y:
            self.skip("operand_not_constant", layer, follower)
            return None
        c = const_value(other, load=False)
        if c is None:
            self.skip("operand_not_constant", layer, follower)
            return None
        c = np.asarray(c)
        if c.dtype != dtype:
            self.skip("operand_type", layer, follower)
            return None
        vector = _per_channel(c, channels, rank, axis)
        if vector is None:
            self.skip("operand_not_per_channel", layer, follower)
            return None
        if follower.op == "Mul":
            return "mul", vector, np.zeros(channels)
        return "add", np.ones(channels), vector

    def batchnorm_affine(self, layer, bn, channels, rank, axis):
        outs = [t for t in bn.outputs if t.name]
        if len(outs) != 1 or bn.outputs[0] is not outs[0]:
            self.skip("bn_training_outputs", layer, bn)
            return None
        if int(bn.attrs.get("training_mode", 0)) != 0:
            self.skip("bn_training_mode", layer, bn)
            return None
        if self.opset < 9 and int(bn.attrs.get("spatial", 1)) != 1:
            self.skip("bn_not_spatial", layer, bn)
            return None
        if self.opset < 7 and int(bn.attrs.get("is_test", 0)) != 1:
            self.skip("bn_training_mode", layer, bn)
            return None
        if len(bn.inputs) != 5:
            self.skip("malformed", layer, bn)
            return None
        params = [const_value(t, load=False) for t in bn.inputs[1:]]
        if any(p is None for p in params):
            self.skip("bn_params_not_constant", layer, bn)
            return None
        scale, b, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
        if any(p.size != channels for p in (scale, b, mean, var)):
            self.skip("bn_params_shape", layer, bn)
            return None
        # BatchNormalization normalizes axis 1: the layer's channel axis only when the
        # output is [N, C, ...] for Conv, or 2-D for Gemm/MatMul.
        if axis != 1 and rank != 2:
            self.skip("bn_axis_not_channels", layer, bn)
            return None
        eps = float(bn.attrs.get("epsilon", 1e-5))
        a = scale / np.sqrt(var + eps)
        return "bn", a, b - mean * a

    # ---- rewrite (computed before anything changes) ------------------------------------

    def rewrite(self, layer, follower, kind, w, bias, a, d, channels) -> _Fold | None:
        op = layer.op
        w64 = w.astype(np.float64)
        if op == "Conv":
            new_w = w64 * a.reshape((-1,) + (1,) * (w.ndim - 1))
        elif op == "ConvTranspose":
            group = int(layer.attrs.get("group", 1))
            shape = (group, w.shape[0] // group, w.shape[1]) + w.shape[2:]
            factor = a.reshape((group, 1, w.shape[1]) + (1,) * (w.ndim - 2))
            new_w = (w64.reshape(shape) * factor).reshape(w.shape)
        elif op == "Gemm":
            new_w = w64 * (a[:, None] if layer.attrs.get("transB", 0) else a[None, :])
        else:
            new_w = w64 * a[None, :]
        fold = _Fold(layer, follower, kind, new_w.astype(w.dtype), None)

        if op == "MatMul":
            if kind == "bn":
                fold.matmul_add = d.astype(w.dtype)
            return fold
        if op == "Gemm":
            beta = float(layer.attrs.get("beta", 1.0))
            if bias is None and kind == "mul":
                return fold
            c = np.zeros(channels) if bias is None else bias.astype(np.float64)
            if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1) or (c.ndim >= 1 and c.shape[-1] not in (1, channels)):
                self.skip("gemm_bias_shape", layer, follower)
                return None
            fold.bias = ((beta * c * a + d) if bias is not None else d).astype(w.dtype)
            fold.gemm_beta_one = True
            return fold
        # Conv / ConvTranspose: bias [C_out]
        if bias is None and kind == "mul":
            return fold
        if bias is not None and bias.size != channels:
            self.skip("bias_shape", layer, follower)
            return None
        b = np.zeros(channels) if bias is None else bias.astype(np.float64).reshape(-1)
        fold.bias = (b * a + d).astype(w.dtype)
        return fold

    def apply(self, fold: _Fold) -> None:
        layer, follower = fold.layer, fold.follower
        y = layer.outputs[0]
        out = follower.outputs[0]
        old_inputs = [t for t in layer.inputs[1:] if t.name] + [t for t in follower.inputs if t is not y]
        base = layer.inputs[1].name or layer.name or layer.op

        layer.inputs[1] = gs.Constant(self.names(f"{base}_folded"), fold.weight)
        if fold.bias is not None:
            new_b = gs.Constant(self.names(f"{base}_bias_folded"), fold.bias)
            if len(layer.inputs) > 2:
                if not layer.inputs[2].name:
                    self.biases_created += 1
                layer.inputs[2] = new_b
            else:
                self.biases_created += 1
                layer.inputs.append(new_b)
        if fold.gemm_beta_one:
            layer.attrs["beta"] = 1.0

        if fold.matmul_add is not None:
            # MatMul + BatchNormalization: the shift stays as an Add, in the BN's place.
            follower.op = "Add"
            follower.attrs.clear()
            vars(follower).get("attr_types", {}).clear()
            follower.inputs.clear()
            follower.inputs.extend([y, gs.Constant(self.names(f"{base}_shift"), fold.matmul_add)])
        else:
            follower.inputs.clear()
            follower.outputs.clear()
            self.removed.add(id(follower))
            layer.outputs[0] = out
            self.nodes_removed += 1
        for t in old_inputs:
            self.nodes_removed += self.drop_if_unused(t)
        self.done[fold.kind] += 1

    def drop_if_unused(self, t: gs.Tensor) -> int:
        """Drop a weight nobody reads any more: the initializer, or its Constant node."""
        if t.outputs or id(t) in self.outputs:
            return 0
        if isinstance(t, gs.Constant):
            self.released.add(id(t))
            return 0
        if len(t.inputs) == 1 and t.inputs[0].op == "Constant" and id(t.inputs[0]) in self.graph_of:
            node = t.inputs[0]
            node.outputs.clear()
            self.removed.add(id(node))
            return 1
        return 0


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
