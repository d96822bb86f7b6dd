"""fold-batchnorm: fold BatchNormalization, and per-channel constant Mul/Div/Add/Sub, into
the preceding Conv / ConvTranspose / Gemm / MatMul.

Exporters leave inference-mode BatchNormalization, and the scales and shifts of folded
normalizations or rescaled outputs, as separate nodes after the layer that computes their
input; each is a per-channel affine map ``a * y + d`` that the layer's weight and bias can
absorb, so the node costs a full pass over the activation for nothing. The rewrite and its
guards live in :mod:`onnxopt.affine` (shared with ``fuse`` and quantization): chains fold
one after the other, in every graph, subgraphs included; whatever is declined is logged
at DEBUG and counted by reason in the stats (``skipped_<reason>``). Operands are read as
quantization reads them: a constant, or shape-only ops over constants (Paddle reshapes its
per-channel biases to ``[1, C, 1, 1]`` beside the Add), never a tensor above 1 MiB.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.affine import fold_affine
from onnxopt.framework import Pass, PassContext, PassResult, register
from onnxopt.graph import SHAPE_OPS, const_through_shape_ops
from onnxopt.model import Model
from onnxopt.rewrite import const_value_if_small

__all__ = ["FoldBatchNorm"]


@register
class FoldBatchNorm(Pass):
    """Fold inference-mode BatchNormalization and per-channel constant Mul/Div/Add/Sub into
    the Conv, ConvTranspose, Gemm or MatMul that feeds it.

    Edge cases: a layer output with other consumers or that is a graph output, a weight
    that must be rescaled but is not a constant float, a Mul/Div/Add/Sub operand that is not
    per-channel (or would broadcast the output to a larger shape), ``c / y``, a divisor with
    a zero, training-mode BatchNormalization and new initializers in an IR < 4 model are
    left alone and counted in ``stats``.
    """

    name = "fold-batchnorm"
    # The README's pass table repeats this line (a test compares them): it names Mul/Add for
    # the whole per-channel family, Div and Sub included.
    summary = "fold BatchNormalization and per-channel Mul/Div/Add/Sub into the preceding Conv/ConvTranspose/Gemm/MatMul"
    exact = True
    options = {}

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        done = fold_affine(model, read=_operand)
        stats = {f"{kind}_folded": n for kind, n in done.folded.items()}
        stats.update(biases_created=done.biases_created, nodes_removed=done.nodes_removed)
        stats.update({f"skipped_{k}": v for k, v in sorted(done.skipped.items())})
        return PassResult(modified=done.total > 0, stats=stats)


#: Largest operand read: a per-channel vector or a BatchNormalization parameter, never a weight.
_OPERAND_BYTES = 1 << 20


def _operand(t: gs.Tensor) -> np.ndarray | None:
    """An operand's value: a constant's own (not kept on the tensor, so that a model that is
    only looked at is written back unchanged), or a Reshape/Unsqueeze/Cast ... of constants
    (Paddle reshapes its per-channel constants) — never loading a large one."""
    value = const_value_if_small(t, _OPERAND_BYTES, load=False)
    if value is not None or len(t.inputs) != 1 or t.inputs[0].op not in SHAPE_OPS:
        return value
    return const_through_shape_ops(t, max_bytes=_OPERAND_BYTES)
