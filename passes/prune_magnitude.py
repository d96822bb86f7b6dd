"""prune-magnitude: zero the weights of smallest magnitude, and store the layer sparsely.

The first stage of Deep Compression (Han et al., 2016), without the retraining: small
weights contribute little, so setting them to exactly zero moves the outputs little and
lets the layer be stored as its non-zeros only.

What is pruned is one of (given alone):

* ``sparsity`` — the fraction of each layer's weights to zero (``scope=layer``), or of
  all selected weights together, by one magnitude threshold (``scope=global``);
  ``layers`` gives some layers their own target (``PATTERN=SPARSITY``);
* ``threshold`` — zero every weight with ``|w| < threshold`` (``threshold_unit=absolute``)
  or ``|w| < threshold · std(layer)`` (``std``, the paper's quality parameter);
* ``pattern`` — ``N:M`` semi-structured sparsity: in every group of ``M`` consecutive
  weights along the layer's input dimension keep the ``N`` largest (2:4 is what sparse
  tensor cores run). The input dimension is each op's contraction axis: Conv
  ``[O, I/g, kh, kw]`` axis 1, ConvTranspose ``[I, O/g, ...]`` axis 0, Gemm ``B`` axis 0
  (axis 1 with ``transB``), MatMul ``[..., K, N]`` axis -2.

Only the weight operands of the chosen ops are candidates (``ops``, ``include``/
``exclude`` name patterns, ``min_size``), found and selected as
:mod:`onnxopt.weights.sites` describes; biases and normalization parameters never are.
Ties at the threshold are broken by position, so the same options always zero the same
weights.

A pruned layer is stored in whichever form is smallest
(:mod:`onnxopt.weights.storage_plan`): its non-zeros and their gap-coded positions,
expanded by ``ScatterElements`` when onnxruntime creates the session, which makes session
creation slower; ``storage=dense`` keeps plain tensors with zeros instead (no expansion;
the file is smaller only once compressed by gzip/zip). The stats give per layer the
sparsity reached, the weights zeroed and the storage figures, and the whole file's bytes
before and after.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

import numpy as np

from onnxopt.errors import PipelineError
from onnxopt.framework import Opt, PassContext, register
from onnxopt.model import Model
from onnxopt.weights.compression_pass import Decision, WeightCompressionPass, selection_options
from onnxopt.weights.sites import WeightSite
from onnxopt.weights.storage_plan import model_opset, plan_storage

__all__ = ["PruneMagnitude", "nm_mask"]

log = logging.getLogger(__name__)


@register
class PruneMagnitude(WeightCompressionPass):
    """Zero the smallest-magnitude weights of Conv/ConvTranspose/Gemm/MatMul layers (by
    sparsity, threshold or an N:M pattern) and store each pruned layer sparsely."""

    name = "prune-magnitude"
    summary = "zero the smallest weights (per-layer or global sparsity, threshold, N:M); sparse storage"
    options = {
        "sparsity": Opt(float, 0.5, "fraction of weights to zero (used unless threshold or pattern is given)",
                        minimum=0.0, maximum=0.999),
        "scope": Opt(str, "layer", "sparsity per layer, or one magnitude threshold over all selected layers",
                     choices=("layer", "global")),
        "threshold": Opt(float, None, "zero weights with |w| below this instead of a sparsity", minimum=0.0),
        "threshold_unit": Opt(str, "absolute", "threshold as a value, or in standard deviations of each layer",
                              choices=("absolute", "std")),
        "pattern": Opt(str, None, "N:M pattern instead: keep N of every M weights along the input dimension"),
        **selection_options("pruned", "targets PATTERN=SPARSITY"),
        "storage": Opt(str, "compact", "compact: pruned layers stored sparsely (expanded at session creation); "
                       "dense: plain tensors with zeros", choices=("compact", "dense")),
    }
    target_type = float
    target_range = (0.0, 0.999)
    lead_columns = ("layer", "params", "zeroed", "sparsity")

    def __init__(self, **values):
        super().__init__(**values)
        if self.targets and (self.nm is not None or self.opts.threshold is not None):
            raise PipelineError(f"pass '{self.name}': layers gives per-layer sparsities; "
                                "it does not combine with threshold or pattern")

    def check_options(self) -> None:
        modes = [k for k in ("sparsity", "threshold", "pattern") if self.given.get(k) is not None]
        if len(modes) > 1:
            raise PipelineError(f"pass '{self.name}': give one of sparsity, threshold or pattern; "
                                f"got {', '.join(modes)}")
        if "threshold_unit" in self.given and self.opts.threshold is None:
            raise PipelineError(f"pass '{self.name}': threshold_unit needs a threshold")
        self.nm = _parse_pattern(self.opts.pattern, self.name) if self.opts.pattern is not None else None

    @property
    def dense_storage(self) -> bool:
        return self.opts.storage == "dense"

    def decide(self, model: Model, sites: list[WeightSite], skipped: Counter, ctx: PassContext) -> Decision:
        opset = model_opset(model)
        new_values = self._prune(sites, skipped)
        writes, rows = [], []
        zeroed_total = zeros_total = params_total = 0
        for site, new in zip(sites, new_values):
            zeros_before = int(np.count_nonzero(site.value == 0))
            zeros_after = int(np.count_nonzero(new == 0))
            zeroed = zeros_after - zeros_before
            # A layer changes if it lost weights, or if it already has zeros but is still
            # stored densely when a compact form is smaller.
            write = zeroed > 0 or (not self.dense_storage and site.storage == "dense" and zeros_after > 0
                                   and plan_storage(site.value, opset=opset).kind != "dense")
            rows.append({"layer": site.name, "params": site.size, "zeroed": zeroed,
                         "sparsity": round(zeros_after / site.size, 4) if site.size else 0.0,
                         "op": "/".join(site.ops), "shape": list(site.value.shape), "zeros_before": zeros_before})
            zeroed_total += zeroed
            zeros_total += zeros_after
            params_total += site.size
            if write:
                writes.append((site, new))
        totals = {
            "layers_pruned": len(writes),
            "weights_zeroed": zeroed_total,
            "sparsity": round(zeros_total / params_total, 4) if params_total else 0.0,
            "params": params_total,
        }
        return Decision(writes, rows, totals)

    # ---- the criteria ------------------------------------------------------------------

    def _prune(self, sites: list[WeightSite], skipped: Counter) -> list[np.ndarray]:
        if self.nm is not None:
            n, m = self.nm
            out = []
            for s in sites:
                if s.axis is None:
                    log.debug("%s: its uses disagree on the input axis; not pruned", s.name)
                    skipped["input axis ambiguous for N:M"] += 1
                    out.append(s.value)
                    continue
                out.append(np.where(nm_mask(s.value, s.axis, n, m), s.value, 0).astype(s.value.dtype))
            return out
        if self.opts.threshold is not None:
            out = []
            for s in sites:
                t = self.opts.threshold
                if self.opts.threshold_unit == "std":
                    t *= float(np.std(s.value, dtype=np.float64))
                keep = np.abs(s.value.astype(np.float64)) >= t
                out.append(np.where(keep, s.value, 0).astype(s.value.dtype))
            return out
        targets = [self.target(s) for s in sites]
        counts: list[int | None] = [None] * len(sites)
        pool = []
        for i, (s, target) in enumerate(zip(sites, targets)):
            if target is not None or self.opts.scope == "layer":
                sparsity = self.opts.sparsity if target is None else target
                counts[i] = int(round(sparsity * s.size))
            else:
                pool.append(i)
        out: list[np.ndarray | None] = [None] * len(sites)
        for i, s in enumerate(sites):
            if counts[i] is not None:
                out[i] = _zero_smallest(s.value, counts[i])
        if pool:
            for i, value in zip(pool, _global_prune([sites[i].value for i in pool], self.opts.sparsity)):
                out[i] = value
        return out


def _global_prune(values: list[np.ndarray], sparsity: float) -> list[np.ndarray]:
    total = sum(v.size for v in values)
    k = int(round(sparsity * total))
    mags = np.concatenate([np.abs(v.astype(np.float64)).ravel() for v in values])
    drop = np.zeros(total, bool)
    drop[np.argsort(mags, kind="stable")[:k]] = True
    out, start = [], 0
    for v in values:
        mask = drop[start:start + v.size].reshape(v.shape)
        out.append(np.where(mask, 0, v).astype(v.dtype))
        start += v.size
    return out


def _zero_smallest(value: np.ndarray, count: int) -> np.ndarray:
    if count <= 0:
        return value
    flat = value.ravel().copy()
    order = np.argsort(np.abs(flat.astype(np.float64)), kind="stable")
    flat[order[:count]] = 0
    return flat.reshape(value.shape)


def nm_mask(value: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """Keep-mask of the ``N:M`` pattern: in every run of ``m`` consecutive elements along
    ``axis`` the ``n`` of largest magnitude are kept (a shorter last run keeps up to
    ``n``); ties go to the earlier element."""
    moved = np.moveaxis(np.abs(value.astype(np.float64)), axis, -1)
    lead, length = moved.shape[:-1], moved.shape[-1]
    groups = -(-length // m)
    padded = np.full(lead + (groups * m,), -1.0)  # padding is never kept over a real weight
    padded[..., :length] = moved
    padded = padded.reshape(lead + (groups, m))
    order = np.argsort(-padded, axis=-1, kind="stable")
    keep = np.zeros(padded.shape, bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    keep = keep.reshape(lead + (groups * m,))[..., :length]
    return np.moveaxis(keep, -1, axis)


def _parse_pattern(text: str, pass_name: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise PipelineError(f"pass '{pass_name}': pattern must be N:M with 0 < N < M (e.g. 2:4); got {text!r}")
    return int(m.group(1)), int(m.group(2))
