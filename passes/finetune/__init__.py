"""finetune: train the compressed model against the original (knowledge distillation),
end to end, keeping what the compression passes decided.

Pruning, weight sharing, channel removal and quantization move a model's outputs; their
layer-wise repairs (``reconstruct``, ``distill``) cannot undo what needs the whole network
retrained. ``finetune`` retrains it: the model as it stands in the pipeline is the
student, the model as loaded (``ctx.reference``, run on onnxruntime) is the teacher, and
the calibration data is the training set — no labels needed (``labels=`` adds them, as
in ``distill``). The loss is per output: knowledge distillation for classifier-like
outputs, relative MSE or 1 − cosine for maps, embeddings and sequences, chosen
automatically (``loss``), plus optional feature terms on named intermediate tensors
(``hints``, ``NAME`` or ``NAME=WEIGHT``) — what deep conv nets with few samples need.

What trains: the float weights and biases of Conv/ConvTranspose/Gemm/MatMul (a bias in
an Add right after one included) and the scales and biases of the normalization layers
(``include``/``exclude`` name regexes, as in ``prune-magnitude``). What stays: a weight
zeroed by pruning stays zero; a weight shared through a codebook keeps its indices and
trains its centroids (each centroid's gradient the sum over its cluster); removed
channels stay removed (the tensors are smaller); a Q/DQ weight trains through a
straight-through estimator on its fixed grid and the Q/DQ nodes stay where they were.
The trained values are written back into the same tensors — the compact storage's
values and codebooks in place — so the graph keeps its nodes and the file its size.

The student is the ONNX graph interpreted in torch (:mod:`.module` says why no converter
package does it), checked against onnxruntime before the first step — it must reproduce
onnxruntime's outputs to cosine 0.9999, or the pass stops naming the first node that
differs — and again after writing back. A ``holdout`` share of the samples is kept out of
training; fidelity on it is measured before, during (the progress bar shows step, loss
and holdout fidelity) and after, ``patience`` evaluations without improvement stop the
run, and the best state is kept (nothing changes if none beat the start). The same seed
and data give the same model, byte for byte.

With ``workers`` above 1 the same loop runs data-parallel on Ray Train (:mod:`.data_parallel`):
each worker interprets the same student, runs its share of every batch, and the
gradients are summed over the workers before every step.

PyTorch is an optional extra (``pip install 'onnxopt[train]'``); this module imports
without it, and the pass says which extra to install when it is missing. Figures are in
the README's benchmark section.
"""

from __future__ import annotations

import importlib
import re

from onnxopt.errors import PipelineError, UsageError
from onnxopt.framework import Opt, Pass, PassContext, PassResult, register
from onnxopt.model import Model

__all__ = ["Finetune", "EXTRA", "PARALLEL_EXTRA"]

EXTRA = "train"
PARALLEL_EXTRA = "search"  # Ray, with Ray Train: data-parallel training (workers > 1)


@register
class Finetune(Pass):
    """Train the student (the model in the pipeline) to reproduce the teacher (the model
    as loaded) on the calibration data, keeping masks, codebooks, removed channels and
    Q/DQ placement; write the trained values back into the same graph."""

    name = "finetune"
    summary = ("train the compressed model against the original (KD loss), keeping masks, codebooks, "
               "removed channels and Q/DQ placement (needs torch: onnxopt[train])")
    exact = False
    options = {
        "steps": Opt(int, 300, "training steps (Adam)", minimum=1),
        "lr": Opt(float, 1e-3, "learning rate (cosine decay to 5 % of it)", minimum=0.0),
        "weight_decay": Opt(float, 0.0, "decoupled weight decay on the layers' weights (AdamW): weights no "
                            "output needs shrink, for a later pruning step to take", minimum=0.0),
        "batch": Opt(int, 8, "calibration samples per step (0: all)", minimum=0),
        "temperature": Opt(float, 2.0, "softmax temperature T of the distillation term", minimum=0.05),
        "alpha": Opt(float, 0.7, "weight of the distillation term against the labels' (1 without labels)",
                     minimum=0.0, maximum=1.0),
        "loss": Opt(str, "auto", "loss per output: auto (kd for classifier-like outputs, cosine for vectors "
                    "and sequences, mse otherwise), or one for all", choices=("auto", "kd", "mse", "cosine")),
        "hints": Opt(list, [], "intermediate tensors to match too, NAME or NAME=WEIGHT (relative MSE)"),
        "holdout": Opt(float, 0.2, "share of calibration samples kept out of training, on which fidelity "
                       "is measured", minimum=0.0, maximum=0.9),
        "patience": Opt(int, 5, "stop after this many holdout evaluations without improvement (0: never)",
                        minimum=0),
        "eval_every": Opt(int, 0, "steps between holdout evaluations (0: a twentieth of the steps)", minimum=0),
        "seed": Opt(int, None, "seed of the split and the sample order (default: the pipeline's seed)"),
        "labels": Opt(str, "", ".npy/.npz of integer labels, one per row of the classifier output, "
                      "in calibration order"),
        "include": Opt(list, [], "only tensors whose name or node name matches one of these regexes"),
        "exclude": Opt(list, [], "never tensors whose name or node name matches one of these regexes"),
        "samples": Opt(int, 512, "calibration samples to use (0: all)", minimum=0),
        "threads": Opt(int, 0, "torch threads while training, per worker (0: torch's default)", minimum=0),
        "workers": Opt(int, 1, "data-parallel training processes on Ray Train (gloo, CPU), each running its "
                       "share of every batch (needs onnxopt[search]); 1: in this process", minimum=1),
    }

    def __init__(self, **values):
        super().__init__(**values)
        for p in self.opts.include + self.opts.exclude:
            try:
                re.compile(p)
            except re.error as exc:
                raise PipelineError(f"pass '{self.name}': bad name pattern {p!r}: {exc}") from None
        if self.opts.batch and self.opts.workers > self.opts.batch:
            raise PipelineError(f"pass '{self.name}': workers={self.opts.workers} is more than batch="
                                f"{self.opts.batch}: every worker needs a sample of each batch")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        engine = _engine(self.name)
        if self.opts.workers > 1:
            _ray_train(self.name, self.opts.workers)
        return engine.finetune(model, ctx, self.opts, self.name)


def _engine(name: str):
    """The torch side of the pass, or a one-line error naming the extra to install."""
    try:
        return importlib.import_module(f"{__name__}.engine")
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        if missing != "torch" and not missing.startswith("torch."):
            raise
        raise UsageError(f"pass '{name}' needs PyTorch ({exc}): pip install 'onnxopt[{EXTRA}]'") from None


def _ray_train(name: str, workers: int) -> None:
    """Ray Train importable, or a one-line error naming the extra to install."""
    try:
        importlib.import_module("ray.train.torch")
    except ImportError as exc:
        line = " ".join(str(exc).split())[:160]
        raise UsageError(f"pass '{name}' with workers={workers} needs Ray Train ({line}): "
                         f"pip install 'onnxopt[{PARALLEL_EXTRA}]'") from None
