"""quantize: QuantizeLinear/DequantizeLinear that onnxruntime really runs as int8,
calibrated on data, with an accuracy guard.

Three modes:

* ``static`` — activations and weights quantized; activation ranges calibrated on
  ``ctx.calibration`` (streamed one sample at a time: running min/max and histograms,
  memory flat in the number of samples). The ``ort-cpu`` profile (default) places Q/DQ
  only where onnxruntime's CPU provider fuses them into integer kernels, with uint8
  asymmetric activations (int8 activations are mostly not fused there and run slower
  than float) and per-channel int8 weights; it then saves onnxruntime's optimized graph,
  counts the units that became integer kernels (the *fused fraction*) and returns any
  unit that did not fuse to float. The ``tensorrt`` profile follows NVIDIA's
  explicit-quantization rules (symmetric int8, Q/DQ on Conv/ConvTranspose/Gemm/MatMul
  inputs and residual Adds).
* ``dynamic`` — MatMul/Gemm weights quantized offline, activations at run time
  (DynamicQuantizeLinear + MatMulInteger, fused by onnxruntime into
  DynamicQuantizeMatMul). No calibration needed.
* ``weight-only`` — blockwise int4 (or int8) MatMul weights: onnxruntime's
  ``MatMulNBits`` where the CPU provider has it, else a block-quantized
  DequantizeLinear (opset 21). No calibration needed.

Before deciding anything the pass folds BatchNormalization and per-channel affine ops into
the preceding layers, and — for per-channel weights below opset 13, which onnxruntime
cannot load ("Unrecognized attribute: axis for DequantizeLinear") — converts the model to
opset 13, checking on a calibration sample that the converted model computes the same;
if it cannot, weights fall back to per-tensor. Stats say which.

The accuracy guard (``min_cosine``, ``min_top1``) compares the quantized model with the
float one on calibration samples; when it falls short, each quantized layer's
sensitivity is measured by quantizing it alone, and the most sensitive layers are kept in
float (the fewest that meet the bound, found by search) — the stats list them with their
sensitivity. Bias correction adds to each layer's bias the mean output shift between the
float and the quantized model measured on calibration data.

A model that is already quantized (QuantizeLinear/DequantizeLinear, DynamicQuantizeLinear,
ConvInteger/MatMulInteger, QLinear*, MatMulNBits ...) is left alone: not modified, the
reason in the stats and the log. Nodes inside If/Loop/Scan bodies stay float.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.errors import PipelineError
from onnxopt.framework import Opt, Pass, PassContext, PassResult, register
from onnxopt.graph import NameAllocator, const_value, toposort
from onnxopt.model import Model, iter_graphs
from onnxopt.tensorinfo import ShapeIndex
from onnxopt.validate import make_session

from .quantize_calibrate import METHODS, QParams, activation_qparams, choose_range, collect
from .quantize_fusion import INTEGER_KERNELS, analyze_fusion
from .quantize_plan import PROFILES, Plan, PlanContext, cheap_unit, make_plan, matches, tail_of
from .quantize_prepare import already_quantized, fold_affine, upgrade_opset
from .quantize_rewrite import (
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
    mask sentinels in the calibration data stay float."""

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

    # ------------------------------------------------------------------------------

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        o = self.opts
        self._check_options()
        found = already_quantized(model)
        if found:
            desc = ", ".join(f"{n} {op}" for op, n in found.items())
            log.warning("quantize: the model is already quantized (%s); left alone", desc)
            return PassResult(False, {"skipped": f"already quantized: {desc}", "quantized_ops": found})
        guard = o.min_cosine is not None or o.min_top1 is not None
        calibration = None
        if o.mode == "static" or guard or o.bias_correction:
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

    def _check_options(self) -> None:
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
            stats["quantized"] = 0
            stats["reason"] = "nothing to quantize: " + (", ".join(f"{k} ({v})" for k, v in full.skipped.items())
                                                         or "no Conv/MatMul/Gemm")
            return None

        # Calibrate every tensor any plan might quantize (the guard re-plans).
        tensors = _calibration_superset(work, index, full)
        observers, _, samples = collect(work, tensors, calibration, histogram=o.method != "minmax",
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

        builder = _StaticBuilder(work, index, plan_args, qparams, bad, o.reduce_range)
        excluded: set[str] = set()
        q, plan, applied = builder.build(frozenset(excluded))
        if not plan.units:
            stats["quantized"] = 0
            stats["reason"] = "nothing to quantize: every candidate reads non-finite calibration values"
            return None

        fusion = None
        if o.profile == "ort-cpu" and o.check_fusion:
            pruned: list[str] = []
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
            if not plan.units:
                stats["quantized"] = 0
                stats["reason"] = "onnxruntime fused none of the quantized units"
                return None

        if o.bias_correction:
            builder.deltas = _bias_deltas(work, q, plan, applied, calibration, ctx)
            stats["bias_corrected"] = len(builder.deltas)
            q, plan, applied = builder.build(frozenset(excluded))

        if o.min_cosine is not None or o.min_top1 is not None:
            compute = [u.name for u in plan.compute_units()]
            guarded = _Guard(original, calibration, o.guard_samples, o.min_cosine, o.min_top1, ctx)
            chosen, report = guarded.search(
                lambda ex: builder.build(frozenset(excluded | set(ex)))[0], compute,
                ops={u.name: u.node.op for u in plan.units}, current=q)
            stats["guard"] = report
            if chosen:
                excluded |= set(chosen)
                q, plan, applied = builder.build(frozenset(excluded))
                if o.profile == "ort-cpu" and o.check_fusion:
                    fusion = analyze_fusion(q)
            if not plan.units:
                stats["quantized"] = 0
                stats["reason"] = "accuracy guard: no layer can be quantized within the bound"
                return None

        stats["quantized"] = len(plan.units)
        stats["quantized_ops"] = dict(Counter(u.node.op for u in plan.units))
        stats["quantize_nodes"] = applied.quantize_nodes
        stats["dequantize_nodes"] = applied.dequantize_nodes
        stats["weights_quantized"] = applied.weights
        if applied.bias_clipped:
            stats["bias_values_clipped"] = applied.bias_clipped
        if fusion is not None:
            stats.update(fusion.as_stats())
        elif o.profile == "tensorrt":
            stats["fused_fraction"] = None
            stats["fusion_note"] = "the fused fraction is measured for the ort-cpu profile"
        stats["skipped"] = {**stats["skipped"], **{k: v for k, v in plan.skipped.items()
                                                   if k not in stats["skipped"]}}
        return q

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
        index = ShapeIndex(work)
        dynamic = o.mode == "dynamic"
        default_ops = ("MatMul", "Gemm", "LSTM") if dynamic else ("MatMul",)
        op_types = tuple(o.op_types) if o.op_types else default_ops
        skipped: dict[str, int] = {}
        ctx_ = PlanContext(work.graph, index, int(work.opset_imports.get("", 13)))
        cands = [n for n in work.graph.nodes if n.op in ("MatMul", "Gemm", "Conv", "LSTM", "GRU")]
        chosen: list[str] = []
        firsts = {cands[0].name} if cands and o.skip_first else set()
        lasts = {cands[-1].name} if cands and o.skip_last else set()
        for n in cands:
            reason = None
            if n.op not in op_types:
                if n.op in ("Conv", "LSTM", "GRU") and o.op_types and n.op in o.op_types:
                    reason = f"{n.op} is not supported by mode={o.mode}"
                else:
                    continue
            elif n.op not in ("MatMul", "Gemm", "LSTM") or (not dynamic and n.op != "MatMul"):
                reason = f"{n.op} is not supported by mode={o.mode}"
            elif n.op == "LSTM":
                reason = _lstm_reason(n, ctx_)
            elif n.name in firsts:
                reason = "first layer kept in float (skip_first)"
            elif n.name in lasts:
                reason = "last layer kept in float (skip_last)"
            elif matches(n, o.exclude or ()):
                reason = "excluded by the user"
            else:
                reason = _weight_reason(n, ctx_, dynamic, o.block_size)
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
                log.debug("quantize: %s kept in float: %s", n.name, reason)
            else:
                chosen.append(n.name)
        for g in iter_graphs(work.graph):
            if g is not work.graph:
                for n in g.nodes:
                    if n.op in op_types:
                        skipped["inside a subgraph"] = skipped.get("inside a subgraph", 0) + 1
        stats["skipped"] = skipped
        if not chosen:
            stats["quantized"] = 0
            stats["reason"] = "nothing to quantize: " + (", ".join(f"{k} ({v})" for k, v in skipped.items())
                                                         or "no eligible MatMul/Gemm")
            return None
        fmt = None
        if not dynamic:
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
                    stats["quantized"] = 0
                    stats["reason"] = f"block DequantizeLinear needs opset 21: {exc}"
                    return None
            stats.update(bits=o.bits, block_size=o.block_size, weight_format=fmt)
        else:
            stats["per_channel"] = o.per_channel

        def build(excluded: Iterable[str]) -> Model:
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
        if o.min_cosine is not None or o.min_top1 is not None:
            guarded = _Guard(original, calibration, o.guard_samples, o.min_cosine, o.min_top1, ctx)
            ops = {n.name: n.op for n in work.graph.nodes if n.name in chosen}
            excluded, report = guarded.search(build, list(chosen), ops=ops, current=q)
            stats["guard"] = report
            if excluded:
                q = build(excluded)
        kept = [n for n in chosen if n not in excluded]
        if not kept:
            stats["quantized"] = 0
            stats["reason"] = "accuracy guard: no layer can be quantized within the bound"
            return None
        stats["quantized"] = len(kept)
        stats["quantized_ops"] = dict(Counter(n.op for n in work.graph.nodes if n.name in kept))
        stats.update(_kernel_fraction(q, len(kept), dynamic))
        return q


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


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


def _calibration_superset(model: Model, index: ShapeIndex, plan: Plan) -> list[str]:
    """Names of every activation tensor a plan with some layers kept float might quantize."""
    names: dict[str, None] = {}
    for t in plan.act_tensors():
        names[t.name] = None
    ctx = PlanContext(model.graph, index, int(model.opset_imports.get("", 13)))
    for u in plan.units:
        out = u.node.outputs[0]
        if ctx.is_float_act(out):
            names[out.name] = None
        tail = tail_of(out, ctx)
        if tail and ctx.is_float_act(tail[0].outputs[0]):
            names[tail[0].outputs[0].name] = None
    if plan.profile == "ort-cpu":
        for node in model.graph.nodes:
            cu = cheap_unit(node, ctx)
            if cu is None:
                continue
            for i in cu.act_inputs:
                names[node.inputs[i].name] = None
            out = node.outputs[0]
            names[out.name] = None
            tail = tail_of(out, ctx)
            if tail and ctx.is_float_act(tail[0].outputs[0]):
                names[tail[0].outputs[0].name] = None
    return list(names)


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

    def build(self, excluded: frozenset[str]):
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


def _bias_deltas(work: Model, q: Model, plan: Plan, applied, calibration, ctx) -> dict[str, np.ndarray]:
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


def _weight_reason(node: gs.Node, ctx: PlanContext, dynamic: bool, block: int) -> str | None:
    if not ctx.is_float_act(node.inputs[0]):
        return "input is not a float32 activation"
    w = const_value(node.inputs[1])
    if w is None:
        return "second operand is not a constant (activation x activation)"
    if np.asarray(w).dtype != np.float32:
        return "weight is not float32"
    if np.asarray(w).ndim != 2:
        return "weight is not 2-D"
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)) or float(node.attrs.get("alpha", 1.0)) != 1.0:
            return "Gemm with transA or alpha != 1"
        if len(node.inputs) > 2 and node.inputs[2].name:
            if float(node.attrs.get("beta", 1.0)) != 1.0:
                return "Gemm with beta != 1"
    return None


def _lstm_reason(node: gs.Node, ctx: PlanContext) -> str | None:
    if not ctx.is_float_act(node.inputs[0]):
        return "input is not a float32 activation"
    for t in node.inputs[1:3]:
        w = const_value(t)
        if w is None or np.asarray(w).dtype != np.float32 or np.asarray(w).ndim != 3:
            return "LSTM weights are not float32 constants"
    if node.attrs.get("layout", 0) or node.attrs.get("input_forget", 0):
        return "LSTM with layout=1 or input_forget"
    return None


def _kernel_fraction(q: Model, count: int, dynamic: bool) -> dict:
    """How many rewritten MatMuls onnxruntime runs as integer kernels."""
    import os
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(prefix="onnxopt-fusion-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        try:
            make_session(q, "cpu", threads=1, optimization="all", optimized_path=path)
            opt = onnx.load(path, load_external_data=False)
        except Exception as exc:
            return {"fused_fraction": 0.0, "fusion_error": str(exc)[:200]}
    ops = Counter(n.op_type for n in opt.graph.node)
    kinds = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM") if dynamic else ("MatMulNBits",)
    fused = sum(ops.get(k, 0) for k in kinds)
    return {"fused_fraction": round(min(1.0, fused / count), 4),
            "integer_kernels": {k: v for k, v in sorted(ops.items()) if k in INTEGER_KERNELS}}


class _Guard:
    """The accuracy guard: compares candidates with the float model on calibration
    samples and searches the fewest float layers that meet the bounds."""

    def __init__(self, original: Model, calibration, samples: int, min_cosine: float | None,
                 min_top1: float | None, ctx: PassContext):
        self.feeds = list(itertools.islice(iter(calibration), samples))
        self.min_cosine = min_cosine
        self.min_top1 = min_top1
        self.ctx = ctx
        sess = make_session(original)
        self.names = [o.name for o in sess.get_outputs()]
        self.reference = [sess.run(self.names, dict(f)) for f in self.feeds]
        self.evaluations = 0

    def measure(self, model: Model) -> dict:
        self.evaluations += 1
        sess = make_session(model)
        dots = np.zeros(len(self.names))
        na = np.zeros(len(self.names))
        nb = np.zeros(len(self.names))
        agree = np.zeros(len(self.names))
        total = np.zeros(len(self.names))
        for feeds, ref in zip(self.feeds, self.reference):
            got = sess.run(self.names, dict(feeds))
            for k, (r, c) in enumerate(zip(ref, got)):
                r = np.asarray(r)
                c = np.asarray(c)
                if r.dtype.kind != "f" or r.shape != c.shape:
                    continue
                r64 = np.nan_to_num(r.astype(np.float64).ravel(), posinf=0.0, neginf=0.0)
                c64 = np.nan_to_num(c.astype(np.float64).ravel(), posinf=0.0, neginf=0.0)
                dots[k] += r64 @ c64
                na[k] += r64 @ r64
                nb[k] += c64 @ c64
                if r.ndim in (2, 3) and r.shape[-1] >= 2:
                    agree[k] += float((r.argmax(-1) == c.argmax(-1)).sum())
                    total[k] += r.argmax(-1).size
        cos = []
        for k in range(len(self.names)):
            if na[k] == 0 and nb[k] == 0:
                cos.append(1.0)
            elif na[k] == 0 or nb[k] == 0:
                cos.append(0.0)
            else:
                cos.append(float(dots[k] / np.sqrt(na[k] * nb[k])))
        top1 = [float(agree[k] / total[k]) for k in range(len(self.names)) if total[k] > 0]
        return {"cosine": min(cos) if cos else 1.0, "top1": min(top1) if top1 else None}

    def ok(self, m: dict) -> bool:
        if self.min_cosine is not None and m["cosine"] < self.min_cosine:
            return False
        if self.min_top1 is not None and m["top1"] is not None and m["top1"] < self.min_top1:
            return False
        return True

    def search(self, build: Callable[[Iterable[str]], Model], layers: list[str], *, ops: dict[str, str],
               current: Model) -> tuple[list[str], dict]:
        """The fewest layers to keep in float (most sensitive first) so that the model meets
        the bounds, and a report."""
        before = self.measure(current)
        report: dict = {"min_cosine": self.min_cosine, "min_top1": self.min_top1,
                        "cosine_before": round(before["cosine"], 6),
                        "top1_before": None if before["top1"] is None else round(before["top1"], 4),
                        "samples": len(self.feeds)}
        if self.ok(before):
            report.update(met=True, float_layers=[], cosine=report["cosine_before"],
                          top1=report["top1_before"], evaluations=self.evaluations)
            return [], report
        sensitivity: dict[str, float] = {}
        with self.ctx.progress.task("quantize: layer sensitivity", len(layers)) as advance:
            for name in layers:
                alone = build([x for x in layers if x != name])
                m = self.measure(alone)
                # the loss in the bounded metrics: cosine, top-1 agreement, or both
                s = 1.0 - m["cosine"] if self.min_cosine is not None else 0.0
                if self.min_top1 is not None and m["top1"] is not None:
                    s = max(s, 1.0 - m["top1"])
                sensitivity[name] = s
                advance(1)
        order = sorted(layers, key=lambda n: (-sensitivity[n], n))
        cache: dict[int, dict] = {}

        def meets(k: int) -> bool:
            if k not in cache:
                cache[k] = self.measure(build(order[:k]))
            return self.ok(cache[k])

        lo, hi = 0, 1  # meets(lo) is false, or lo is 0
        while not meets(hi) and hi < len(order):
            lo, hi = hi, min(hi * 2, len(order))
        if meets(hi):
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if meets(mid):
                    hi = mid
                else:
                    lo = mid
        chosen = order[:hi]
        final = cache[hi]
        report.update(
            met=self.ok(final), cosine=round(final["cosine"], 6),
            top1=None if final["top1"] is None else round(final["top1"], 4),
            float_layers=[{"name": n, "op": ops.get(n, "?"), "sensitivity": round(sensitivity[n], 6)}
                          for n in chosen],
            evaluations=self.evaluations)
        return chosen, report
