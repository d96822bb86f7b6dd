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

import numpy as np

from onnxopt.framework import Opt, Pass, PassContext, PassResult, register
from onnxopt.model import Model
from onnxopt.weights.report import compression_report
from onnxopt.weights.sites import (
    WEIGHT_OPS,
    check_selection,
    check_targets,
    find_weights,
    pattern_value,
    select_weights,
)
from onnxopt.weights.writer import StorageWriter

__all__ = ["ShareWeights", "kmeans_1d"]

log = logging.getLogger(__name__)


@register
class ShareWeights(Pass):
    """Cluster each selected layer's weights into 2**bits shared values (k-means) and store
    a codebook plus bit-packed indices; zeros stay exact zeros."""

    name = "share-weights"
    summary = "k-means weight clustering (Deep Compression): codebook + low-bit indices"
    exact = False
    options = {
        "bits": Opt(int, 5, "index bits per weight: 2**bits shared values per layer", minimum=2, maximum=8),
        "init": Opt(str, "linear", "centroid initialisation: linear over [min, max] (the paper) or kmeans++",
                    choices=("linear", "kmeans++")),
        "iterations": Opt(int, 50, "most Lloyd iterations per layer", minimum=1),
        "layers": Opt(list, [], "per-layer widths PATTERN=BITS (regex on weight or node name; first match)"),
        "ops": Opt(list, list(WEIGHT_OPS), "op types whose weight operand may be shared"),
        "include": Opt(list, [], "only weights whose name or node name matches one of these regexes"),
        "exclude": Opt(list, [], "never weights whose name or node name matches one of these regexes"),
        "min_size": Opt(int, 512, "leave layers with fewer weights than this alone", minimum=0),
    }

    def __init__(self, **values):
        super().__init__(**values)
        check_selection(self.name, self.opts.ops, self.opts.include + self.opts.exclude)
        self.targets = check_targets(self.name, self.opts.layers, int, 2, 8)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        memo: dict = {}
        found, skipped = find_weights(model, self.opts.ops, memo)
        sites, not_selected = select_weights(found, min_size=self.opts.min_size,
                                             include=self.opts.include, exclude=self.opts.exclude)
        skipped.update(not_selected)
        rng = np.random.default_rng(ctx.seed)

        # Match: cluster every layer and plan its storage before the graph changes.
        work = []
        rows = []
        with ctx.progress.task(f"{self.name}: clustering", total=len(sites)) as advance:
            for site in sites:
                bits = pattern_value(self.targets, site, int) if self.targets else None
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
                work.append((site, shared))
                rows.append({"layer": site.name, "params": site.size, "bits": bits,
                             "clusters": int(np.unique(shared[shared != 0]).size),
                             "max_abs_change": change, "op": "/".join(site.ops), "shape": list(value.shape)})
                advance(1)

        # Mutate.
        writer = StorageWriter(model, memo)
        for site, shared in work:
            writer.write(site, shared)
        storages = writer.commit()

        stats = {
            "layers_shared": len(work),
            "params": sum(r["params"] for r in rows),
            "bits": self.opts.bits,
            "storages": storages,
            "skipped": dict(sorted(skipped.items())),
        }
        if rows:
            report = compression_report(model, ctx.reference, ops=self.opts.ops, names=[r["layer"] for r in rows])
            by_name = {r["layer"]: r for r in report["layers"]}
            merged = []
            for r in rows:  # the telling columns first: the terminal shows the first few
                fig = by_name.get(r["layer"], {})
                head = {k: r[k] for k in ("layer", "params", "bits", "clusters")}
                head.update({k: fig.get(k) for k in ("storage", "bits_per_weight", "bytes", "gzip_bytes", "ratio")})
                head.update({k: v for k, v in r.items() if k not in head})
                head.update({k: v for k, v in fig.items() if k not in head})
                merged.append(head)
            stats["layers"] = merged
            stats["total"] = report["total"]
        return PassResult(modified=bool(work), stats=stats)


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
