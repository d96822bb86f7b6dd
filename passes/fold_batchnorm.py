"""fold-batchnorm: fold BatchNormalization, and per-channel constant Mul/Div/Add/Sub, into
the preceding Conv / ConvTranspose / Gemm / MatMul.

Exporters leave inference-mode BatchNormalization, and the scales and shifts of folded
normalizations or rescaled outputs, as separate nodes after the layer that computes their
input; each is a per-channel affine map ``a * y + d`` that the layer's weight and bias can
absorb, so the node costs a full pass over the activation for nothing. The rewrite and its
guards live in :mod:`onnxopt.affine` (shared with ``fuse`` and quantization): chains fold
one after the other, in every graph, subgraphs included; whatever is declined is logged
at DEBUG and counted by reason in the stats (``skipped_<reason>``).
"""

from __future__ import annotations

from onnxopt.affine import fold_affine
from onnxopt.framework import Pass, PassContext, PassResult, register
from onnxopt.model import Model

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
    summary = "fold BatchNormalization and per-channel Mul/Add into the preceding Conv/Gemm/MatMul"
    exact = True
    options = {}

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        done = fold_affine(model)
        stats = {f"{kind}_folded": n for kind, n in done.folded.items()}
        stats.update(biases_created=done.biases_created, nodes_removed=done.nodes_removed)
        stats.update({f"skipped_{k}": v for k, v in sorted(done.skipped.items())})
        return PassResult(modified=done.total > 0, stats=stats)
