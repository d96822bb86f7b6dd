"""``optimize``: load, run a pipeline, validate against the original, write — in one call.

This is what the ``onnxopt optimize`` command runs, and what a training repo calls as a
post-export step::

    model, report = onnxopt.optimize("model.onnx", "default", output="model.opt.onnx")
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from .errors import ValidationFailed
from .framework import Group, PassContext, Progress
from .manager import DEFAULT_MAX_ROUNDS, PassManager
from .model import Model
from .report import Report, layer_channels, layer_figures, model_figures
from .validate import DEFAULT_ATOL, DEFAULT_MIN_COSINE, DEFAULT_RTOL, check_providers, validate

__all__ = ["optimize", "load"]

log = logging.getLogger(__name__)


def load(source) -> Model:
    """``Model.load`` for a path, bytes or ``onnx.ModelProto``; a ``Model`` is copied."""
    if isinstance(source, Model):
        return source.copy()
    return Model.load(source)


def optimize(
    model: str | os.PathLike | bytes | onnx.ModelProto | Model,
    pipeline: str = "default",
    *,
    output: str | os.PathLike | None = None,
    feeds: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    calibration=None,
    providers: Sequence[str] = ("cpu",),
    validate_output: bool = True,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    min_cosine: float = DEFAULT_MIN_COSINE,
    runs: int = 10,
    threads: int | None = None,
    verify_each: bool = False,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    force: bool = False,
    external_data: bool | None = None,
    progress: Progress | None = None,
    seed: int = 0,
) -> tuple[Model, Report]:
    """Run ``pipeline`` over ``model`` and check the result against the original.

    ``model`` is never modified (a path is read; a ``Model`` is copied). ``feeds`` (a
    ``.npz``/``.npy`` path or a dict) are the validation inputs; without them feeds are
    generated from the input signature, with ``shapes`` fixing dynamic dimensions.
    ``calibration`` (a ``.npz`` path, a folder of ``.npz``, or an iterable of feed dicts) is
    for the passes that need data. If every pass that changed the model is exact, the
    outputs must match within ``rtol``/``atol``; otherwise their cosine must reach
    ``min_cosine``; without ``feeds``, the first calibration sample (if any) is what both
    are run on. With ``output`` the model is written there — unless validation failed,
    which raises :class:`ValidationFailed` (``force=True`` writes anyway).

    Returns the optimized model and the :class:`Report`.
    """
    started = time.perf_counter()
    manager = PassManager(pipeline, max_rounds=max_rounds, verify_each=verify_each,
                          rtol=rtol, atol=atol, min_cosine=min_cosine)
    # the CPU provider is in every onnxruntime build: a run without validation need not load it
    providers = ["cpu"] if tuple(providers) == ("cpu",) else check_providers(providers)
    source_path = str(model) if isinstance(model, (str, os.PathLike)) else None
    candidate = load(model)
    # The built-in exact passes never read the original: without validation the report's
    # figures of it are taken before the run, and no copy is made.
    needs_reference = validate_output or verify_each or not _builtin_exact(manager)
    # the copy shares the weights' bytes: nothing changes them in place
    reference = candidate.copy() if needs_reference else None
    if output is not None:
        candidate.check_output_path(output)

    original = reference if reference is not None else candidate  # the input, as it is now
    feeds, calib, feed_source, notes = _data(original, feeds, calibration, shapes, verify_each, seed)
    manager.feeds = feeds

    ctx = PassContext(reference=reference, calibration=calib, providers=tuple(providers),
                      shapes=dict(shapes or {}), feeds=feeds, progress=progress or Progress(),
                      logger=logging.getLogger("onnxopt.passes"), seed=seed)
    input_figures = model_figures(original, source_path,
                                  _file_bytes(source_path) if source_path else None)
    before = layer_channels(original) if reference is None else None
    result = manager.run(candidate, ctx)

    # a model written to ``output`` is measured on disk instead (below)
    report = Report(pipeline=result.pipeline, input=input_figures,
                    output=model_figures(candidate) if output is None else {},
                    passes=[r.as_dict() for r in result.records],
                    converged=result.converged, groups=result.groups, notes=notes)
    report.layers = layer_figures(reference, candidate, report.passes, before=before)
    for r in result.rolled_back:
        report.notes.append(f"pass {r.name} was rolled back: {r.error}")

    if validate_output:
        with ctx.progress.task(f"validating on {', '.join(providers)}"):
            v = validate(reference, candidate, feeds, shapes=shapes, providers=providers,
                         exact=not result.lossy, rtol=rtol, atol=atol, min_cosine=min_cosine,
                         runs=runs, threads=threads, seed=seed, feeds_source=feed_source)
        report.validation = [p for p in v.as_dict()["providers"]]
        report.validation_mode = v.mode
        report.validation_bound = v.bound
        report.feeds = v.feeds
        if not v.passed and not force:
            report.output = report.output or model_figures(candidate)
            report.seconds = time.perf_counter() - started
            why = "; ".join(v.failures())[:600]
            unwritten = "; output not written (--force writes it)" if output is not None else ""
            raise ValidationFailed(f"validation failed: {why}{unwritten}",
                                   model=candidate, report=report)
    if output is not None:
        path = Path(output)
        candidate.save(path, external_data=external_data)
        report.output = model_figures(candidate, str(path), _file_bytes(str(path)))
    report.seconds = time.perf_counter() - started
    return candidate, report


def _data(original: Model, feeds, calibration, shapes, verify_each: bool, seed: int
          ) -> tuple[dict | None, object, str, list[str]]:
    """The validation feeds, the calibration data, where the feeds come from, and notes
    on generated feeds."""
    notes: list[str] = []
    feed_source = ""
    if feeds is None and not verify_each and calibration is None:
        return None, None, feed_source, notes
    from .data import check_feeds, load_feeds, open_calibration, random_feeds

    if isinstance(feeds, (str, os.PathLike)):
        feed_source = str(feeds)
        feeds = load_feeds(feeds, original)
    elif feeds is not None:
        feeds = dict(feeds)
        check_feeds(original, feeds)
        feed_source = "given"
    elif verify_each:
        feeds, notes = random_feeds(original, shapes, seed=seed)
        feed_source = "generated"
    calib = open_calibration(calibration, original) if calibration is not None else None
    if feeds is None and calib is not None:
        # real data beats generated noise for judging a lossy rewrite
        feeds = dict(next(iter(calib)))
        feed_source = f"{calib.source} (first calibration sample)"
    return feeds, calib, feed_source, notes


def _builtin_exact(manager: PassManager) -> bool:
    """Whether every pass of the pipeline is one of the library's exact passes."""
    steps = [s for step in manager.steps for s in (step.steps if isinstance(step, Group) else [step])]
    return all(s.pass_.exact and type(s.pass_).__module__.startswith("onnxopt.passes.") for s in steps)


def _file_bytes(path: str | None) -> int | None:
    if not path or not os.path.exists(path):
        return None
    total = os.path.getsize(path)
    data = path + ".data"
    if os.path.exists(data):
        total += os.path.getsize(data)
    return total
