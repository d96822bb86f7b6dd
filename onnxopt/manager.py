"""PassManager: run a pipeline of passes over a model, with figures for every pass.

Steps run in order; a group ``[...]`` runs round after round until a whole round changes
nothing (converged) or ``max_rounds`` is reached (not converged: the report says so).
Every pass run is timed and recorded with node and tensor-byte counts before and after.
After a pass that changed the model, the declared types of intermediate tensors that
shape inference contradicts are dropped (:mod:`onnxopt.declarations`).

With ``verify_each`` the manager snapshots the model before each pass and, after it,
runs ``onnx.checker`` and compares the result with the snapshot on onnxruntime (exact
passes: float tolerance) or with the original model (lossy passes: the fidelity bound).
A pass that breaks the model — or raises — is rolled back, named in the record, and the
pipeline goes on without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from .declarations import drop_contradicted_declarations
from .errors import OnnxoptError, PassFailed
from .framework import PassContext, PassStep, Step, describe_pipeline, parse_pipeline
from .model import Model, gc_paused
from .validate import DEFAULT_ATOL, DEFAULT_MIN_COSINE, DEFAULT_RTOL, validate

__all__ = ["PassManager", "PassRecord", "RunResult", "DEFAULT_MAX_ROUNDS"]

log = logging.getLogger(__name__)

DEFAULT_MAX_ROUNDS = 8


@dataclass
class PassRecord:
    """One run of one pass (the report's ``passes`` entries)."""

    name: str
    options: dict
    exact: bool
    modified: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    bytes_before: int
    bytes_after: int
    stats: dict = field(default_factory=dict)
    group: int | None = None
    round: int | None = None
    rolled_back: bool = False
    error: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunResult:
    """What a pipeline run did: one record per pass run, and the groups' convergence."""

    pipeline: str
    records: list[PassRecord]
    groups: list[dict]
    converged: bool

    @property
    def modified(self) -> bool:
        return any(r.modified and not r.rolled_back for r in self.records)

    @property
    def lossy(self) -> bool:
        """Whether a lossy pass changed the model (validation then uses the fidelity bound)."""
        return any(r.modified and not r.rolled_back and not r.exact for r in self.records)

    @property
    def rolled_back(self) -> list[PassRecord]:
        return [r for r in self.records if r.rolled_back]


class PassManager:
    """Runs a pipeline (string, preset name or parsed steps) over models.

    ``verify_each`` needs onnxruntime to run the model: ``feeds`` (or ``shapes`` for
    generated feeds) say what to run it on. ``feeds`` also reach the passes (the context's
    ``feeds``, unless the context has its own).
    """

    def __init__(self, pipeline: str | Sequence[Step] = "default", *,
                 max_rounds: int = DEFAULT_MAX_ROUNDS, verify_each: bool = False,
                 feeds: Mapping[str, np.ndarray] | None = None, rtol: float = DEFAULT_RTOL,
                 atol: float = DEFAULT_ATOL, min_cosine: float = DEFAULT_MIN_COSINE):
        self.steps: list[Step] = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
        if max_rounds < 1:
            raise ValueError("max_rounds must be at least 1")
        self.max_rounds = max_rounds
        self.verify_each = verify_each
        self.feeds = feeds
        self.rtol, self.atol, self.min_cosine = rtol, atol, min_cosine

    @property
    def pipeline(self) -> str:
        return describe_pipeline(self.steps)

    def run(self, model: Model, ctx: PassContext | None = None) -> RunResult:
        """Run every step over ``model`` (mutated in place)."""
        self._summary = None  # the model's figures after the last pass: the next one's "before"
        ctx = ctx or PassContext()
        if ctx.feeds is None and self.feeds is not None:
            ctx = replace(ctx, feeds=self.feeds)
        self._state = object()  # the model's state; a new one after every change
        try:
            with gc_paused():
                return self._run(model, ctx)
        finally:
            model.settle(None)

    def _run(self, model: Model, ctx: PassContext) -> RunResult:
        records: list[PassRecord] = []
        groups: list[dict] = []
        for index, step in enumerate(self.steps):
            if isinstance(step, PassStep):
                records.append(self._run_one(step, model, ctx))
                continue
            converged = False
            rounds = 0
            for rounds in range(1, self.max_rounds + 1):
                changed = False
                for inner in step.steps:
                    rec = self._run_one(inner, model, ctx, group=index, round_=rounds)
                    records.append(rec)
                    changed |= rec.modified and not rec.rolled_back
                if not changed:
                    converged = True
                    break
            if not converged:
                log.warning("group [%s] did not converge in %d rounds", step.source, self.max_rounds)
            groups.append({"pipeline": "[" + ",".join(s.pass_.spec() for s in step.steps) + "]",
                           "rounds": rounds, "converged": converged})
        return RunResult(self.pipeline, records, groups, all(g["converged"] for g in groups))

    def _run_one(self, step: PassStep, model: Model, ctx: PassContext, *,
                 group: int | None = None, round_: int | None = None) -> PassRecord:
        p = step.pass_
        before = self._summary or model.summary()
        snapshot = model.copy() if self.verify_each else None
        model.settle(self._state)  # passes after passes that changed nothing share analyses
        log.info("running %s", p.spec())
        t0 = time.perf_counter()
        error = ""
        try:
            with ctx.progress.task(f"{p.spec()}" + (f" (round {round_})" if round_ else "")):
                result = p.run(model, ctx)
        except OnnxoptError:
            raise
        except Exception as exc:
            if snapshot is None:
                raise PassFailed(p.name, _first_line(exc)) from exc
            log.warning("pass %s raised (%s); rolled back", p.name, _first_line(exc))
            model.restore(snapshot)
            error = f"raised: {_first_line(exc)}"
            result = None
        seconds = time.perf_counter() - t0
        rolled_back = result is None
        if result is not None and result.modified:
            self._state = object()  # a new state, whose inference the next pass may reuse
            model.settle(self._state)
            drop_contradicted_declarations(model)
        if result is not None and result.modified and snapshot is not None:
            problem = self._verify(p, model, snapshot, ctx)
            if problem:
                log.warning("pass %s broke the model (%s); rolled back", p.name, problem)
                model.restore(snapshot)
                rolled_back, error = True, problem
        changed = (result is not None and result.modified) or rolled_back
        if rolled_back:
            self._state = object()
        after = model.summary() if changed else before
        self._summary = after
        return PassRecord(
            name=p.name, options=dict(p.given), exact=p.exact,
            modified=bool(result.modified) if result is not None else False,
            seconds=round(seconds, 6),
            nodes_before=before.nodes_total, nodes_after=after.nodes_total,
            bytes_before=before.tensor_bytes, bytes_after=after.tensor_bytes,
            stats=_plain(result.stats) if result is not None else {},
            group=group, round=round_, rolled_back=rolled_back, error=error)

    def _verify(self, p, model: Model, snapshot: Model, ctx: PassContext) -> str:
        try:
            proto = model.to_proto()
            if proto.ByteSize() < 2**31 and not model.has_external_data():
                onnx.checker.check_model(proto)
        except Exception as exc:
            return f"onnx.checker: {_first_line(exc)}"
        reference = snapshot if p.exact or ctx.reference is None else ctx.reference
        try:
            v = validate(reference, model, self.feeds, shapes=ctx.shapes, providers=ctx.providers[:1],
                         exact=p.exact, rtol=self.rtol, atol=self.atol, min_cosine=self.min_cosine,
                         runs=0)
        except OnnxoptError:
            raise
        except Exception as exc:
            return f"onnxruntime: {_first_line(exc)}"
        return "" if v.passed else "; ".join(v.failures())[:500]


def _plain(value):
    """Stats as JSON-friendly values (numpy scalars/arrays to Python)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
