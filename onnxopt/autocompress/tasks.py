"""The one function every probe and trial runs, in-process or as a Ray task.

:func:`run_job` builds a model by running a pipeline of registered passes — from the
original model (a trial: the pipeline reproduces the model with ``onnxopt optimize``) or
from the cleaned model (a probe: one transform on one layer) — and measures it: the file
bytes, the fidelity to the original on samples it was not calibrated on (cosine per
output, aggregated over the samples), and for trials the latency ratio to the original.
Everything it reads comes in :class:`Shared` (the models and the data, put in Ray's
object store once) and the small job dict; it returns a plain dict and never raises for a
candidate that fails — the error is part of the result.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import OutOfTime

__all__ = ["Shared", "run_job", "cosines", "run_outputs", "changed_layers"]

log = logging.getLogger(__name__)


@dataclass
class Shared:
    """What every job reads: model bytes and data, sent to workers once.

    ``models``: name -> bytes (``original`` and the cleaned starting points of probes).
    ``calibration``: the samples passes calibrate on. ``probe``/``holdout``: samples a
    probe/trial measures fidelity on, with the original's outputs on them
    (``probe_reference``/``holdout_reference``). ``latency_feed``: what latency runs on.
    """

    models: dict[str, bytes]
    calibration: list[dict[str, np.ndarray]]
    probe: list[dict[str, np.ndarray]]
    probe_reference: list[dict[str, np.ndarray]]
    holdout: list[dict[str, np.ndarray]]
    holdout_reference: list[dict[str, np.ndarray]]
    latency_feed: dict[str, np.ndarray]
    seed: int = 0
    latency_seconds: float = 1.0
    extra: dict = field(default_factory=dict)


def run_outputs(model_bytes: bytes, samples: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The model's outputs on each sample (one onnxruntime session)."""
    from ..validate import make_session

    sess = make_session(model_bytes)
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(names, dict(s)))) for s in samples]


def cosines(reference: Sequence[Mapping[str, np.ndarray]], candidate: Sequence[Mapping[str, np.ndarray]]
            ) -> dict[str, float]:
    """Per output, the cosine between the reference's and the candidate's values over all
    samples together (non-float outputs: the fraction of equal values). A shape change or
    a value turned non-finite gives 0."""
    out: dict[str, float] = {}
    for name in reference[0]:
        dot = na = nb = 0.0
        equal = total = 0
        broken = False
        for r, c in zip(reference, candidate):
            a = np.asarray(r[name])
            b = np.asarray(c.get(name, np.array([])))
            if a.shape != b.shape:
                broken = True
                break
            if a.dtype.kind != "f":
                equal += int(np.count_nonzero(a == b))
                total += a.size
                continue
            a64 = a.astype(np.float64).ravel()
            b64 = b.astype(np.float64).ravel()
            if not np.isfinite(b64).all() and np.isfinite(a64).all():
                broken = True
                break
            a64 = np.nan_to_num(a64, posinf=0.0, neginf=0.0)
            b64 = np.nan_to_num(b64, posinf=0.0, neginf=0.0)
            dot += float(a64 @ b64)
            na += float(a64 @ a64)
            nb += float(b64 @ b64)
        if broken:
            out[name] = 0.0
        elif total:
            out[name] = equal / total
        elif na == 0 and nb == 0:
            out[name] = 1.0
        elif na == 0 or nb == 0:
            out[name] = 0.0
        else:
            out[name] = float(np.clip(dot / np.sqrt(na * nb), -1.0, 1.0))
    return out


def changed_layers(model, names: Sequence[str]) -> list[str]:
    """Which of the layers ``names`` a quantizing pipeline changed: gone from the graph
    (rewritten into another op) or reading a DequantizeLinear output."""
    nodes = {n.name: n for n in model.graph.nodes}
    changed = []
    for name in names:
        node = nodes.get(name)
        if node is None or any(t.inputs and t.inputs[0].op == "DequantizeLinear" for t in node.inputs):
            changed.append(name)
    return changed


def _build(job: dict, shared: Shared):
    from ..data import open_calibration
    from ..framework import PassContext
    from ..manager import PassManager
    from ..model import Model

    original = Model.load(shared.models["original"])
    model = Model.load(shared.models[job.get("start", "original")])
    calibration = open_calibration(list(shared.calibration), original) if shared.calibration else None
    ctx = PassContext(reference=original, calibration=calibration, seed=shared.seed,
                      logger=logging.getLogger("onnxopt.passes"), deadline=job.get("deadline"))
    result = PassManager(job["pipeline"]).run(model, ctx)
    records = [{"name": r.name, "modified": r.modified, "stats": _small(r.stats)} for r in result.records
               if not r.exact]
    return model, records


def _small(stats: dict) -> dict:
    """The scalar figures of a pass's stats (the per-layer tables stay behind)."""
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool)) or v is None}


def run_job(job: dict, shared: Shared) -> dict:
    """Build and measure one probe or trial (see the module doc). ``job`` holds ``kind``
    (``probe``/``trial``), ``pipeline``, ``start`` (the model it starts from) and
    ``outputs`` (return the outputs on the held-out samples, for a user's metric) and
    ``deadline`` (``time.time()`` by which a training pass must be done: one that cannot
    is stopped and the result says ``cut``)."""
    started = time.perf_counter()
    result: dict = {"pipeline": job["pipeline"], "kind": job["kind"]}
    try:
        model, records = _build(job, shared)
        if job.get("watch"):
            result["changed_layers"] = changed_layers(model, job["watch"])
        data = model.to_bytes()
        result["records"] = records
        result["modified"] = any(r["modified"] for r in records)
        result["bytes"] = len(data)
        result["sha"] = hashlib.blake2b(data, digest_size=16).hexdigest()
        if job["kind"] == "probe":
            got = run_outputs(data, shared.probe)
            result["cosines"] = cosines(shared.probe_reference, got)
        else:
            got = run_outputs(data, shared.holdout)
            result["cosines"] = cosines(shared.holdout_reference, got)
            if job.get("outputs"):
                result["outputs"] = got
            timing = latency_ratio_of(shared, data)
            result.update(timing)
        result["cosine"] = min(result["cosines"].values()) if result["cosines"] else 1.0
    except Exception as exc:  # a candidate that cannot be built or run is a result too
        log.debug("job %s failed", job["pipeline"], exc_info=True)
        result["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        if isinstance(exc, OutOfTime):
            result["cut"] = True
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def latency_ratio_of(shared: Shared, data: bytes) -> dict:
    from .timing import latency_ratio

    t = latency_ratio(shared.models["original"], data, shared.latency_feed, target_seconds=shared.latency_seconds)
    return {"latency_ratio": t["latency_ratio"], "latency_ms": {"original": t["original_ms"],
                                                                "candidate": t["candidate_ms"]},
            "latency_runs": t["runs"]}
