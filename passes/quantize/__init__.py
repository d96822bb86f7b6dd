"""quantize: QuantizeLinear/DequantizeLinear that onnxruntime really runs as int8,
calibrated on data, with an accuracy guard.

Three modes. ``static`` quantizes activations and weights, with activation ranges
calibrated on ``ctx.calibration`` (:mod:`.calibrate`) and Q/DQ placed by a profile
(:mod:`.plan`): ``ort-cpu`` only where onnxruntime's CPU provider fuses them into integer
kernels (uint8 activations, per-channel int8 weights), then checks on onnxruntime which
units fused (:mod:`.fusion`) and returns the others to float; ``tensorrt`` by NVIDIA's
explicit-quantization rules. ``dynamic`` quantizes MatMul/Gemm/LSTM weights offline and
activations at run time; ``weight-only`` stores blockwise int4/int8 MatMul weights
(``MatMulNBits``, or a block DequantizeLinear at opset 21). The rewrites are in
:mod:`.rewrite`.

Before deciding anything the pass folds per-channel affine ops into the preceding layers
and, for per-channel weights below opset 13 (which onnxruntime cannot load), converts the
model to opset 13 (:mod:`.prepare`). The accuracy guard (``min_cosine``, ``min_top1``,
:mod:`.guard`) keeps the most sensitive layers in float until the bounds hold on
calibration data. An already-quantized model is left alone; If/Loop/Scan bodies stay float.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.errors import PipelineError
from onnxopt.framework import Opt, Pass, PassContext, PassResult, register
from onnxopt.graph import NameAllocator, toposort
from onnxopt.model import Model
from onnxopt.tensorinfo import ShapeIndex
from onnxopt.validate import make_session

from .calibrate import METHODS, QParams, activation_qparams, choose_range, collect
from .fusion import Fusion, analyze_fusion, kernel_fraction
from .guard import AccuracyGuard
from .plan import (
    COMPUTE_OPS,
    PROFILES,
    WEIGHT_MODE_OPS,
    QuantizePlan,
    calibration_tensors,
    make_plan,
    select_weight_layers,
)
from .prepare import already_quantized, fold_affine, upgrade_opset
from .rewrite import (
    Applied,
    apply_dynamic,
    apply_dynamic_lstm,
    apply_qdq,
    apply_weight_only,
    matmulnbits_available,
)

__all__ = ["Quantize"]

log = logging.getLogger(__name__)

MODES = ("static", "dynamic", "weight-only")


@register
class Quantize(Pass):
    """Insert QuantizeLinear/DequantizeLinear (static), dynamic MatMulInteger, or blockwise
    weight-only MatMul; calibrated, fusion-checked on onnxruntime, accuracy-guarded.

    Edge cases: an already-quantized model is not modified (reason in stats); subgraph
    bodies stay float; weights that are graph inputs (IR < 4 initializers a user may
    override) are not constants and their layers stay float; tensors holding inf/nan or
    mask sentinels in the calibration data stay float. Option combinations that cannot
    work are refused when the pass is constructed."""

    name = "quantize"
    summary = "insert QuantizeLinear/DequantizeLinear pairs (static, dynamic, weight-only)"
    exact = False
    options = {
        "mode": Opt(str, "static", "static (calibrated activations and weights), dynamic (weights "
                    "offline, activations at run time) or weight-only (blockwise MatMul weights)",
                    choices=MODES),
        "profile": Opt(str, "ort-cpu", "placement: ort-cpu (only where onnxruntime's CPU provider "
                       "fuses Q/DQ into integer kernels) or tensorrt (NVIDIA explicit-quantization rules)",
                       choices=PROFILES),
        "method": Opt(str, "minmax", "calibration: minmax, percentile, entropy (KL) or mse", choices=METHODS),
        "percentile": Opt(float, 99.99, "percentile of values kept by method=percentile",
                          minimum=50.0, maximum=100.0),
        "per_channel": Opt(bool, True, "one weight scale per output channel (else one per tensor)"),
        "activations": Opt(str, "u8", "activations: u8 (asymmetric, fused on the CPU provider) or s8 "
                           "(symmetric); the tensorrt profile always uses s8", choices=("u8", "s8")),
        "bits": Opt(int, 4, "weight-only: bits per weight (4 or 8)", minimum=4, maximum=8),
        "block_size": Opt(int, 32, "weight-only: weights per scale along K (a power of two >= 16)",
                          minimum=16),
        "weight_format": Opt(str, "auto", "weight-only: matmulnbits, dequantize (block DequantizeLinear, "
                             "opset 21) or auto (MatMulNBits where the CPU provider has it)",
                             choices=("auto", "matmulnbits", "dequantize")),
        "op_types": Opt(list, None, "op types to quantize (default: the mode's and profile's)"),
        "exclude": Opt(list, None, "keep in float: op types, node names or name globs (Gemm;*head*)"),
        "depthwise": Opt(bool, False, "ort-cpu: quantize depthwise convolutions too (the CPU provider's "
                         "int8 depthwise kernel runs slower than its float one)"),
        "min_in_channels": Opt(int, 4, "ort-cpu: a Conv over fewer input channels stays float (an image's "
                               "first layer: the CPU provider's float kernel is faster there)", minimum=1),
        "skip_first": Opt(bool, False, "keep the first Conv/MatMul/Gemm in float"),
        "skip_last": Opt(bool, False, "keep the last Conv/MatMul/Gemm in float"),
        "min_cosine": Opt(float, None, "accuracy guard: keep the most sensitive layers in float until "
                          "every output's cosine to the float model reaches this on calibration data",
                          minimum=0.0, maximum=1.0),
        "min_top1": Opt(float, None, "accuracy guard: minimum top-1 agreement on class-score outputs",
                        minimum=0.0, maximum=1.0),
        "guard_samples": Opt(int, 32, "calibration samples the accuracy guard evaluates on (the first ones; "
                             "fewer make its estimate of unseen data noisy)", minimum=1),
        "calib_samples": Opt(int, None, "calibrate on at most this many samples (default: all)", minimum=1),
        "bias_correction": Opt(bool, False, "correct biases by the mean output shift measured on "
                               "calibration data"),
        "reduce_range": Opt(bool, False, "7-bit weights (avoids int16 saturation on CPUs with AVX2 "
                            "but without VNNI)"),
        "opset_upgrade": Opt(bool, True, "below opset 13, convert the model for per-channel weights "
                             "(else fall back to per-tensor)"),
        "check_fusion": Opt(bool, True, "ort-cpu: measure the fused fraction on onnxruntime and return "
                            "units it did not fuse to float"),
    }

    def __init__(self, **values):
        super().__init__(**values)
        self._check_options()

    def _check_options(self) -> None:
        """Refuse option combinations that cannot work, before any pass of the pipeline runs."""
        o = self.opts
        if o.mode == "weight-only":
            if o.bits not in (4, 8):
                raise PipelineError(f"option 'bits' of pass 'quantize' must be 4 or 8; got {o.bits}")
            if o.block_size & (o.block_size - 1):
                raise PipelineError(f"option 'block_size' of pass 'quantize' must be a power of two; "
                                    f"got {o.block_size}")
        if o.mode == "dynamic" and self.given.get("activations") == "s8":
            raise PipelineError("pass 'quantize': mode=dynamic quantizes activations to u8 at run time "
                                "(DynamicQuantizeLinear); activations=s8 is for mode=static")
        if o.mode != "static" and o.profile == "tensorrt":
            raise PipelineError("pass 'quantize': profile=tensorrt places static Q/DQ; use mode=static")
        if o.mode != "static" and o.bias_correction:
            raise PipelineError(f"pass 'quantize': bias_correction corrects the shift that quantized "
                                f"activations cause; mode={o.mode} has none to correct (use mode=static)")
        if o.op_types:
            supported = COMPUTE_OPS[o.profile] if o.mode == "static" else WEIGHT_MODE_OPS[o.mode]
            unknown = [op for op in o.op_types if op not in supported]
            if unknown:
                where = f"profile={o.profile}" if o.mode == "static" else f"mode={o.mode}"
                raise PipelineError(f"option 'op_types' of pass 'quantize': {', '.join(unknown)} cannot be "
                                    f"quantized with {where}; it quantizes {', '.join(supported)}")

    # ------------------------------------------------------------------------------

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        o = self.opts
        found = already_quantized(model)
        if found:
            desc = ", ".join(f"{n} {op}" for op, n in found.items())
            log.warning("quantize: the model is already quantized (%s); left alone", desc)
            return PassResult(False, {"skipped": f"already quantized: {desc}", "quantized_ops": found})
        calibration = None
        if o.mode == "static" or self._guarded or o.bias_correction:
            calibration = _Limited(ctx.require_calibration(self.name), o.calib_samples)
        work = model.copy()
        names = NameAllocator(work)
        _name_nodes(work, names)
        toposort(work.graph)
        stats: dict = {"mode": o.mode}
        if o.mode == "static":
            result = self._static(model, work, calibration, ctx, stats)
        else:
            result = self._weights(model, work, calibration, ctx, stats)
        if result is None:
            return PassResult(False, stats)
        model.restore(result)
        return PassResult(True, stats)

    @property
    def _guarded(self) -> bool:
        return self.opts.min_cosine is not None or self.opts.min_top1 is not None

    def _guard(self, original: Model, calibration, ctx: PassContext) -> AccuracyGuard:
        o = self.opts
        return AccuracyGuard(original, calibration, o.guard_samples, o.min_cosine, o.min_top1, ctx)

    # ---- static ------------------------------------------------------------------

    def _static(self, original: Model, work: Model, calibration, ctx: PassContext, stats: dict) -> Model | None:
        o = self.opts
        symmetric = o.profile == "tensorrt" or o.activations == "s8"
        stats.update(profile=o.profile, method=o.method, activations="s8" if symmetric else "u8")
        if o.profile == "tensorrt" and o.activations == "u8" and "activations" in self.given:
            stats["activations_note"] = "the tensorrt profile is symmetric: activations are s8"
        stats["folded"] = fold_affine(work)
        per_channel, work = self._opset(work, calibration, stats, needed=o.per_channel)
        index = ShapeIndex(work)
        plan_args = dict(profile=o.profile, per_channel=per_channel, symmetric=symmetric,
                         exclude=o.exclude or (), op_types=o.op_types, skip_first=o.skip_first,
                         skip_last=o.skip_last, depthwise=o.depthwise, min_in_channels=o.min_in_channels)
        full = make_plan(work, index, **plan_args)
        stats["skipped"] = dict(full.skipped)
        if not full.units:
            return _nothing(stats, "nothing to quantize: " + (", ".join(f"{k} ({v})" for k, v in full.skipped.items())
                                                              or "no Conv/MatMul/Gemm"))
        qparams, bad = self._calibrate(work, index, full, calibration, ctx, stats, symmetric)
        builder = _StaticBuilder(work, index, plan_args, qparams, bad, o.reduce_range)
        excluded: set[str] = set()
        q, plan, applied = builder.build(frozenset(excluded))
        if not plan.units:
            return _nothing(stats, "nothing to quantize: every candidate reads non-finite calibration values")
        check_fusion = o.profile == "ort-cpu" and o.check_fusion
        fusion = None
        if check_fusion:
            q, plan, applied, fusion = _prune_unfused(builder, q, plan, applied, excluded, stats)
            if not plan.units:
                return _nothing(stats, "onnxruntime fused none of the quantized units")
        if o.bias_correction:
            builder.deltas = _bias_deltas(work, q, plan, applied, calibration, ctx)
            stats["bias_corrected"] = len(builder.deltas)
            q, plan, applied = builder.build(frozenset(excluded))
        if self._guarded:
            guard = self._guard(original, calibration, ctx)
            chosen, stats["guard"] = guard.search(
                lambda ex: builder.build(frozenset(excluded | set(ex)))[0], [u.name for u in plan.compute_units()],
                ops={u.name: u.node.op for u in plan.units}, current=q)
            if chosen:
                excluded |= set(chosen)
                q, plan, applied = builder.build(frozenset(excluded))
                if check_fusion:
                    fusion = analyze_fusion(q)
            if not plan.units:
                return _nothing(stats, "accuracy guard: no layer can be quantized within the bound")
        _static_stats(stats, plan, applied, fusion, o.profile)
        return q

    def _calibrate(self, work: Model, index: ShapeIndex, full: QuantizePlan, calibration, ctx: PassContext,
                   stats: dict, symmetric: bool) -> tuple[dict[str, QParams], set[str]]:
        """Activation parameters of every tensor any plan might quantize (the guard and the
        fusion check re-plan), and the tensors that must stay float (inf/nan, sentinels, no data)."""
        o = self.opts
        tensors = calibration_tensors(work, index, full)
        observers, _, samples = collect(work, tensors, calibration, histogram=o.method != "minmax",
                                        map_shards=ctx.map_shards, shards=ctx.shards,
                                        progress=ctx.progress)
        stats["calibration_samples"] = samples
        dtype = np.int8 if symmetric else np.uint8
        qparams: dict[str, QParams] = {}
        bad: set[str] = set()
        for name in tensors:
            obs = observers[name]
            if obs.nonfinite or obs.sentinel or obs.empty:
                bad.add(name)
                continue
            lo, hi = choose_range(obs, o.method, percentile=o.percentile, symmetric=symmetric)
            qparams[name] = activation_qparams(lo, hi, dtype)
        if bad:
            stats["float_tensors_nonfinite"] = len(bad)
            log.debug("quantize: tensors with inf/nan/sentinels or no data stay float: %s", sorted(bad)[:20])
        return qparams, bad

    def _opset(self, work: Model, calibration, stats: dict, *, needed: bool) -> tuple[bool, Model]:
        """(per_channel, model): per-channel weights need opset 13."""
        opset = int(work.opset_imports.get("", 1))
        stats["opset"] = opset
        if not needed:
            stats["per_channel"] = False
            return False, work
        if opset >= 13:
            stats["per_channel"] = True
            return True, work
        if not self.opts.opset_upgrade:
            stats["per_channel"] = False
            stats["per_channel_note"] = f"opset {opset} < 13: per-tensor weights (opset_upgrade=false)"
            return False, work
        try:
            upgraded = upgrade_opset(work, 13)
            if calibration is not None:
                _check_same(work, upgraded, next(iter(calibration)))
        except ValueError as exc:
            stats["per_channel"] = False
            stats["per_channel_note"] = f"opset {opset} < 13 and the conversion failed ({exc}): per-tensor weights"
            log.info("quantize: %s", stats["per_channel_note"])
            return False, work
        stats["per_channel"] = True
        stats["opset"] = f"{opset} -> 13"
        stats["per_channel_note"] = f"opset {opset} converted to 13 for per-channel DequantizeLinear"
        _name_nodes(upgraded, NameAllocator(upgraded))
        toposort(upgraded.graph)
        return True, upgraded

    # ---- dynamic and weight-only ------------------------------------------------

    def _weights(self, original: Model, work: Model, calibration, ctx: PassContext, stats: dict) -> Model | None:
        o = self.opts
        dynamic = o.mode == "dynamic"
        chosen, skipped = select_weight_layers(work, ShapeIndex(work), mode=o.mode, op_types=o.op_types,
                                               exclude=o.exclude or (), skip_first=o.skip_first,
                                               skip_last=o.skip_last)
        stats["skipped"] = skipped
        if not chosen:
            return _nothing(stats, "nothing to quantize: " + (", ".join(f"{k} ({v})" for k, v in skipped.items())
                                                              or "no eligible MatMul/Gemm"))
        fmt = None
        if dynamic:
            stats["per_channel"] = o.per_channel
        else:
            fmt, work = self._weight_format(work, stats)
            if fmt is None:
                return None
            stats.update(bits=o.bits, block_size=o.block_size, weight_format=fmt)

        def build(excluded) -> Model:
            q = work.copy()
            ex = set(excluded)
            nodes = [n for n in q.graph.nodes if n.name in chosen and n.name not in ex]
            if dynamic:
                names_q = NameAllocator(q)
                lstms = [n for n in nodes if n.op == "LSTM"]
                apply_dynamic(q, [n for n in nodes if n.op != "LSTM"], names_q, per_channel=o.per_channel,
                              reduce_range=o.reduce_range)
                apply_dynamic_lstm(q, lstms, names_q, per_channel=o.per_channel)
            elif nodes:
                apply_weight_only(q, nodes, NameAllocator(q), bits=o.bits, block_size=o.block_size, fmt=fmt)
            return q

        excluded: list[str] = []
        q = build(excluded)
        if self._guarded:
            ops = {n.name: n.op for n in work.graph.nodes if n.name in chosen}
            excluded, stats["guard"] = self._guard(original, calibration, ctx).search(
                build, list(chosen), ops=ops, current=q)
            if excluded:
                q = build(excluded)
        kept = [n for n in chosen if n not in excluded]
        if not kept:
            return _nothing(stats, "accuracy guard: no layer can be quantized within the bound")
        stats["quantized"] = len(kept)
        stats["quantized_ops"] = dict(Counter(n.op for n in work.graph.nodes if n.name in kept))
        stats.update(kernel_fraction(q, len(kept), dynamic))
        return q

    def _weight_format(self, work: Model, stats: dict) -> tuple[str | None, Model]:
        """The weight-only storage to write (None: it cannot be written), and the model to
        write it in (converted to opset 21 for a block DequantizeLinear)."""
        o = self.opts
        fmt = o.weight_format
        if fmt == "auto":
            fmt = "matmulnbits" if matmulnbits_available(o.bits) else "dequantize"
        elif fmt == "matmulnbits" and not matmulnbits_available(o.bits):
            stats["weight_format_note"] = (f"this onnxruntime's CPU provider has no {o.bits}-bit MatMulNBits; "
                                           "the model may not run here")
        if fmt == "dequantize" and int(work.opset_imports.get("", 1)) < 21:
            try:
                work = upgrade_opset(work, 21)
                _name_nodes(work, NameAllocator(work))
                toposort(work.graph)
                stats["opset"] = "-> 21"
            except ValueError as exc:
                _nothing(stats, f"block DequantizeLinear needs opset 21: {exc}")
                return None, work
        return fmt, work


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _nothing(stats: dict, reason: str) -> None:
    """Record that nothing is quantized, and why."""
    stats["quantized"] = 0
    stats["reason"] = reason


class _Limited:
    """The first ``limit`` samples of a re-iterable calibration source."""

    def __init__(self, source, limit: int | None):
        self.source = source
        self.limit = limit

    def __iter__(self):
        it = iter(self.source)
        return it if self.limit is None else itertools.islice(it, self.limit)

    def __len__(self) -> int:
        try:
            n = len(self.source)
        except TypeError:
            n = sum(1 for _ in self.source)
        return n if self.limit is None else min(n, self.limit)


def _name_nodes(model: Model, names: NameAllocator) -> None:
    """Give every main-graph node a unique name (plans refer to nodes by name)."""
    seen: set[str] = set()
    for node in model.graph.nodes:
        if not node.name or node.name in seen:
            node.name = names(f"{node.op}_{len(seen)}")
        seen.add(node.name)


def _check_same(a: Model, b: Model, feeds: dict) -> None:
    ra = make_session(a).run(None, dict(feeds))
    rb = make_session(b).run(None, dict(feeds))
    for x, y in zip(ra, rb):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape or (x.dtype.kind == "f" and not np.allclose(x, y, rtol=1e-3, atol=1e-4, equal_nan=True)):
            raise ValueError("the converted model computes different outputs")


class _StaticBuilder:
    """Builds the quantized model for a set of layers kept in float."""

    def __init__(self, work: Model, index: ShapeIndex, plan_args: dict, qparams: dict[str, QParams],
                 bad: set[str], reduce_range: bool):
        self.work = work
        self.index = index
        self.plan_args = plan_args
        self.qparams = qparams
        self.bad = bad
        self.reduce_range = reduce_range
        self.deltas: dict[str, np.ndarray] = {}

    def build(self, excluded: frozenset[str]) -> tuple[Model, QuantizePlan, Applied]:
        q = self.work.copy()
        index = self.index.for_copy(q)
        ex = set(excluded)
        while True:
            ids = frozenset(id(n) for n in q.graph.nodes if n.name in ex)
            plan = make_plan(q, index, excluded=ids, **self.plan_args)
            missing = [u.name for u in plan.units
                       if any(t.name not in self.qparams for t in _unit_tensors(u))]
            if not missing:
                break
            ex |= set(missing)
        params = {}
        for t in plan.act_tensors():
            params[id(t)] = self.qparams[t.name]
        deltas = {i: self.deltas[u.name] for i, u in enumerate(plan.units) if u.name in self.deltas}
        applied = apply_qdq(q, plan, params, NameAllocator(q), bias_delta=deltas, reduce_range=self.reduce_range)
        return q, plan, applied


def _unit_tensors(u) -> list[gs.Tensor]:
    out = [u.node.inputs[i] for i in u.act_inputs]
    if u.out is not None:
        out.append(u.out)
    return out


def _prune_unfused(builder: _StaticBuilder, q: Model, plan: QuantizePlan, applied: Applied,
                   excluded: set[str], stats: dict) -> tuple[Model, QuantizePlan, Applied, Fusion]:
    """Return to float the units onnxruntime did not fuse into integer kernels (adding them
    to ``excluded``), re-planning up to three times; the last model's fusion."""
    pruned: list[str] = []
    fusion = None
    for _ in range(3):
        fusion = analyze_fusion(q)
        unit_names = {u.name for u in plan.units}
        unfused = [n for n in fusion.unfused if n in unit_names]
        if not unfused:
            break
        pruned += unfused
        excluded |= set(unfused)
        q, plan, applied = builder.build(frozenset(excluded))
        fusion = None
    if fusion is None:
        fusion = analyze_fusion(q)
    stats["pruned_unfused"] = pruned
    return q, plan, applied, fusion


def _static_stats(stats: dict, plan: QuantizePlan, applied: Applied, fusion: Fusion | None, profile: str) -> None:
    """The figures of a static quantization: what was quantized and inserted, and what fused."""
    stats["quantized"] = len(plan.units)
    stats["quantized_ops"] = dict(Counter(u.node.op for u in plan.units))
    stats["quantize_nodes"] = applied.quantize_nodes
    stats["dequantize_nodes"] = applied.dequantize_nodes
    stats["weights_quantized"] = applied.weights
    if applied.bias_clipped:
        stats["bias_values_clipped"] = applied.bias_clipped
    if fusion is not None:
        stats.update(fusion.as_stats())
    elif profile == "tensorrt":
        stats["fused_fraction"] = None
        stats["fusion_note"] = "the fused fraction is measured for the ort-cpu profile"
    stats["skipped"] = {**stats["skipped"], **{k: v for k, v in plan.skipped.items()
                                               if k not in stats["skipped"]}}


def _bias_deltas(work: Model, q: Model, plan: QuantizePlan, applied: Applied, calibration,
                 ctx: PassContext) -> dict[str, np.ndarray]:
    """Per-channel mean output shift (float - quantized) of each layer with a bias."""
    targets: dict[str, tuple[str, str, int]] = {}
    for ui, u in enumerate(plan.units):
        if u.kind != "compute" or (u.node.op == "MatMul" and u.bias_add is None):
            continue
        if u.node.op == "Gemm" and u.bias_index is None:
            continue
        fname, qname = applied.unit_outputs[ui]
        targets[u.name] = (fname, qname, u.channel_axis)
    if not targets:
        return {}
    _, fmeans, _ = collect(work, [], calibration, histogram=False, progress=ctx.progress,
                           channel_axes={f: a for f, _, a in targets.values()})
    _, qmeans, _ = collect(q, [], calibration, histogram=False, progress=ctx.progress,
                           channel_axes={qn: a for _, qn, a in targets.values()})
    deltas = {}
    for unit, (fname, qname, _) in targets.items():
        mf, mq = fmeans[fname].mean(), qmeans[qname].mean()
        if mf is None or mq is None or mf.shape != mq.shape:
            continue
        deltas[unit] = mf - mq
    return deltas
