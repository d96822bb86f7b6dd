"""merge-neurons: fold a neuron into a nearly parallel partner instead of just dropping it.

If neuron ``j`` computes ``w_j·x + b_j ≈ s·(w_i·x + b_i)`` with ``s > 0`` and a positively
homogeneous activation follows (ReLU, LeakyReLU, PReLU with equal slopes, none), then
whatever reads ``j`` can read ``i`` scaled by ``s``: ``j`` is removed and ``s`` times its
outgoing weights are added to ``i``'s (Kim et al., Neuron Merging, NeurIPS 2020). The
result is exact for exactly parallel vectors and close for a cosine near 1.

The incoming vector is seen through the per-channel affine ops before the activation
(BatchNormalization, Mul/Add/Sub/Div by constants); between the activation and the
readers only ops linear per channel may stand, and after an activation that is not
homogeneous only duplicates merge. Groups with several producers, a depthwise
convolution, or anything else in the way are left alone and counted by reason. Pairs
merge greedily, most parallel first, while their cosine reaches ``threshold`` and until
``ratio`` of a group is gone (``threshold=0``: pruning with compensation).
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.channels import FIXED, ChannelGroup, Member, analyze, keep_channels, layer_key
from onnxopt.framework import Opt, Pass, PassContext, PassResult, register
from onnxopt.graph import const_through_shape_ops
from onnxopt.model import Model

__all__ = ["MergeNeurons"]

log = logging.getLogger(__name__)

_HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")
_PASS = ("Identity", "Dropout")
_LINEAR_AFTER = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Transpose", "Reshape",
                 "Flatten", "Squeeze", "Unsqueeze", "Concat", "Identity", "Dropout", "Resize", "Upsample")
_SINKS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: how close to 1 the scale must be after an activation that is not positively homogeneous
_STRICT_SCALE = 1e-3


@register
class MergeNeurons(Pass):
    """Merge neurons (and conv channels) whose incoming weights are nearly parallel into a
    partner, adding their scaled outgoing weights to the partner's."""

    name = "merge-neurons"
    summary = "merge neurons whose incoming weights are (nearly) parallel into one"
    exact = False
    options = {
        "threshold": Opt(float, 0.9, "merge a pair when the cosine of their incoming weights reaches this",
                         minimum=0.0, maximum=1.0),
        "ratio": Opt(float, 0.5, "merge at most this fraction of a group's channels", minimum=0.0,
                     maximum=0.95),
        "min_channels": Opt(int, 1, "never keep fewer channels in a group", minimum=1),
        "exclude": Opt(list, [], "layers (node or output names) whose groups are left alone"),
    }

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        groups = analyze(model)
        skipped: Counter = Counter()
        keep: dict[int, np.ndarray] = {}
        overrides: dict[tuple[int, int], np.ndarray] = {}
        merged = 0
        cosines: list[float] = []
        considered = 0
        for g in groups.groups:
            if not g.prunable:
                continue
            if self.opts.exclude and any(m.node.name in self.opts.exclude or layer_key(m.node) in self.opts.exclude
                                         for m in g.members if m.role in ("out", "in")):
                skipped["excluded"] += 1
                continue
            plan = _plan(g, groups.root)
            if isinstance(plan, str):
                skipped[plan] += 1
                log.debug("merge-neurons: group %s (%s) left alone: %s", g.id, g.sources[:1], plan)
                continue
            considered += 1
            vectors, strict = plan
            limit = min(int(np.floor(self.opts.ratio * g.size + 1e-9)), g.size - self.opts.min_channels)
            pairs = _pairs(vectors, self.opts.threshold, limit, strict)
            if not pairs:
                continue
            for m in g.members:
                if m.role != "in":
                    continue
                key = (id(m.node), m.index)
                w = overrides.get(key)
                if w is None:
                    w = np.array(const_through_shape_ops(m.node.inputs[m.index]), dtype=np.float64)
                for survivor, gone, scale, _ in pairs:
                    _fold(w, m, g, groups.root, survivor, gone, scale)
                overrides[key] = w
            removed = {gone for _, gone, _, _ in pairs}
            keep[g.id] = np.array([c for c in range(g.size) if c not in removed], dtype=np.int64)
            merged += len(pairs)
            cosines.extend(cos for _, _, _, cos in pairs)
        stats = {"groups": len(groups.groups), "groups_considered": considered, "groups_merged": len(keep),
                 "neurons_merged": merged, "skipped": dict(sorted(skipped.items())),
                 "min_cosine": round(min(cosines), 5) if cosines else None,
                 "mean_cosine": round(float(np.mean(cosines)), 5) if cosines else None}
        if not keep:
            return PassResult(False, stats)
        for key, w in overrides.items():
            node = next(m.node for m in groups.members if (id(m.node), m.index) == key)
            overrides[key] = w.astype(const_through_shape_ops(node.inputs[key[1]]).dtype)
        before = model.summary().parameters
        keep_channels(model, groups, keep, overrides=overrides)
        stats["parameters_before"] = before
        stats["parameters_after"] = model.summary().parameters
        return PassResult(True, stats)


# --------------------------------------------------------------------------------------
# What a group computes per channel
# --------------------------------------------------------------------------------------


def _plan(g: ChannelGroup, root) -> tuple[np.ndarray, bool] | str:
    """The incoming vector of every channel (filter and bias after the per-channel affine
    ops), and whether merging is limited to duplicates; or why the group cannot merge."""
    sources = [m for m in g.members if m.role == "out"]
    if len(sources) != 1 or len(g.spaces) != 1:
        return "several producers (residual join)"
    if any(m.role == "tied" for m in g.members):
        return "depthwise convolution"
    if any(m.kind in ("split", "slice_bounds") for m in g.members):
        return "split or sliced channels"
    src = sources[0]
    w = const_through_shape_ops(src.node.inputs[src.index])
    if w is None or w.dtype.kind != "f":
        return "weights not constant"
    w = np.moveaxis(np.asarray(w, np.float64), src.axis, 0).reshape(g.size, -1)
    bias = next((m for m in g.members if m.role == "bias" and m.node is src.node), None)
    b = np.zeros(g.size) if bias is None else np.asarray(const_through_shape_ops(bias.node.inputs[bias.index]),
                                                         np.float64).reshape(-1)
    if src.node.op == "Gemm":
        w = w * float(src.node.attrs.get("alpha", 1.0))
        b = b * float(src.node.attrs.get("beta", 1.0))
    if b.size != g.size:
        return "bias not per channel"
    scale, shift = np.ones(g.size), np.zeros(g.size)
    t = src.node.outputs[0]
    strict = False
    slope = None
    sinks_ok = None
    # Before the activation: a chain of single-consumer per-channel affine ops.
    while True:
        users = t.outputs
        if len(users) != 1:
            if all(u.op in _SINKS for u in users):
                sinks_ok = True  # a linear neuron read by several layers
            break
        node = users[0]
        op = node.op
        if op in _PASS:
            t = node.outputs[0]
            continue
        if op == "BatchNormalization":
            p = [np.asarray(const_through_shape_ops(node.inputs[i]), np.float64) for i in range(1, 5)]
            a = p[0] / np.sqrt(p[3] + float(node.attrs.get("epsilon", 1e-5)))
            scale, shift = scale * a, shift * a + p[1] - p[2] * a
            t = node.outputs[0]
            continue
        if op in ("Add", "Sub", "Mul", "Div") and len(node.inputs) == 2:
            k = 1 if node.inputs[0] is t else 0
            c = const_through_shape_ops(node.inputs[k])
            if c is None:
                return f"{op} with a computed operand"
            c = _per_channel(np.asarray(c, np.float64), g.size)
            if c is None:
                return f"{op} with a constant of another shape"
            if op == "Add":
                shift = shift + c
            elif op == "Sub":
                if k == 1:
                    shift = shift - c
                else:
                    scale, shift = -scale, c - shift
            elif op == "Mul":
                scale, shift = scale * c, shift * c
            elif k == 1:
                scale, shift = scale / c, shift / c
            else:
                return "division by the channels"
            t = node.outputs[0]
            continue
        if op in _HOMOGENEOUS:
            if op == "PRelu":
                sl = const_through_shape_ops(node.inputs[1])
                if sl is None:
                    return "PRelu with computed slopes"
                slope = _per_channel(np.asarray(sl, np.float64), g.size)
            t = node.outputs[0]
            break
        if op in _SINKS:
            break
        if len(node.outputs) == 1 and op in ("Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu",
                                              "Celu", "Gelu", "Softplus", "Mish", "Clip", "Swish"):
            strict = True  # not homogeneous: only duplicates merge
            t = node.outputs[0]
            break
        return f"{op} before the activation"
    if sinks_ok is None:
        why = _check_after(t, g, root)
        if why:
            return why
    v = np.concatenate([w * scale[:, None], (b * scale + shift)[:, None]], axis=1)
    if slope is not None:  # PRelu: only channels with equal slopes may merge
        v = np.concatenate([v, 1e6 * slope[:, None] * np.linalg.norm(v, axis=1, keepdims=True)], axis=1)
    return v, strict


def _per_channel(c: np.ndarray, size: int) -> np.ndarray | None:
    if c.size == 1:
        return np.full(size, float(c.reshape(-1)[0]))
    squeezed = [d for d in c.shape if d != 1]
    if squeezed == [size]:
        return c.reshape(-1)
    return None


def _check_after(t: gs.Tensor, g: ChannelGroup, root) -> str:
    """Everything between the activation and the layers reading the channels must be
    linear per channel."""
    stack = [t]
    seen: set[int] = set()
    sink_nodes = {id(m.node) for m in g.members if m.role == "in"}
    while stack:
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        for node in cur.outputs:
            if id(node) in sink_nodes and node.op in _SINKS and node.inputs[0] is cur:
                continue
            op = node.op
            if op == "Mul" and len(node.inputs) == 2:
                k = 1 if node.inputs[0] is cur else 0
                c = const_through_shape_ops(node.inputs[k])
                if c is None or c.size != 1 or float(c.reshape(-1)[0]) <= 0:
                    return "Mul after the activation"
            elif op == "Resize":
                mode = node.attrs.get("mode", "nearest")
                if mode not in ("nearest", "linear"):
                    return "cubic Resize after the activation"
            elif op not in _LINEAR_AFTER:
                return f"{op} after the activation"
            for out in node.outputs:
                if out.name:
                    stack.append(out)
    return ""


# --------------------------------------------------------------------------------------
# Pairing and folding
# --------------------------------------------------------------------------------------


def _pairs(v: np.ndarray, threshold: float, limit: int, strict: bool) -> list[tuple[int, int, float, float]]:
    """Greedy (survivor, removed, scale, cosine) pairs, most parallel first."""
    if limit <= 0:
        return []
    norms = np.linalg.norm(v, axis=1)
    live = norms > 0
    unit = np.where(live[:, None], v / np.where(norms > 0, norms, 1)[:, None], 0)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)
    cos[~live, :] = -np.inf
    cos[:, ~live] = -np.inf
    out = []
    survivors: set[int] = set()
    removed: set[int] = set()
    # candidate pairs sorted by cosine, best first
    iu = np.triu_indices(len(v), 1)
    vals = cos[iu]
    order = np.argsort(-vals, kind="stable")
    for k in order:
        c = float(vals[k])
        if not np.isfinite(c) or c < threshold or c <= 0 or len(out) >= limit:
            break
        a, b = int(iu[0][k]), int(iu[1][k])
        if a in removed or b in removed:
            continue
        # the smaller one goes, into the larger one
        i, j = (a, b) if norms[a] >= norms[b] else (b, a)
        if j in survivors:
            i, j = j, i
            if j in survivors:
                continue
        s = float(v[i] @ v[j] / (v[i] @ v[i]))
        if s <= 0 or (strict and abs(s - 1) > _STRICT_SCALE):
            continue
        out.append((i, j, s, c))
        survivors.add(i)
        removed.add(j)
    return out


def _positions(layout, root, channel: int, group_id: int) -> list[np.ndarray]:
    """Where ``channel`` of the group sits along a member's axis (once per segment that
    holds it; inner blocks expanded)."""
    found = []
    off = 0
    for seg in layout.segs:
        if seg.space != FIXED and root(seg.space) == group_id and seg.start <= channel < seg.stop:
            p = off + channel - seg.start
            found.append(np.arange(p * layout.inner, (p + 1) * layout.inner))
        off += seg.size
    return found


def _fold(w: np.ndarray, m: Member, g: ChannelGroup, root, survivor: int, gone: int, scale: float) -> None:
    """w[..., survivor, ...] += scale * w[..., gone, ...] along the member's input axis."""
    src = _positions(m.layout, root, gone, g.id)
    dst = _positions(m.layout, root, survivor, g.id)
    for ps, pd in zip(src, dst):
        a = np.moveaxis(w, m.axis, 0)
        a[pd] += scale * a[ps]
