"""share-weights: k-means weight sharing — a small float codebook and low-bit indices.

The second stage of Deep Compression (Han et al., 2016), without the retraining: the
weights of a layer are clustered into ``k = 2**bits`` values (1-D k-means), and the
layer stores one ``bits``-bit index per weight plus the ``k`` centroids.

* Initialisation: ``linear`` spaces the centroids evenly over ``[min, max]`` of the
  layer's weights — the paper's choice, which keeps the rare large weights represented —
  or ``kmeans++`` (seeded by the pipeline's seed, so still deterministic).
* Zeros stay exactly zero and outside the clusters: a layer with zeros (pruned by
  ``prune-magnitude``, or natural) reserves codebook entry 0 for 0.0 and clusters its
  non-zeros into ``2**bits - 1`` centroids; both signs of zero become +0.0.
* Lloyd iterations run on the sorted weights with prefix sums (exact 1-D k-means,
  ``O(k log n)`` per iteration), until no assignment changes or ``iterations``; empty
  clusters are dropped from the codebook.
* A layer that already takes at most ``k`` distinct non-zero values keeps them exactly.

Layer selection is as in ``prune-magnitude`` (``ops``, ``include``/``exclude``,
``min_size``; biases and normalization parameters are never candidates); ``layers`` gives
some layers their own width (``PATTERN=BITS``). Each layer is stored in whichever form
is smallest (:mod:`onnxopt.weights.storage_plan`): bit-packed indices expanded by
``BitShift`` → ``Cast`` → ``Gather(codebook)`` → ``Reshape``, with the positions of the
non-zeros gap-coded when the layer is sparse — all folded into plain weights when
onnxruntime creates the session. The stats give per layer the bits, clusters, largest
weight change and the storage figures, and the whole file's bytes before and after.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from onnxopt.framework import Opt, PassContext, register
from onnxopt.model import Model
from onnxopt.weights.compression_pass import Decision, WeightCompressionPass, selection_options
from onnxopt.weights.sites import WeightSite

__all__ = ["ShareWeights", "kmeans_1d"]

log = logging.getLogger(__name__)


@register
class ShareWeights(WeightCompressionPass):
    """Cluster each selected layer's weights into 2**bits shared values (k-means) and store
    a codebook plus bit-packed indices; zeros stay exact zeros."""

    name = "share-weights"
    summary = "k-means weight clustering (Deep Compression): codebook + low-bit indices"
    options = {
        "bits": Opt(int, 5, "index bits per weight: 2**bits shared values per layer", minimum=2, maximum=8),
        "init": Opt(str, "linear", "centroid initialisation: linear over [min, max] (the paper) or kmeans++",
                    choices=("linear", "kmeans++")),
        "iterations": Opt(int, 50, "most Lloyd iterations per layer", minimum=1),
        **selection_options("shared", "widths PATTERN=BITS"),
    }
    target_type = int
    target_range = (2, 8)
    lead_columns = ("layer", "params", "bits", "clusters")

    def decide(self, model: Model, sites: list[WeightSite], skipped: Counter, ctx: PassContext) -> Decision:
        """Cluster every layer (its storage is planned when it is written)."""
        rng = np.random.default_rng(ctx.seed)
        writes, rows = [], []
        with ctx.progress.task(f"{self.name}: clustering", total=len(sites)) as advance:
            for site in sites:
                bits = self.target(site)
                bits = self.opts.bits if bits is None else bits
                value = site.value
                zero = value == 0
                nonzero = value[~zero].astype(np.float64)
                k = 2**bits - (1 if zero.any() else 0)
                distinct = np.unique(nonzero).size
                if distinct <= k and site.storage in ("dense-idx", "sparse-idx") and not np.signbit(value[zero]).any():
                    log.debug("%s already holds %d values (<= %d): left as is", site.name, distinct, k)
                    skipped["already shared"] += 1
                    advance(1)
                    continue
                if nonzero.size:
                    centroids, labels = kmeans_1d(nonzero, k, init=self.opts.init,
                                                  iterations=self.opts.iterations, rng=rng)
                    shared = np.zeros(value.shape, value.dtype)
                    shared[~zero] = centroids.astype(value.dtype)[labels]
                else:
                    centroids = np.zeros(0)
                    shared = np.zeros(value.shape, value.dtype)
                change = float(np.max(np.abs(shared.astype(np.float64) - value))) if value.size else 0.0
                writes.append((site, shared))
                rows.append({"layer": site.name, "params": site.size, "bits": bits,
                             "clusters": int(np.unique(shared[shared != 0]).size),
                             "max_abs_change": change, "op": "/".join(site.ops), "shape": list(value.shape)})
                advance(1)
        totals = {"layers_shared": len(writes), "params": sum(r["params"] for r in rows), "bits": self.opts.bits}
        return Decision(writes, rows, totals)


def kmeans_1d(values: np.ndarray, k: int, *, init: str = "linear", iterations: int = 50,
              rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact 1-D k-means (Lloyd) of ``values`` into at most ``k`` clusters.

    Returns ``(centroids, labels)``: the used centroids in increasing order and, per
    value, the index of its centroid. A value on the midpoint of two centroids goes to
    the lower one. With at most ``k`` distinct values, those are the centroids.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return np.zeros(0), np.zeros(0, np.int64)
    order = np.argsort(v, kind="stable")
    s = v[order]
    distinct = np.unique(s)
    if distinct.size <= k:
        labels = np.searchsorted(distinct, v)
        return distinct, labels
    if init == "linear":
        c = np.linspace(s[0], s[-1], k)
    elif init == "kmeans++":
        c = _kmeans_pp(distinct, k, rng or np.random.default_rng(0))
    else:
        raise ValueError(f"unknown init {init!r}")
    prefix = np.concatenate([[0.0], np.cumsum(s)])
    bounds = None
    for _ in range(iterations):
        mids = (c[1:] + c[:-1]) / 2
        new_bounds = np.searchsorted(s, mids, side="right")
        if bounds is not None and np.array_equal(new_bounds, bounds):
            break
        bounds = new_bounds
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [s.size]])
        counts = ends - starts
        sums = prefix[ends] - prefix[starts]
        c = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        c = np.maximum.accumulate(c)  # keep the order that assignment by midpoints needs
    mids = (c[1:] + c[:-1]) / 2
    bounds = np.searchsorted(s, mids, side="right")
    counts = np.diff(np.concatenate([[0], bounds, [s.size]]))
    used = counts > 0
    sorted_labels = np.repeat(np.cumsum(used)[used] - 1, counts[used])
    labels = np.empty(v.size, np.int64)
    labels[order] = sorted_labels
    return c[used], labels


def _kmeans_pp(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (D² sampling) over the distinct values, in increasing order."""
    centers = [points[rng.integers(points.size)]]
    d2 = (points - centers[0]) ** 2
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:
            break
        pick = int(np.searchsorted(np.cumsum(d2), rng.random() * total, side="right"))
        pick = min(pick, points.size - 1)
        centers.append(points[pick])
        d2 = np.minimum(d2, (points - points[pick]) ** 2)
    return np.sort(np.array(centers))
