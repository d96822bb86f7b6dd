"""Calibration for the ``quantize`` pass: streaming statistics of activations and
the quantization parameters derived from them.

Calibration data are read one sample at a time (:func:`onnxopt.activations.capture`) and
folded into fixed-size running statistics per tensor — min/max, a histogram whose range
grows by re-binning, per-channel sums for bias correction — so that memory does not grow
with the number of samples. Four methods turn the statistics into a range:

* ``minmax``: the observed extremes;
* ``percentile``: the extremes of the central ``percentile`` % of the values (two-sided
  for signed tensors, one-sided above zero for non-negative ones);
* ``entropy``: the clipping threshold that minimises the KL divergence between the
  histogram and its quantized version (TensorRT's calibrator, applied to ``|x|``);
* ``mse``: the clipping range that minimises the expected squared quantization error
  (clipping error plus rounding error) computed from the histogram.

Non-finite values (``inf``/``nan``) and sentinel magnitudes (``|x| >= 1e30``, such as
``finfo.min`` written by attention masks) are not data: they are left out of every
statistic and counted, and the caller keeps tensors that hold them in float. Samples of
different shapes (ragged, padded sequences) are fine: every statistic is over the
flattened values (or over the channel axis for per-channel sums).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxopt.activations import capture
from onnxopt.model import Model

__all__ = [
    "METHODS",
    "SENTINEL",
    "RangeObserver",
    "ChannelMeans",
    "QParams",
    "collect",
    "collect_shard",
    "choose_range",
    "activation_qparams",
    "weight_scales",
]

log = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse")
#: Magnitudes at or above this are sentinels (masking values), not data.
SENTINEL = 1e30
BINS = 2048


class RangeObserver:
    """Running min/max and a histogram of one tensor's finite values.

    The histogram has :data:`BINS` bins over ``[lo, hi]``; when a sample falls outside,
    the range grows (to at least twice its width) and the old counts are re-binned by
    their bin centres. Memory is constant in the number of samples.
    """

    def __init__(self, histogram: bool = True, bins: int = BINS):
        self.min = np.inf
        self.max = -np.inf
        self.count = 0
        self.nonfinite = 0
        self.sentinel = 0
        self.bins = bins
        self.hist: np.ndarray | None = None
        self.lo = 0.0
        self.hi = 0.0
        self.keep_histogram = histogram

    def update(self, arr: np.ndarray) -> None:
        x = np.asarray(arr)
        if x.dtype.kind != "f":
            return
        x = x.ravel()
        finite = np.isfinite(x)
        n_bad = int(x.size - finite.sum())
        if n_bad:
            self.nonfinite += n_bad
            x = x[finite]
        big = np.abs(x) >= SENTINEL
        n_big = int(big.sum())
        if n_big:
            self.sentinel += n_big
            x = x[~big]
        if x.size == 0:
            return
        x = x.astype(np.float64, copy=False)
        lo, hi = float(x.min()), float(x.max())
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self.count += int(x.size)
        if self.keep_histogram:
            self._histogram(x, lo, hi)

    def _histogram(self, x: np.ndarray, lo: float, hi: float) -> None:
        if self.hist is None:
            width = hi - lo
            pad = max(width * 0.05, 1e-6 * max(abs(lo), abs(hi), 1e-12))
            self.lo, self.hi = lo - pad, hi + pad
            self.hist = np.zeros(self.bins, dtype=np.float64)
        elif lo < self.lo or hi > self.hi:
            new_lo, new_hi = min(lo, self.lo), max(hi, self.hi)
            width = max(new_hi - new_lo, 2 * (self.hi - self.lo))
            centre = (new_lo + new_hi) / 2
            new_lo = min(new_lo, centre - width / 2)
            new_hi = max(new_hi, centre + width / 2)
            self.hist = self._rebinned(new_lo, new_hi)
            self.lo, self.hi = new_lo, new_hi
        counts, _ = np.histogram(x, bins=self.bins, range=(self.lo, self.hi))
        self.hist += counts

    def _rebinned(self, lo: float, hi: float) -> np.ndarray:
        """This histogram's counts over ``[lo, hi]`` (a range holding its own), each bin's
        count moved whole to the new bin of its centre."""
        edges = np.linspace(self.lo, self.hi, self.bins + 1)
        centres = (edges[:-1] + edges[1:]) / 2
        counts, _ = np.histogram(centres, bins=self.bins, range=(lo, hi), weights=self.hist)
        return counts

    def merge(self, other: RangeObserver) -> None:
        """Fold in the statistics of another part of the data (a shard). Min, max and the
        counts are exact; the histograms are re-binned onto the union of their ranges by bin
        centres, so ranges chosen from them (percentile, entropy, mse) differ from one
        pass over all the data by at most about a bin of the wider range."""
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.nonfinite += other.nonfinite
        self.sentinel += other.sentinel
        if not self.keep_histogram or other.hist is None:
            return
        if self.hist is None:
            self.hist, self.lo, self.hi = other.hist.copy(), other.lo, other.hi
            return
        lo, hi = min(self.lo, other.lo), max(self.hi, other.hi)
        mine = self.hist if (lo, hi) == (self.lo, self.hi) else self._rebinned(lo, hi)
        self.hist = mine + (other.hist if (lo, hi) == (other.lo, other.hi) else other._rebinned(lo, hi))
        self.lo, self.hi = lo, hi

    @property
    def empty(self) -> bool:
        return self.count == 0

    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)


class ChannelMeans:
    """Running per-channel mean of a tensor along ``axis`` (bias correction)."""

    def __init__(self, axis: int):
        self.axis = axis
        self.sum: np.ndarray | None = None
        self.count = 0

    def update(self, arr: np.ndarray) -> None:
        x = np.asarray(arr, dtype=np.float64)
        if x.ndim == 0:
            return
        axis = self.axis if self.axis >= 0 else x.ndim + self.axis
        if axis >= x.ndim:
            return
        moved = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
        finite = np.isfinite(moved)
        s = np.where(finite, moved, 0.0).sum(1)
        if self.sum is None:
            self.sum = s
        elif self.sum.shape != s.shape:
            return
        else:
            self.sum += s
        self.count += moved.shape[1]

    def merge(self, other: ChannelMeans) -> None:
        """Fold in another shard's sums (exact)."""
        if other.sum is None:
            return
        if self.sum is None:
            self.sum = other.sum.copy()
        elif self.sum.shape == other.sum.shape:
            self.sum = self.sum + other.sum
        else:
            return
        self.count += other.count

    def mean(self) -> np.ndarray | None:
        if self.sum is None or self.count == 0:
            return None
        return self.sum / self.count


def collect(model: Model, names: Sequence[str], calibration: Iterable[dict], *, histogram: bool,
            progress=None, channel_axes: dict[str, int] | None = None, map_shards=None,
            shards: int = 0) -> tuple[dict[str, RangeObserver], dict[str, ChannelMeans], int]:
    """Run ``model`` over the calibration samples, one at a time, and fold the tensors
    ``names`` into :class:`RangeObserver` s (and ``channel_axes`` tensors into
    :class:`ChannelMeans`). Returns the observers, the channel means and the number of
    samples read.

    With ``map_shards`` (``map_shards(fn, items) -> results``, e.g. Ray tasks) and
    ``shards`` > 1, the samples are cut into that many consecutive shards, each shard's
    statistics computed by one call and the results merged in order
    (:meth:`RangeObserver.merge`)."""
    if map_shards is not None and shards > 1 and (_length(calibration) or 0) >= 2 * shards:
        return _collect_sharded(model, names, calibration, histogram, channel_axes, map_shards, shards)
    observers = {n: RangeObserver(histogram) for n in names}
    means = {n: ChannelMeans(a) for n, a in (channel_axes or {}).items()}
    wanted = list(dict.fromkeys(list(names) + list(means)))
    total = _length(calibration)
    samples = 0
    if not wanted:
        return observers, means, 0
    task = progress.task("calibrating", total) if progress is not None else None
    advance = task.__enter__() if task is not None else (lambda n=1: None)
    try:
        for values in capture(model, wanted, calibration):
            for n, obs in observers.items():
                obs.update(values[n])
            for n, m in means.items():
                m.update(values[n])
            samples += 1
            advance(1)
    finally:
        if task is not None:
            task.__exit__(None, None, None)
    return observers, means, samples


def _collect_sharded(model, names, calibration, histogram, channel_axes, map_shards, shards):
    samples = list(calibration)
    bounds = np.linspace(0, len(samples), shards + 1).astype(int)
    data = model.to_bytes()
    jobs = [(data, list(names), histogram, dict(channel_axes or {}), samples[a:b])
            for a, b in zip(bounds[:-1], bounds[1:])]
    observers, means, total = None, None, 0
    for part_observers, part_means, count in map_shards(collect_shard, jobs):
        if observers is None:
            observers, means = part_observers, part_means
        else:
            for n, obs in part_observers.items():
                observers[n].merge(obs)
            for n, m in part_means.items():
                means[n].merge(m)
        total += count
    return observers, means, total


def collect_shard(job: tuple) -> tuple[dict[str, RangeObserver], dict[str, ChannelMeans], int]:
    """One shard's statistics: ``job`` is (model bytes, tensor names, histogram?, channel
    axes, samples); a plain function of plain data, so that it runs as a remote task."""
    data, names, histogram, channel_axes, samples = job
    return collect(Model.load(data), names, samples, histogram=histogram, channel_axes=channel_axes)


def _length(calibration) -> int | None:
    try:
        return len(calibration)
    except TypeError:
        return None


# --------------------------------------------------------------------------------------
# Ranges
# --------------------------------------------------------------------------------------


def choose_range(obs: RangeObserver, method: str, *, percentile: float = 99.99,
                 symmetric: bool = False, levels: int = 256) -> tuple[float, float]:
    """The clipping range ``(lo, hi)`` of a tensor for ``method``. Always contains 0."""
    if obs.empty:
        return 0.0, 0.0
    lo, hi = min(obs.min, 0.0), max(obs.max, 0.0)
    if method == "minmax" or obs.hist is None or obs.hist.sum() == 0:
        return lo, hi
    if method == "percentile":
        return _percentile_range(obs, percentile)
    if method == "entropy":
        return _entropy_range(obs, levels)
    if method == "mse":
        return _mse_range(obs, symmetric, levels)
    raise ValueError(f"unknown calibration method {method!r}")


def _cdf_value(edges: np.ndarray, cdf: np.ndarray, q: float) -> float:
    i = int(np.searchsorted(cdf, q, side="left"))
    i = min(max(i, 0), len(cdf) - 1)
    prev = cdf[i - 1] if i > 0 else 0.0
    frac = 0.0 if cdf[i] == prev else (q - prev) / (cdf[i] - prev)
    return float(edges[i] + frac * (edges[i + 1] - edges[i]))


def _percentile_range(obs: RangeObserver, percentile: float) -> tuple[float, float]:
    hist, edges = obs.hist, obs.edges()
    cdf = np.cumsum(hist) / hist.sum()
    tail = (100.0 - percentile) / 100.0
    if obs.min >= 0:  # one-sided: the lower end is 0
        return 0.0, max(min(_cdf_value(edges, cdf, 1.0 - tail), obs.max), 0.0)
    lo = max(_cdf_value(edges, cdf, tail / 2), obs.min)
    hi = min(_cdf_value(edges, cdf, 1.0 - tail / 2), obs.max)
    return min(lo, 0.0), max(hi, 0.0)


def _abs_histogram(obs: RangeObserver, bins: int = BINS) -> tuple[np.ndarray, float]:
    """The histogram of ``|x|`` over ``[0, amax]``."""
    edges = obs.edges()
    centres = np.abs((edges[:-1] + edges[1:]) / 2)
    amax = max(abs(obs.min), abs(obs.max))
    if amax == 0:
        return np.zeros(bins), 0.0
    h, _ = np.histogram(np.minimum(centres, amax), bins=bins, range=(0.0, amax), weights=obs.hist)
    return h, amax


def _entropy_range(obs: RangeObserver, levels: int) -> tuple[float, float]:
    """KL-divergence threshold search (TensorRT's entropy calibration) on |x|."""
    hist, amax = _abs_histogram(obs)
    if amax == 0 or hist.sum() == 0:
        return 0.0, 0.0
    nonneg = obs.min >= 0
    target = levels if nonneg else levels // 2  # quantization levels on one side
    n = len(hist)
    best_t, best_kl = n, np.inf
    start = max(target, 8)
    for t in range(start, n + 1, max(1, (n - start) // 256)):
        p = hist[:t].astype(np.float64).copy()
        p[t - 1] += hist[t:].sum()  # clipped outliers land in the last bin
        if p.sum() == 0:
            continue
        q = _quantize_histogram(hist[:t], target)
        kl = _kl(p, q)
        if kl < best_kl:
            best_kl, best_t = kl, t
    threshold = min(amax, (best_t + 0.5) * amax / n)
    if nonneg:
        return 0.0, threshold
    lo = max(obs.min, -threshold)
    hi = min(obs.max, threshold)
    return min(lo, 0.0), max(hi, 0.0)


def _quantize_histogram(p: np.ndarray, levels: int) -> np.ndarray:
    """Merge ``p`` into ``levels`` groups and spread each group's mass back over its
    non-empty bins (the candidate distribution of the KL search)."""
    t = len(p)
    idx = np.minimum((np.arange(t) * levels) // t, levels - 1)
    mass = np.bincount(idx, weights=p, minlength=levels)
    nonzero = (p > 0).astype(np.float64)
    counts = np.bincount(idx, weights=nonzero, minlength=levels)
    with np.errstate(divide="ignore", invalid="ignore"):
        per = np.where(counts > 0, mass / np.maximum(counts, 1), 0.0)
    return per[idx] * nonzero


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    qs = q.sum()
    if qs == 0:
        return np.inf
    q = q / qs
    mask = p > 0
    if np.any(q[mask] == 0):
        q = np.where(mask & (q == 0), 1e-12, q)
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _mse_range(obs: RangeObserver, symmetric: bool, levels: int) -> tuple[float, float]:
    """Shrink the min/max range by a factor that minimises the expected squared error
    (values clipped to the range plus uniform rounding noise inside it)."""
    hist, edges = obs.hist, obs.edges()
    centres = (edges[:-1] + edges[1:]) / 2
    w = hist / hist.sum()
    lo0, hi0 = min(obs.min, 0.0), max(obs.max, 0.0)
    if symmetric:
        a = max(-lo0, hi0)
        lo0, hi0 = -a, a
    best, best_err = (lo0, hi0), np.inf
    for f in np.linspace(1.0, 0.05, 96):
        lo, hi = lo0 * f, hi0 * f
        if hi - lo <= 0:
            continue
        scale = (hi - lo) / (levels - 1)
        clipped = np.clip(centres, lo, hi)
        err = np.sum(w * (centres - clipped) ** 2) + np.sum(w[(centres >= lo) & (centres <= hi)]) * scale**2 / 12
        if err < best_err:
            best_err, best = err, (lo, hi)
    return best


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------


@dataclass
class QParams:
    """Scale and zero point of a quantized activation tensor (per tensor)."""

    scale: float
    zero_point: int
    dtype: np.dtype
    lo: float = 0.0
    hi: float = 0.0
    notes: list = field(default_factory=list)

    def key(self) -> tuple:
        return (np.float32(self.scale).item(), int(self.zero_point), np.dtype(self.dtype).str)


def activation_qparams(lo: float, hi: float, dtype: np.dtype) -> QParams:
    """u8 asymmetric (range stretched to hold 0, zero point exact) or s8 symmetric
    (zero point 0, range ±max|x| over 127 levels)."""
    dtype = np.dtype(dtype)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if dtype == np.uint8:
        span = hi - lo
        if span <= 0 or not np.isfinite(span):
            return QParams(1.0, 0, dtype, lo, hi, ["empty range"])
        scale = float(np.float32(span / 255.0))
        zp = int(np.clip(np.round(-lo / scale), 0, 255))
        return QParams(scale, zp, dtype, lo, hi)
    amax = max(-lo, hi)
    if amax <= 0 or not np.isfinite(amax):
        return QParams(1.0, 0, dtype, lo, hi, ["empty range"])
    return QParams(float(np.float32(amax / 127.0)), 0, dtype, -amax, amax)


def weight_scales(w: np.ndarray, axis: int | None, *, bits: int = 8, reduce_range: bool = False
                  ) -> np.ndarray:
    """Symmetric scales of a weight: one per slice along ``axis`` (per channel) or one in
    all (``axis=None``). All-zero slices get scale 1 (any scale represents them)."""
    qmax = (2 ** (bits - 1)) - 1
    if reduce_range and bits == 8:
        qmax = 63
    w = np.asarray(w, dtype=np.float64)
    if axis is None:
        amax = np.array(np.abs(w).max() if w.size else 0.0)
    else:
        axes = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=axes) if w.size else np.zeros(w.shape[axis])
    scale = amax / qmax
    scale = np.where(scale > 0, scale, 1.0)
    return scale.astype(np.float32)
