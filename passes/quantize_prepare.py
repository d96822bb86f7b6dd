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
  behind. It is :func:`onnxopt.affine.fold_affine` (the rewrite of ``fold-batchnorm``),
  run here because quantization needs it whether or not that pass ran, and reading
  operands through shape-only ops (Paddle reshapes its per-channel constants).
* :func:`upgrade_opset` raises the default-domain opset (per-channel DequantizeLinear
  needs 13, block quantization 21) with ``onnx.version_converter``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from onnxopt import affine
from onnxopt.graph import const_value
from onnxopt.model import Model, iter_graphs

__all__ = ["QUANTIZED_OPS", "already_quantized", "fold_affine", "upgrade_opset"]

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


# --------------------------------------------------------------------------------------
# Folding per-channel affine ops into the producing layer
# --------------------------------------------------------------------------------------


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


def fold_affine(model: Model) -> int:
    """Fold BatchNormalization and constant per-channel Mul/Div/Add/Sub that directly
    follow a Conv/ConvTranspose/Gemm/MatMul into its weight and bias (every graph), reading
    operands through shape-only ops. Returns the number of ops folded."""
    return affine.fold_affine(model, read=_small_const).total


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
