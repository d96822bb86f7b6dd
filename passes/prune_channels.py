"""prune-channels: remove whole channels and neurons, with everything that carries them.

Unstructured sparsity makes a file smaller but rarely a CPU faster; removing whole
output channels makes every kernel that touches them smaller. The channel groups
(:mod:`onnxopt.channels`) say which channels must go together — a convolution's filters,
its BatchNormalization parameters, the input channels of the layers that read them, the
other branch of a residual Add, a slot in a Concat — and the rewrite keeps all of them
consistent; groups the analysis cannot vouch for are left alone and counted by reason.

How many channels go is ``ratio`` of each group, of all channels ranked together, or of
all channels shared out by the error each group causes alone on calibration data
(``scope``); which go is the lowest-scored by ``criterion``. ``round_to`` keeps channel
counts that onnxruntime's blocked CPU convolutions take (multiples of 16 with AVX-512, 8
with AVX2), without which fewer channels need not run faster. The pass is lossy: follow
it with ``reconstruct``; the channel map it records in the model's metadata lets teacher
and student layers be matched.
"""

from __future__ import annotations

import logging

import numpy as np

from onnxopt.activations import capture
from onnxopt.channels import FIXED, ChannelGroup, ChannelGroups, analyze, keep_channels, layer_key
from onnxopt.framework import Opt, Pass, PassContext, PassResult, register
from onnxopt.graph import const_through_shape_ops
from onnxopt.model import Model

__all__ = ["PruneChannels", "keep_counts", "group_scores"]

log = logging.getLogger(__name__)


@register
class PruneChannels(Pass):
    """Remove a fraction of the channels/neurons of every prunable channel group, lowest
    importance first. Un-prunable groups are counted by reason in the stats."""

    name = "prune-channels"
    summary = "remove whole output channels/neurons, propagated through their dependency group"
    exact = False
    options = {
        "ratio": Opt(float, 0.3, "fraction of channels to remove", minimum=0.0, maximum=0.95),
        "criterion": Opt(str, "l1", "which channels go first: lowest filter norm, BatchNorm scale, "
                         "or mean activation on calibration data",
                         choices=("l1", "l2", "bn", "activation")),
        "scope": Opt(str, "group", "remove ratio of each group; of all channels ranked together; or "
                     "of all channels, shared out by measured sensitivity (needs calibration data)",
                     choices=("group", "global", "sensitivity")),
        "max_ratio": Opt(float, 0.8, "scope=sensitivity: most a single group may lose", minimum=0.0,
                         maximum=0.95),
        "round_to": Opt(int, 1, "keep a multiple of this many channels per group (the nearest one); "
                        "onnxruntime's fast CPU convolutions want multiples of 16 (AVX-512) or 8 (AVX2)",
                        minimum=1),
        "min_channels": Opt(int, 1, "never keep fewer channels in a group", minimum=1),
        "exclude": Opt(list, [], "layers (node or output names) whose groups stay whole"),
        "samples": Opt(int, 32, "calibration samples for the activation criterion", minimum=1),
    }

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        groups = analyze(model)
        summary = groups.stats()
        before = model.summary().parameters
        stats: dict = {"groups": summary["groups"], "groups_prunable": summary["prunable"],
                       "unprunable": summary["unprunable_reasons"],
                       "layers_skipped": summary["layers_skipped"], "groups_pruned": 0,
                       "channels_prunable": summary["prunable_channels"], "channels_removed": 0,
                       "parameters_before": before, "parameters_after": before,
                       "criterion": self.opts.criterion, "criterion_fallbacks": 0}
        candidates = [g for g in groups.prunable if not _excluded(g, self.opts.exclude)]
        stats["groups_excluded"] = len(groups.prunable) - len(candidates)
        if self.opts.ratio <= 0 or not candidates:
            return PassResult(False, stats)
        scores, fallbacks = group_scores(model, groups, candidates, self.opts.criterion, ctx,
                                         samples=self.opts.samples, pass_name=self.name)
        stats["criterion_fallbacks"] = fallbacks
        ratios = None
        if self.opts.scope == "sensitivity":
            calibration = ctx.require_calibration(self.name)
            sens = sensitivities(model, candidates, scores, self.opts.ratio, calibration,
                                 samples=min(self.opts.samples, 8))
            ratios = allocate(candidates, sens, self.opts.ratio, self.opts.max_ratio)
            stats["sensitivity"] = {str(g.id): round(sens[g.id], 6) for g in candidates}
        counts = keep_counts(candidates, scores, self.opts.ratio, scope=self.opts.scope,
                             round_to=self.opts.round_to, min_channels=self.opts.min_channels,
                             ratios=ratios)
        keep = {}
        for g in candidates:
            n = counts[g.id]
            if n >= g.size:
                continue
            order = np.argsort(-scores[g.id], kind="stable")
            keep[g.id] = np.sort(order[:n])
        if not keep:
            return PassResult(False, stats)
        rewrite = keep_channels(model, groups, keep)
        after = model.summary().parameters
        stats.update(groups_pruned=rewrite.groups_pruned, channels_removed=rewrite.channels_removed,
                     parameters_after=after,
                     parameters_removed_ratio=round(1 - after / before, 4) if before else 0.0)
        log.info("prune-channels: %d channels removed from %d groups; parameters %d -> %d",
                 rewrite.channels_removed, rewrite.groups_pruned, before, after)
        return PassResult(True, stats)


def _excluded(group: ChannelGroup, names: list[str]) -> bool:
    if not names:
        return False
    wanted = set(names)
    for m in group.members:
        if m.role in ("out", "tied", "in") and (m.node.name in wanted or layer_key(m.node) in wanted):
            return True
    return False


def keep_counts(groups: list[ChannelGroup], scores: dict[int, np.ndarray], ratio: float, *, scope: str = "group",
                round_to: int = 1, min_channels: int = 1, ratios: dict[int, float] | None = None
                ) -> dict[int, int]:
    """How many channels each group keeps (``ratios``: a ratio per group, for
    ``scope=sensitivity``)."""
    counts: dict[int, int] = {}
    if ratios is not None:
        for g in groups:
            counts[g.id] = g.size - int(np.floor(ratios[g.id] * g.size + 1e-9))
    elif scope == "global":
        normed = {g.id: scores[g.id] / max(float(np.mean(scores[g.id])), 1e-12) for g in groups}
        everything = np.concatenate([normed[g.id] for g in groups])
        drop = int(np.floor(ratio * everything.size + 1e-9))
        threshold = np.sort(everything)[drop - 1] if drop > 0 else -np.inf
        for g in groups:
            counts[g.id] = int(np.sum(normed[g.id] > threshold))
    else:
        for g in groups:
            counts[g.id] = g.size - int(np.floor(ratio * g.size + 1e-9))
    for g in groups:
        n = max(counts[g.id], min_channels, 1)
        if round_to > 1 and n < g.size:
            # The nearest multiple, so that the total stays near the ratio; never zero.
            n = max(int(np.floor(n / round_to + 0.5)) * round_to, round_to)
        counts[g.id] = min(max(n, min_channels), g.size)
    return counts


def sensitivities(model: Model, groups: list[ChannelGroup], scores: dict[int, np.ndarray], ratio: float,
                  calibration, *, samples: int = 4) -> dict[int, float]:
    """For each group alone: the relative squared error of the model's outputs when
    ``ratio`` of its channels (the lowest-scored) are removed."""
    from onnxopt.validate import make_session

    feeds = [f for _, f in zip(range(samples), calibration)]
    reference = make_session(model)
    names = [o.name for o in reference.get_outputs()]
    ref = [reference.run(names, f) for f in feeds]
    out: dict[int, float] = {}
    counts = keep_counts(groups, scores, ratio)
    for g in groups:
        n = counts[g.id]
        if n >= g.size:
            out[g.id] = 0.0
            continue
        work = model.copy()
        found = analyze(work)
        keep = np.sort(np.argsort(-scores[g.id], kind="stable")[:n])
        try:
            keep_channels(work, found, {g.id: keep})
            sess = make_session(work)
        except Exception as exc:  # measured as worst: the group is then pruned least
            log.debug("sensitivity of group %s not measured: %s", g.id, exc)
            out[g.id] = float("inf")
            continue
        num = den = 0.0
        for f, r in zip(feeds, ref):
            for a, b in zip(r, sess.run(names, f)):
                if np.asarray(a).dtype.kind != "f":
                    continue
                a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
                num += float(np.sum((a64 - b64) ** 2))
                den += float(np.sum(a64 * a64))
        out[g.id] = num / max(den, 1e-30)
    return out


def allocate(groups: list[ChannelGroup], sens: dict[int, float], ratio: float, max_ratio: float) -> dict[int, float]:
    """Per-group ratios removing ``ratio`` of all channels with the least predicted
    error, if removing ``r`` of group g costs ``sens[g] * (r / ratio)**2``: the optimum
    gives each group a ratio proportional to its size over its sensitivity (capped)."""
    sizes = np.array([g.size for g in groups], np.float64)
    s = np.array([sens[g.id] for g in groups], np.float64)
    finite = s[np.isfinite(s) & (s > 0)]
    floor = max(float(finite.min()) * 1e-3 if finite.size else 1e-12, 1e-12)
    s = np.where(np.isfinite(s), np.maximum(s, floor), np.inf)
    target = ratio * sizes.sum()

    def ratios(lam: float) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(np.isfinite(s), lam * sizes / s, 0.0)
        return np.clip(r, 0.0, max_ratio)

    lo, hi = 0.0, 1.0
    while (ratios(hi) * sizes).sum() < target and hi < 1e30:
        hi *= 4
    for _ in range(200):
        mid = (lo + hi) / 2
        if (ratios(mid) * sizes).sum() < target:
            lo = mid
        else:
            hi = mid
    r = ratios(hi)
    return {g.id: float(r[i]) for i, g in enumerate(groups)}


def group_scores(model: Model, groups: ChannelGroups, selected: list[ChannelGroup], criterion: str,
                 ctx: PassContext, *, samples: int = 32, pass_name: str = "prune-channels"
                 ) -> tuple[dict[int, np.ndarray], int]:
    """Importance of every channel of each selected group (higher = keep), and how many
    groups fell back to the L1 norm (no BatchNorm for ``bn``, nothing to observe for
    ``activation``)."""
    scores: dict[int, np.ndarray] = {}
    fallbacks = 0
    observed: dict[int, np.ndarray] = {}
    if criterion == "activation":
        calibration = ctx.require_calibration(pass_name)
        observed = _activation_scores(model, groups, selected, calibration, samples)
    for g in selected:
        s = None
        if criterion == "bn":
            s = _param_scores(groups, g, ("bn_scale",), lambda w, axis: np.abs(w))
        elif criterion == "activation":
            s = observed.get(g.id)
        elif criterion == "l2":
            s = _param_scores(groups, g, ("out", "tied"), _norm(2))
        if s is None:
            if criterion != "l1" and criterion != "l2":
                fallbacks += 1
            s = _param_scores(groups, g, ("out", "tied"), _norm(1))
        if s is None:  # no weights to look at: keep the first channels
            s = np.arange(g.size, 0, -1, dtype=np.float64)
        scores[g.id] = s
    return scores, fallbacks


def _norm(p: int):
    def f(w: np.ndarray, axis: int) -> np.ndarray:
        other = tuple(i for i in range(w.ndim) if i != axis)
        a = np.abs(w.astype(np.float64))
        return a.sum(axis=other) if p == 1 else np.sqrt((a * a).sum(axis=other))
    return f


def _to_group(groups: ChannelGroups, g: ChannelGroup, layout,
              per_position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spread a per-position vector of a member's layout onto the group's channels:
    (channel indices, values)."""
    idx, vals = [], []
    off = 0
    inner = layout.inner
    if inner > 1:
        per_position = per_position.reshape(-1, inner).mean(axis=1)
    for seg in layout.segs:
        if seg.space != FIXED and groups.root(seg.space) == g.id:
            idx.append(np.arange(seg.start, seg.stop))
            vals.append(per_position[off:off + seg.size])
        off += seg.size
    if not idx:
        return np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(idx), np.concatenate(vals)


def _param_scores(groups: ChannelGroups, g: ChannelGroup, roles: tuple[str, ...], fn) -> np.ndarray | None:
    total = np.zeros(g.size, np.float64)
    found = False
    for m in g.members:
        if m.role not in roles or m.kind != "slice":
            continue
        w = const_through_shape_ops(m.node.inputs[m.index])
        if w is None or w.dtype.kind != "f":
            continue
        per = np.asarray(fn(np.asarray(w), m.axis), dtype=np.float64).reshape(-1)
        if per.size != m.layout.width:
            continue
        idx, vals = _to_group(groups, g, m.layout, per)
        if idx.size == 0:
            continue
        vals = vals / max(float(np.mean(vals)), 1e-12)  # members count alike, whatever their scale
        total[idx] += vals
        found = True
    return total if found else None


def _activation_scores(model: Model, groups: ChannelGroups, selected: list[ChannelGroup], calibration,
                       samples: int) -> dict[int, np.ndarray]:
    """How much each channel contributes where the group's layers read it: the root mean
    square of the channel on the calibration data times the norm of the weights that
    read it (a small channel read by large weights matters as much as the reverse)."""
    wanted: dict[str, list] = {}
    main = {id(n) for n in model.graph.nodes}
    for g in selected:
        for m in g.members:
            if m.role != "in" or m.kind != "slice" or id(m.node) not in main:
                continue
            t = m.node.inputs[0]
            w = const_through_shape_ops(m.node.inputs[m.index])
            if t.name and w is not None:
                wanted.setdefault(t.name, []).append((g, m, _norm(2)(np.asarray(w), m.axis)))
    if not wanted:
        return {}
    sums: dict[str, np.ndarray | None] = {name: None for name in wanted}
    n = 0
    feeds = (f for i, f in enumerate(calibration) if i < samples)
    for values in capture(model, list(wanted), feeds):
        n += 1
        for name, arr in values.items():
            layout = wanted[name][0][1].layout
            a = np.asarray(arr, dtype=np.float64)
            a = np.moveaxis(a, layout.axis, 0).reshape(a.shape[layout.axis], -1)
            sq = (a * a).mean(axis=1)
            sums[name] = sq if sums[name] is None else sums[name] + sq
    out: dict[int, np.ndarray] = {}
    for name, users in wanted.items():
        if sums[name] is None:
            continue
        rms = np.sqrt(sums[name] / max(n, 1))
        for g, m, wnorm in users:
            per = rms * wnorm.reshape(-1) if wnorm.size == rms.size else rms
            idx, vals = _to_group(groups, g, m.layout, per)
            if idx.size == 0:
                continue
            vals = vals / max(float(np.mean(vals)), 1e-12)
            out.setdefault(g.id, np.zeros(g.size))
            out[g.id][idx] += vals
    return out
