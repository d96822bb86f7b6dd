"""Preparation steps of the ``quantize`` pass family, run on a working copy before any
quantization decision.

* :func:`already_quantized` finds the ops that say a model is quantized already
  (QuantizeLinear/DequantizeLinear, DynamicQuantizeLinear, ConvInteger/MatMulInteger,
  QLinear*, QGemm, MatMulNBits ...): such a model is left alone, never quantized twice.
* :func:`fold_affine` folds BatchNormalization and per-channel constant Mul/Div/Add/Sub
  that follow a Conv, ConvTranspose, Gemm or MatMul into its weights and bias. A
  quantized Conv must be followed directly by its QuantizeLinear for onnxruntime to fuse
  it into an integer kernel, and a weight scaled after quantization quantizes worse than
  one scaled before; exporters (Paddle, PyTorch in training mode) leave these affine ops
  behind. The fold is exact up to float rounding; it is the same rewrite as the
  simplification pipeline's ``fold-batchnorm``, done here because quantization needs it
  whether or not that pass ran.
* :func:`upgrade_opset` raises the default-domain opset (per-channel DequantizeLinear
  needs 13, block quantization 21) with ``onnx.version_converter``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from onnxopt.graph import NameAllocator, const_value, release_constant
from onnxopt.model import Model, iter_graphs

__all__ = ["QUANTIZED_OPS", "already_quantized", "fold_affine", "upgrade_opset", "drop_if_dead"]

log = logging.getLogger(__name__)

#: Ops whose presence means the model holds quantized computation already.
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
    "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere", "QLinearConvTranspose", "QGemm",
    "QAttention", "QOrderedMatMul", "MatMulNBits", "MatMulBnb4", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "GatherBlockQuantized",
})


def already_quantized(model: Model) -> dict[str, int]:
    """Counts of the quantized ops in the model (subgraphs included); empty if none."""
    found: dict[str, int] = {}
    for g in iter_graphs(model.graph):
        for node in g.nodes:
            if node.op in QUANTIZED_OPS:
                found[node.op] = found.get(node.op, 0) + 1
    return dict(sorted(found.items()))


def drop_if_dead(graph: gs.Graph, tensor: gs.Tensor, model: Model) -> int:
    """Remove the producer chain of ``tensor`` once nothing reads it (and release
    constants it held). Returns the number of nodes removed."""
    removed = 0
    if tensor.outputs or any(tensor is t for t in graph.outputs):
        return 0
    if isinstance(tensor, gs.Constant):
        release_constant(model, tensor)
        return 0
    if len(tensor.inputs) != 1:
        return 0
    node = tensor.inputs[0]
    if not any(node is n for n in graph.nodes):
        return 0
    if any(t.outputs or any(t is o for o in graph.outputs) for t in node.outputs):
        return 0
    inputs = list(node.inputs)
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes = [n for n in graph.nodes if n is not node]
    removed += 1
    for t in inputs:
        removed += drop_if_dead(graph, t, model)
    return removed


# --------------------------------------------------------------------------------------
# Folding per-channel affine ops into the producing layer
# --------------------------------------------------------------------------------------

_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _small_const(t: gs.Tensor, depth: int = 4) -> np.ndarray | None:
    """The value of ``t`` if it is a constant, or a short chain of shape-only ops
    (Reshape, Unsqueeze, Squeeze, Flatten, Identity, Cast) over constants."""
    v = const_value(t)
    if v is not None:
        return np.asarray(v)
    if depth == 0 or len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    if node.domain not in (None, "", "ai.onnx") or len(node.outputs) != 1:
        return None
    args = [_small_const(i, depth - 1) if i.name else None for i in node.inputs]
    if not args or args[0] is None:
        return None
    x = args[0]
    try:
        if node.op == "Identity":
            return x
        if node.op == "Cast":
            return x.astype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
        if node.op == "Reshape" and len(args) > 1 and args[1] is not None:
            shape = [int(d) for d in args[1]]
            shape = [x.shape[i] if d == 0 and not node.attrs.get("allowzero", 0) else d
                     for i, d in enumerate(shape)]
            return x.reshape(shape)
        if node.op in ("Unsqueeze", "Squeeze"):
            axes = node.attrs.get("axes")
            if axes is None and len(args) > 1 and args[1] is not None:
                axes = [int(a) for a in args[1]]
            if node.op == "Unsqueeze":
                out_rank = x.ndim + len(axes)
                for a in sorted(a % out_rank for a in axes):
                    x = np.expand_dims(x, a)
                return x
            if axes is None:
                return np.squeeze(x)
            return np.squeeze(x, axis=tuple(a % x.ndim for a in axes))
        if node.op == "Flatten":
            axis = int(node.attrs.get("axis", 1)) % max(x.ndim, 1)
            return x.reshape(int(np.prod(x.shape[:axis])), -1)
    except (ValueError, KeyError, TypeError):
        return None
    return None


def _channel_vector(c: np.ndarray, channels: int, axis_from_end: int, out_rank: int | None) -> np.ndarray | None:
    """``c`` as a vector over the output channels if it broadcasts as one (a scalar, or
    size ``channels`` along the channel axis and 1 elsewhere), else None."""
    c = np.asarray(c)
    if c.dtype.kind != "f":
        return None
    if c.size == 1:
        if out_rank is not None and c.ndim > out_rank:
            return None
        return np.full(channels, float(c.reshape(())), dtype=np.float64)
    if c.size != channels:
        return None
    if out_rank is not None and c.ndim > out_rank:
        return None
    shape = c.shape
    pos = len(shape) - axis_from_end
    if pos < 0 or shape[pos] != channels:
        return None
    return c.reshape(-1).astype(np.float64)


class _Layer:
    """A layer whose weight (and bias) can absorb a per-output-channel affine map."""

    def __init__(self, node: gs.Node, w: np.ndarray, bias: np.ndarray | None, channels: int,
                 axis_from_end: int, out_rank: int | None):
        self.node = node
        self.w = w
        self.bias = bias
        self.channels = channels
        self.axis_from_end = axis_from_end
        self.out_rank = out_rank


def _layer(node: gs.Node, ranks: dict[str, int]) -> _Layer | None:
    if node.op not in _LAYERS or node.domain not in (None, "", "ai.onnx") or len(node.inputs) < 2:
        return None
    w = const_value(node.inputs[1])
    if w is None or np.asarray(w).dtype != np.float32:
        return None
    w = np.asarray(w)
    out_rank = ranks.get(node.outputs[0].name)
    bias = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    has_bias_input = len(node.inputs) > 2 and bool(node.inputs[2].name)
    if has_bias_input and bias is None:
        return None
    if node.op == "Conv":
        if w.ndim < 3:
            return None
        return _Layer(node, w, bias, w.shape[0], (out_rank or w.ndim) - 1, out_rank or w.ndim)
    if node.op == "ConvTranspose":
        if int(node.attrs.get("group", 1)) != 1 or w.ndim < 3:
            return None
        return _Layer(node, w, bias, w.shape[1], (out_rank or w.ndim) - 1, out_rank or w.ndim)
    if node.op == "Gemm":
        if w.ndim != 2 or int(node.attrs.get("transA", 0)):
            return None
        if float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0:
            return None
        n = w.shape[0] if int(node.attrs.get("transB", 0)) else w.shape[1]
        if bias is not None and _channel_vector(bias, n, 1, 2) is None:
            return None
        return _Layer(node, w, bias, n, 1, 2)
    if node.op == "MatMul":
        if w.ndim != 2:
            return None
        return _Layer(node, w, None, w.shape[1], 1, out_rank)
    return None


def _affine_of(layer: _Layer, consumer: gs.Node, t: gs.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """(a, b) with ``consumer(t) = a * t + b`` per output channel, or None."""
    op = consumer.op
    n, k, r = layer.channels, layer.axis_from_end, layer.out_rank
    if consumer.domain not in (None, "", "ai.onnx"):
        return None
    if op == "BatchNormalization":
        if len(consumer.outputs) != 1 or consumer.inputs[0] is not t or layer.node.op == "MatMul":
            return None
        if int(consumer.attrs.get("training_mode", 0)):
            return None
        vals = [_small_const(x) for x in consumer.inputs[1:5]]
        if any(v is None for v in vals):
            return None
        scale, bias, mean, var = (np.asarray(v, dtype=np.float64).reshape(-1) for v in vals)
        if not all(v.size == n for v in (scale, bias, mean, var)):
            return None
        eps = float(consumer.attrs.get("epsilon", 1e-5))
        a = scale / np.sqrt(var + eps)
        return a, bias - mean * a
    if op not in ("Mul", "Div", "Add", "Sub") or len(consumer.inputs) != 2:
        return None
    first = consumer.inputs[0] is t
    other = consumer.inputs[1] if first else consumer.inputs[0]
    if other is t:
        return None
    c = _small_const(other)
    if c is None:
        return None
    vec = _channel_vector(c, n, k, r)
    if vec is None:
        return None
    if layer.node.op == "MatMul" and op in ("Add", "Sub"):
        return None  # a MatMul has no bias input: the Add is its bias, kept as it is
    if op == "Mul":
        return vec, np.zeros(n)
    if op == "Div":
        if not first or np.any(vec == 0):
            return None
        return 1.0 / vec, np.zeros(n)
    if op == "Add":
        return np.ones(n), vec
    if not first:  # c - t
        return None
    return np.ones(n), -vec


def _scaled_weight(layer: _Layer, a: np.ndarray) -> np.ndarray:
    w = layer.w.astype(np.float64)
    op = layer.node.op
    if op == "Conv":
        w = w * a.reshape((-1,) + (1,) * (w.ndim - 1))
    elif op == "ConvTranspose":
        w = w * a.reshape((1, -1) + (1,) * (w.ndim - 2))
    elif op == "Gemm" and int(layer.node.attrs.get("transB", 0)):
        w = w * a.reshape(-1, 1)
    else:  # Gemm without transB, MatMul: columns are the output channels
        w = w * a.reshape(1, -1)
    return w.astype(np.float32)


def fold_affine(model: Model, ranks: dict[str, int], names: NameAllocator) -> int:
    """Fold BatchNormalization and constant per-channel Mul/Div/Add/Sub that directly
    follow a Conv/ConvTranspose/Gemm/MatMul (sole consumer) into its weight and bias, in
    the main graph. Returns the number of ops folded."""
    graph = model.graph
    folded = 0
    changed = True
    outputs = {id(t) for t in graph.outputs}
    while changed:
        changed = False
        for node in list(graph.nodes):
            if not any(node is n for n in graph.nodes):
                continue
            layer = _layer(node, ranks)
            if layer is None:
                continue
            t = node.outputs[0]
            if id(t) in outputs or len(t.outputs) != 1:
                continue
            consumer = t.outputs[0]
            if not any(consumer is n for n in graph.nodes):
                continue  # read inside a subgraph
            ab = _affine_of(layer, consumer, t)
            if ab is None:
                continue
            a, b = ab
            new_w = _scaled_weight(layer, a)
            bias = np.zeros(layer.channels) if layer.bias is None else np.asarray(layer.bias, np.float64).reshape(-1)
            if bias.size == 1 and layer.channels != 1:
                bias = np.full(layer.channels, float(bias[0]))
            new_b = (bias * a + b).astype(np.float32)
            old_w = node.inputs[1]
            old_b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            w_const = gs.Constant(names(old_w.name + "_folded"), values=new_w)
            node.inputs[1] = w_const
            operands = [x for x in consumer.inputs if x is not t]
            if node.op != "MatMul":
                b_const = gs.Constant(names((old_b.name if old_b is not None else node.name + "_bias")
                                             + "_folded"), values=new_b)
                if old_b is not None:
                    node.inputs[2] = b_const
                else:
                    while len(node.inputs) < 2:
                        node.inputs.append(gs.Variable.empty())
                    node.inputs.append(b_const)
            out = consumer.outputs[0]
            consumer.inputs.clear()
            consumer.outputs.clear()
            graph.nodes = [n for n in graph.nodes if n is not consumer]
            node.outputs[0] = out
            for x in [old_w, old_b, *operands]:
                if x is not None:
                    drop_if_dead(graph, x, model)
            folded += 1
            changed = True
    return folded


# --------------------------------------------------------------------------------------
# Opset
# --------------------------------------------------------------------------------------


def upgrade_opset(model: Model, target: int) -> Model:
    """A copy of ``model`` converted to default-domain opset ``target`` (raises
    ``ValueError`` when onnx's converter cannot do it or its result fails the checker)."""
    proto = model.to_proto()
    try:
        converted = version_converter.convert_version(proto, target)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises many kinds of errors
        raise ValueError(f"onnx.version_converter could not convert to opset {target}: "
                         f"{str(exc).splitlines()[0][:200]}") from exc
    return Model.from_proto(converted, base_dir=model.base_dir, source_path=model.source_path)
