"""Preparation steps of the ``quantize`` pass, run on a working copy before any
quantization decision.

* :func:`already_quantized` finds the ops that say a model is quantized already: such a
  model is left alone, never quantized twice.
* :func:`fold_affine` folds BatchNormalization and per-channel constant Mul/Div/Add/Sub
  after a Conv, ConvTranspose, Gemm or MatMul into its weights and bias, whether or not
  ``fold-batchnorm`` ran: a quantized Conv must be followed directly by its QuantizeLinear
  to fuse into an integer kernel, and a weight scaled before quantization quantizes better
  than one scaled after. Operands are read through shape-only ops (Paddle reshapes its
  per-channel constants).
* :func:`upgrade_opset` raises the default-domain opset (per-channel DequantizeLinear
  needs 13, block quantization 21).
"""

from __future__ import annotations

import onnx
from onnx import version_converter

from onnxopt import affine
from onnxopt.graph import const_through_shape_ops
from onnxopt.model import Model, iter_graphs

__all__ = ["QUANTIZED_OPS", "already_quantized", "fold_affine", "upgrade_opset"]

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


def fold_affine(model: Model) -> int:
    """Fold BatchNormalization and constant per-channel Mul/Div/Add/Sub that directly
    follow a Conv/ConvTranspose/Gemm/MatMul into its weight and bias (every graph), reading
    operands through shape-only ops. Returns the number of ops folded."""
    return affine.fold_affine(model, read=const_through_shape_ops).total


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
