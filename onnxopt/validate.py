"""Compare a candidate model with its reference on onnxruntime.

Both models run on the same feeds on each requested execution provider. Per output the
result gives the max absolute and relative difference, the cosine similarity and — for
outputs that look like class scores (rank 2 or 3, last axis of 2 or more) — the top-1
agreement; plus the latency of both (median and p90 over timed runs after warm-up,
runs interleaved so that machine noise hits both alike).

Two bounds decide ``passed``:

* exact (every pass that changed the model is exact): each float element must satisfy
  ``|cand - ref| <= atol + rtol * |ref|`` (defaults :data:`DEFAULT_RTOL`,
  :data:`DEFAULT_ATOL`; NaN matches NaN, infinities must match), other dtypes must be
  equal;
* fidelity (a lossy pass changed it): each float output's cosine similarity must be at
  least ``min_cosine`` (default :data:`DEFAULT_MIN_COSINE`), and outputs of other dtypes
  must agree on at least that fraction of elements.

Providers are named ``cpu`` and ``cuda``. Asking for ``cuda`` where onnxruntime cannot use
it raises :class:`ProviderUnavailable`; there is no silent fallback to the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from .data import check_feeds, random_feeds
from .errors import FeedError, ProviderUnavailable, UsageError
from .model import EXTERNAL_DATA_THRESHOLD, Model

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "DEFAULT_RTOL",
    "DEFAULT_ATOL",
    "DEFAULT_MIN_COSINE",
    "PROVIDERS",
    "available_providers",
    "check_providers",
    "make_session",
    "session_threads",
    "thread_cap",
    "run_model",
    "OutputMetrics",
    "ProviderResult",
    "Validation",
    "compare_outputs",
    "validate",
    "ReferenceFailed",
]

DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-4
DEFAULT_MIN_COSINE = 0.99

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

log = logging.getLogger(__name__)

#: Threads a session gets when its caller names none (None: onnxruntime's default, one
#: per core). Set for a while by :func:`session_threads`.
_THREAD_CAP: int | None = None


@contextlib.contextmanager
def session_threads(threads: int | None) -> Iterator[None]:
    """Within the block, sessions made without ``threads`` get ``threads`` intra-op
    threads: a task given one CPU of a shared machine (a Ray task) must not start a
    thread pool per core, whose threads spin and starve the task beside it."""
    global _THREAD_CAP
    before, _THREAD_CAP = _THREAD_CAP, threads
    try:
        yield
    finally:
        _THREAD_CAP = before


def thread_cap() -> int | None:
    """The thread count :func:`session_threads` set, or None."""
    return _THREAD_CAP


class ReferenceFailed(UsageError):
    """The reference model itself does not run on onnxruntime: nothing to compare with."""


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build offers."""
    import onnxruntime as ort  # imported where used: a run without validation never needs it

    have = set(ort.get_available_providers())
    return [short for short, full in PROVIDERS.items() if full in have]


def check_providers(names: Sequence[str]) -> list[str]:
    """Validate provider names; raise a clear error for unknown or unavailable ones."""
    out = []
    for raw in names:
        name = raw.strip().lower()
        if name.endswith("executionprovider"):
            name = next((s for s, f in PROVIDERS.items() if f.lower() == name), name)
        if name not in PROVIDERS:
            raise UsageError(f"unknown provider '{raw}'; valid: {', '.join(PROVIDERS)}")
        if name not in available_providers():
            hint = " (install onnxruntime-gpu and make a CUDA device visible)" if name == "cuda" else ""
            raise ProviderUnavailable(
                f"provider '{name}' is not available in this onnxruntime "
                f"(available: {', '.join(available_providers())}){hint}")
        if name not in out:
            out.append(name)
    return out or ["cpu"]


def make_session(model: Model | str | bytes, provider: str = "cpu", *, threads: int | None = None,
                 optimization: str = "all", optimized_path: str | None = None,
                 workdir: str | None = None) -> ort.InferenceSession:
    """An onnxruntime session for ``model`` on ``provider`` (``cpu``/``cuda``).

    Models with external data or over 2 GB are written to ``workdir`` (a temporary
    folder by default) and loaded from there. ``optimization`` is ``disable``, ``basic``,
    ``extended`` or ``all``; ``optimized_path`` saves onnxruntime's optimized graph.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # onnxruntime logs a failing kernel in colour on stderr, before our one-line error
    # says the same: its own log is for --debug (our logger at DEBUG) only.
    opts.log_severity_level = 2 if log.isEnabledFor(logging.DEBUG) else 4
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    threads = threads or _THREAD_CAP
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    providers = [PROVIDERS[provider]]
    if isinstance(model, Model):
        model = _without_trailing_empty_inputs(model)
        if model.has_external_data() or model.tensor_bytes() > EXTERNAL_DATA_THRESHOLD:
            folder = workdir or tempfile.mkdtemp(prefix="onnxopt-")
            path = os.path.join(folder, "model.onnx")
            model.save(path, external_data=True)
            source: str | bytes = path
        else:
            source = model.to_bytes()
    else:
        source = model
    sess = ort.InferenceSession(source, sess_options=opts, providers=providers)
    if provider == "cuda" and sess.get_providers()[0] != PROVIDERS["cuda"]:
        raise ProviderUnavailable("provider 'cuda' could not be initialised (no usable CUDA device)")
    return sess


def _without_trailing_empty_inputs(model: Model) -> Model:
    """``model``, or a copy whose nodes do not end their inputs with an omitted optional
    one (``""``). The two are the same model in ONNX; onnxruntime's graph optimizer
    crashes the process on some such nodes (a LayerNormalization whose bias is ``""``)."""
    from .model import iter_graphs

    def trailing(node: gs.Node) -> bool:
        return bool(node.inputs) and not node.inputs[-1].name

    if not any(trailing(n) for g in iter_graphs(model.graph) for n in g.nodes):
        return model
    model = model.copy()
    for g in iter_graphs(model.graph):
        for node in g.nodes:
            while trailing(node):
                node.inputs.pop()
    return model


def run_model(model: Model | ort.InferenceSession, feeds: Mapping[str, np.ndarray],
              provider: str = "cpu") -> dict[str, np.ndarray]:
    """Run once; returns output name -> array."""
    import onnxruntime as ort

    sess = model if isinstance(model, ort.InferenceSession) else make_session(model, provider)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds))))


@dataclass
class OutputMetrics:
    """How one output of the candidate compares with the reference's."""

    name: str
    shape: list
    dtype: str
    max_abs: float | None
    max_rel: float | None
    cosine: float | None
    top1_agreement: float | None
    equal_fraction: float
    passed: bool
    reason: str = ""


@dataclass
class ProviderResult:
    provider: str
    passed: bool
    outputs: list[OutputMetrics] = field(default_factory=list)
    latency_ms: dict | None = None
    error: str = ""


@dataclass
class Validation:
    """The result of :func:`validate`: one :class:`ProviderResult` per provider."""

    passed: bool
    mode: str  # "exact" or "fidelity"
    bound: dict
    providers: list[ProviderResult]
    feeds: dict  # {"source": ..., "defaulted": [...], "shapes": {...}}

    def as_dict(self) -> dict:
        return asdict(self)

    def failures(self) -> list[str]:
        """One line per failed output or provider."""
        lines = []
        for p in self.providers:
            if p.error:
                lines.append(f"{p.provider}: {p.error}")
            for o in p.outputs:
                if not o.passed:
                    lines.append(f"{p.provider}: output '{o.name}': {o.reason}")
        return lines


def _looks_like_scores(arr: np.ndarray) -> bool:
    return arr.dtype.kind == "f" and arr.ndim in (2, 3) and arr.shape[-1] >= 2


def compare_outputs(name: str, ref: np.ndarray, cand: np.ndarray, *, exact: bool,
                    rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
                    min_cosine: float = DEFAULT_MIN_COSINE) -> OutputMetrics:
    """Metrics of one output pair and whether it is within the bound."""
    ref = np.asarray(ref)
    cand = np.asarray(cand)
    shape = list(ref.shape)
    if ref.dtype != cand.dtype:
        return OutputMetrics(name, shape, str(ref.dtype), None, None, None, None, 0.0, False,
                             f"dtype changed: {ref.dtype} -> {cand.dtype}")
    if ref.shape != cand.shape:
        return OutputMetrics(name, shape, str(ref.dtype), None, None, None, None, 0.0, False,
                             f"shape changed: {list(ref.shape)} -> {list(cand.shape)}")
    if ref.dtype.kind not in "fciub":
        eq = np.asarray(ref == cand)
        frac = float(eq.mean()) if eq.size else 1.0
        ok = frac == 1.0 if exact else frac >= min_cosine
        return OutputMetrics(name, shape, str(ref.dtype), None, None, None, None, frac, ok,
                             "" if ok else f"{(1 - frac) * 100:.2f}% of the values differ")
    with np.errstate(all="ignore"):
        return _compare_numeric(name, ref, cand, shape, exact=exact, rtol=rtol, atol=atol,
                                min_cosine=min_cosine)


def _compare_numeric(name, ref, cand, shape, *, exact, rtol, atol, min_cosine) -> OutputMetrics:
    if ref.dtype.kind == "c":  # compare real and imaginary parts as floats
        ref = np.stack([ref.real, ref.imag], -1)
        cand = np.stack([cand.real, cand.imag], -1)
    r = ref.astype(np.float64)
    c = cand.astype(np.float64)
    same_nan = np.isnan(r) & np.isnan(c)
    same_inf = np.isinf(r) & (r == c)
    special = same_nan | same_inf  # positions that match although not finite
    diff = np.where(special, 0.0, np.abs(r - c))
    diff = np.where(np.isnan(diff), np.inf, diff)
    rabs = np.where(np.isfinite(r), np.abs(r), 0.0)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / np.maximum(rabs, atol)).max()) if diff.size else 0.0
    equal_fraction = float(((r == c) | special).mean()) if r.size else 1.0
    cosine = None
    top1 = None
    if ref.dtype.kind == "f":
        both_finite = np.isfinite(r) & np.isfinite(c)
        rv = np.where(both_finite, r, 0.0).ravel()
        cv = np.where(both_finite, c, 0.0).ravel()
        nr, nc = np.linalg.norm(rv), np.linalg.norm(cv)
        if nr == 0 and nc == 0:
            cosine = 1.0 if not (~both_finite & ~special).any() else 0.0
        elif nr == 0 or nc == 0:
            cosine = 0.0
        else:
            cosine = float(np.clip(np.dot(rv, cv) / (nr * nc), -1.0, 1.0))
            if (~both_finite & ~special).any():  # a value turned into NaN/inf
                cosine = min(cosine, 0.0)
        if _looks_like_scores(ref) and ref.size:
            top1 = float((ref.argmax(-1) == cand.argmax(-1)).mean())
    if exact:
        if ref.dtype.kind == "f":
            bad = diff > atol + rtol * rabs
            ok = not bool(bad.any())
            reason = "" if ok else (f"{int(bad.sum())} of {bad.size} values differ beyond "
                                    f"atol={atol:g}+rtol={rtol:g}·|ref| (max abs {max_abs:.3g})")
        else:
            ok = equal_fraction == 1.0
            reason = "" if ok else f"{(1 - equal_fraction) * 100:.2f}% of the values differ"
    else:
        if cosine is not None:
            ok = cosine >= min_cosine
            reason = "" if ok else f"cosine {cosine:.5f} < {min_cosine}"
        else:
            ok = equal_fraction >= min_cosine
            reason = "" if ok else f"only {equal_fraction * 100:.2f}% of the values agree"
    return OutputMetrics(name, shape, str(ref.dtype), max_abs, max_rel, cosine, top1,
                         equal_fraction, ok, reason)


def _latency(ref_sess, cand_sess, feeds, runs: int, warmup: int) -> dict:
    for _ in range(warmup):
        ref_sess.run(None, feeds)
        cand_sess.run(None, feeds)
    times: dict[str, list[float]] = {"reference": [], "candidate": []}
    pair = (("reference", ref_sess), ("candidate", cand_sess))
    for r in range(runs):  # alternate who runs first: the second of a pair sees a warmer cache
        for key, sess in (pair if r % 2 == 0 else pair[::-1]):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times[key].append((time.perf_counter() - t0) * 1000.0)
    return {k: {"median": float(np.median(v)), "p90": float(np.percentile(v, 90))}
            for k, v in times.items()}


def validate(reference: Model, candidate: Model, feeds: Mapping[str, np.ndarray] | None = None, *,
             shapes: Mapping[str, Sequence[int]] | None = None, providers: Sequence[str] = ("cpu",),
             exact: bool = True, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
             min_cosine: float = DEFAULT_MIN_COSINE, runs: int = 10, warmup: int = 2,
             threads: int | None = None, seed: int = 0, feeds_source: str = "") -> Validation:
    """Run ``reference`` and ``candidate`` on the same feeds on each provider and compare.

    ``feeds`` default to deterministic random ones generated from the reference's input
    signature (``shapes`` fixes dynamic dimensions). ``runs=0`` skips the latency
    measurement. Raises :class:`ReferenceFailed` if the reference itself cannot run, and
    :class:`FeedError` if the feeds do not match the model.
    """
    providers = check_providers(providers)
    notes: list[str] = []
    if feeds is None:
        feeds, notes = random_feeds(reference, shapes, seed=seed)
        source = "generated"
    else:
        check_feeds(reference, feeds)
        source = feeds_source or "given"
    feeds = dict(feeds)
    bound = ({"rtol": rtol, "atol": atol} if exact else {"min_cosine": min_cosine})
    shapes_used = {k: list(np.asarray(v).shape) for k, v in feeds.items()}
    feeds_info = {"source": source, "defaulted": notes, "shapes": shapes_used}
    mode = "exact" if exact else "fidelity"
    mismatch = _signature_mismatch(reference, candidate)
    if mismatch:
        return Validation(False, mode, bound,
                          [ProviderResult(p, False, [], None, mismatch) for p in providers], feeds_info)
    results = []
    for provider in providers:
        try:
            ref_sess = make_session(reference, provider, threads=threads)
            ref_out = run_model(ref_sess, feeds)
        except (FeedError, ProviderUnavailable):
            raise
        except Exception as exc:
            raise ReferenceFailed(
                f"the reference model does not run on onnxruntime ({provider}): "
                f"{_first_line(exc)}; use --no-validate to skip validation") from exc
        try:
            cand_sess = make_session(candidate, provider, threads=threads)
            cand_out = run_model(cand_sess, feeds)
        except ProviderUnavailable:
            raise
        except Exception as exc:
            results.append(ProviderResult(provider, False, [], None,
                                          f"the candidate does not run: {_first_line(exc)}"))
            continue
        outputs = [compare_outputs(name, ref_out[name], cand_out.get(name, np.array([])),
                                   exact=exact, rtol=rtol, atol=atol, min_cosine=min_cosine)
                   for name in ref_out]
        latency = _latency(ref_sess, cand_sess, feeds, runs, warmup) if runs > 0 else None
        results.append(ProviderResult(provider, all(o.passed for o in outputs), outputs, latency))
    return Validation(all(r.passed for r in results), mode, bound, results, feeds_info)


def _signature_mismatch(reference: Model, candidate: Model) -> str:
    """Why the two models cannot be compared input-for-input and output-for-output."""
    ref_in = [t.name for t in reference.graph.inputs if not isinstance(t, gs.Constant)]
    cand_in = [t.name for t in candidate.graph.inputs if not isinstance(t, gs.Constant)]
    if ref_in != cand_in:
        return f"the models take different inputs: {ref_in} vs {cand_in}"
    ref_out = [t.name for t in reference.graph.outputs]
    cand_out = [t.name for t in candidate.graph.outputs]
    if ref_out != cand_out:
        return f"the models give different outputs: {ref_out} vs {cand_out}"
    return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:2])[:400]
