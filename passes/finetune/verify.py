"""Whether the torch student computes what onnxruntime computes.

``finetune`` never trains a model that is not the one the user has: before the first
step the interpreted student must reproduce onnxruntime's outputs of the same ONNX model
(cosine at least :data:`MIN_COSINE` per float output, or every element within
``ATOL + RTOL·|x|``; other outputs equal) on the first
samples; after training, onnxruntime on the written model must reproduce the trained
student the same way. When they disagree, every top-graph tensor is captured from
onnxruntime and compared with torch's in execution order, and the first node whose output
differs is named — the op to look at.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from onnxopt.activations import capture
from onnxopt.model import Model
from onnxopt.validate import compare_outputs, make_session

from .module import GraphModule

__all__ = ["MIN_COSINE", "disagreement", "to_torch"]

MIN_COSINE = 0.9999
RTOL, ATOL = 1e-3, 1e-5  # or equal within these, element by element


def to_torch(feeds: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in feeds.items()}


def _differ(name: str, ref: np.ndarray, got: np.ndarray) -> str:
    """Why ``got`` is not ``ref`` (empty when it is, to the bound)."""
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape:
        return f"'{name}' has shape {list(got.shape)} in torch, {list(ref.shape)} in onnxruntime"
    if ref.dtype.kind == "f":
        got = got.astype(ref.dtype)
        m = compare_outputs(name, ref, got, exact=False, min_cosine=MIN_COSINE)
        if m.passed or compare_outputs(name, ref, got, exact=True, rtol=RTOL, atol=ATOL).passed:
            return ""  # near-zero outputs (a sigmoid far from its threshold) make the cosine noise
        return f"'{name}' cosine {m.cosine:.6f} (max abs diff {m.max_abs:.3g})"
    if not np.array_equal(ref, got.astype(ref.dtype)):
        return f"'{name}' differs in {int(np.sum(ref != got.astype(ref.dtype)))} of {ref.size} values"
    return ""


def disagreement(module: GraphModule, model: Model, samples: Sequence[dict[str, np.ndarray]],
                 provider: str = "cpu") -> str:
    """Empty if ``module`` reproduces onnxruntime on ``model`` for every sample; else
    one line: the output that differs and the first node that does."""
    sess = make_session(model, provider)
    names = [o.name for o in sess.get_outputs()]
    for feeds in samples:
        ref = dict(zip(names, sess.run(names, dict(feeds))))
        with torch.no_grad():
            got = module(to_torch(feeds))
        for name, value in zip(module.output_names, got):
            why = _differ(name, ref[name], value.detach().numpy())
            if why:
                return f"output {why}; {_first_node(module, model, feeds, provider)}"
    return ""


def _first_node(module: GraphModule, model: Model, feeds: dict[str, np.ndarray], provider: str) -> str:
    with torch.no_grad():
        _, env = module(to_torch(feeds), record=True)
    names = [t.name for node in module.steps() for t in node.outputs
             if t.name in env and env[t.name].is_floating_point()]
    try:
        ref = next(capture(model, names, [feeds], provider=provider))
    except Exception as exc:  # capturing is a diagnosis; its failure must not hide the finding
        return f"the differing node could not be located ({str(exc).splitlines()[0][:120]})"
    for node in module.steps():
        for t in node.outputs:
            if t.name in ref and t.name in env:
                why = _differ(t.name, ref[t.name], env[t.name].detach().numpy())
                if why:
                    label = node.name or t.name
                    return f"first differing node: '{label}' ({node.op}), output {why}"
    return "no single node differs beyond the bound (the error accumulates)"
