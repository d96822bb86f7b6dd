"""``search``: from a model, calibration data, an objective and a fidelity floor to the best
compressed model, its Pareto front, and the pipeline that reproduces it.

The phases, each a batch of jobs for the executor (in-process or Ray), every result
cached on disk by content:

1. the ``default`` clean-up; the layers each family may change;
2. reference points (the presets, each family applied whole) and per-layer sensitivity
   probes (one transform on one layer);
3. allocation: candidates along the trade-off, each built as a real model and measured;
4. refinement: bisection of the quantization ladders between the last candidate that met
   the floor and the first that did not, the combinations of what met it, and (with
   ``finetune`` in the space) the closest misses trained again; then the presets that
   train, with what is left of the budget;
5. the choice — the best objective among the candidates meeting the floor — validated
   once more on feeds the search never used, then written.

A time budget cuts the search at a phase's boundary or in the middle of one: the best
candidate found so far is validated and written, and the report says the search was cut.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

from .. import __version__
from ..errors import UsageError
from ..framework import Progress
from ..manager import PassManager
from ..model import Model
from ..validate import DEFAULT_MIN_COSINE
from .allocate import dc_candidates, dc_options, quant_ladder
from .cache import ResultCache, data_digest, default_cache_dir, digest
from .choose import SearchResult, finish
from .data_split import split_data
from .executors import make_executor
from .jobs import config_job, preset_jobs, probe_error, probe_jobs
from .metric import load_metric
from .pareto import meets_floor, objective_value, ranked
from .space import Config, Layers, discover, int4_cleanup, parse_space
from .tasks import Shared, run_job, run_outputs

__all__ = ["search", "SearchResult", "DEFAULT_TIME_BUDGET"]

log = logging.getLogger(__name__)

DEFAULT_TIME_BUDGET = 600.0
#: Bisection rounds of each quantization ladder after the allocation's candidates, and
#: the points each round measures — a constant, not the number of workers: the same seed
#: must choose the same model on one worker and on a cluster.
REFINE_ROUNDS = 3
BISECT_POINTS = 2
#: The ``finetune`` family: candidates trained again, at most this many, each one that
#: missed the floor by at most this many times the allowance (1 - floor) and would beat
#: the best candidate meeting the floor by this share of the objective.
FINETUNE_TRIALS = 2
FINETUNE_REACH = 10.0
FINETUNE_GAIN = 0.05


def search(model, output=None, *, calibration, feeds=None, objective: str = "latency",
           min_cosine: float = DEFAULT_MIN_COSINE, metric=None, min_metric: float | None = None,
           time_budget: float | None = DEFAULT_TIME_BUDGET, space=None, workers: int | None = None,
           address: str | None = None, backend: str = "auto", report: str | os.PathLike | None = None,
           seed: int = 0, force: bool = False, cache_dir: str | os.PathLike | None | bool = True,
           probe_samples: int = 4, progress: Progress | None = None, job_fn=None) -> SearchResult:
    """Search for the best compressed model on ``objective`` (``latency`` or ``size``)
    whose worst output keeps a cosine of at least ``min_cosine`` to the original's on
    held-out samples (and ``metric`` >= ``min_metric`` where given).

    ``model``: a path, bytes, ``ModelProto`` or ``Model`` (never modified).
    ``calibration``: what ``optimize`` takes (a ``.npz``, a folder, feed dicts); part of
    it is held out. ``feeds``: the final validation's feeds (default: calibration
    samples held back). ``space``: families (``int8,int4,fp16,prune,share,channels,
    finetune``; default: all that can move the objective but ``finetune``). ``workers``/``address``/
    ``backend``: where jobs run (``auto``: a local Ray with this machine's cores when Ray
    is installed, else in this process). ``cache_dir``: where results are kept (True:
    the default folder; None/False: no cache). ``job_fn``: the job function (default
    :func:`~onnxopt.autocompress.tasks.run_job`).

    Writes ``output`` (and ``report``, JSON) when given. Raises :class:`ValidationFailed`
    (exit code 1) when no candidate meets the floor — with ``force`` the candidate
    closest to it is written first — and :class:`UsageError` for bad arguments.
    """
    run = _Search(model, output, calibration=calibration, feeds=feeds, objective=objective,
                  min_cosine=min_cosine, metric=metric, min_metric=min_metric, time_budget=time_budget,
                  space=space, workers=workers, address=address, backend=backend, report=report, seed=seed,
                  force=force, cache_dir=cache_dir, probe_samples=probe_samples,
                  progress=progress or Progress(), job_fn=job_fn or run_job)
    return run.run()


class _Search:
    def __init__(self, model, output, *, calibration, feeds, objective, min_cosine, metric, min_metric,
                 time_budget, space, workers, address, backend, report, seed, force, cache_dir,
                 probe_samples, progress, job_fn):
        self.started = time.monotonic()
        self.families, self.notes = parse_space(space, objective)
        if not 0.0 < min_cosine <= 1.0:
            raise UsageError(f"--min-cosine must be in (0, 1]; got {min_cosine}")
        if time_budget is not None and time_budget <= 0:
            raise UsageError(f"--time-budget must be positive; got {time_budget}")
        self.objective, self.min_cosine, self.min_metric = objective, min_cosine, min_metric
        self.metric = load_metric(metric)
        if min_metric is not None and self.metric is None:
            raise UsageError("--min-metric needs --metric")
        self.deadline = None if time_budget is None else self.started + float(time_budget)
        self.time_budget = time_budget
        self.output, self.report_path, self.seed, self.force = output, report, seed, force
        self.progress, self.job_fn = progress, job_fn
        self.executor_args = (backend, workers, address)
        self.original = model.copy() if isinstance(model, Model) else Model.load(model)
        self.source = str(model) if isinstance(model, (str, os.PathLike)) else None
        if output is not None:
            self.original.check_output_path(output)
        _check_report_path(report)
        self.data_args = (calibration, feeds, probe_samples)
        self.cache = ResultCache(None if cache_dir in (None, False) else
                                 default_cache_dir() if cache_dir is True else cache_dir)
        self.trials: list[dict] = []
        self.probes: list[dict] = []
        self.cut = False
        self.jobs_run = 0
        self.recalibrated: set[str] = set()

    # ---- set-up -------------------------------------------------------------------

    def _prepare(self) -> None:
        calibration, feeds, probe_samples = self.data_args
        self.split = split_data(self.original, calibration, feeds, seed=self.seed, probe_samples=probe_samples)
        original_bytes = self.original.to_bytes()
        with self.progress.task("clean-up (default) and layer discovery"):
            clean = self.original.copy()
            PassManager("default").run(clean)
            models = {"original": original_bytes, "clean": clean.to_bytes()}
            int4_clean = None
            if "int4" in self.families:
                int4_clean = self.original.copy()
                PassManager(int4_cleanup()).run(int4_clean)
                models["clean_int4"] = int4_clean.to_bytes()
            self.layers: Layers = discover(clean, self.families, self.split.probe[0], int4_clean)
        self.clean_bytes = len(models["clean"])
        probe_ref = run_outputs(original_bytes, self.split.probe)
        hold_ref = run_outputs(original_bytes, self.split.holdout)
        self.hold_ref = hold_ref
        if self.metric is not None:
            self.metric_reference = self.metric(hold_ref, hold_ref, self.split.holdout)
        self.shared = Shared(models=models, calibration=self.split.calibration, probe=self.split.probe,
                             probe_reference=probe_ref, holdout=self.split.holdout, holdout_reference=hold_ref,
                             latency_feed=self.split.holdout[0], seed=self.seed)
        self.base_key = digest("onnxopt-search", __version__, original_bytes,
                               data_digest([self.split.calibration, self.split.holdout]), self.seed,
                               self.shared.latency_seconds)

    def _key(self, job: dict) -> str:
        return digest(self.base_key, job["kind"], job["pipeline"], job.get("start"),
                      self.metric.spec if self.metric is not None and job["kind"] == "trial" else None)

    # ---- running jobs ---------------------------------------------------------------

    def _until(self, share: float) -> float | None:
        """The end of a phase that may use the budget up to ``share`` of it (so that
        candidates are still measured when probes alone could fill it)."""
        if self.deadline is None:
            return None
        return min(self.deadline, self.started + share * float(self.time_budget))

    def _run(self, jobs: list[dict], what: str) -> list[tuple[dict, dict]]:
        """Run ``jobs`` (cache first), returning (job, result) pairs. Stopped by the
        budget, the search is marked cut; a job holding ``until`` (its phase's end) that
        could not start by then is dropped, and the search goes on with what was measured."""
        seen = {t["pipeline"] for t in self.trials}
        jobs = [{**j, "outputs": self.metric is not None and j["kind"] == "trial"} for j in jobs
                if j["kind"] == "probe" or j["pipeline"] not in seen]
        jobs = list({(j["kind"], j["pipeline"], j.get("start")): j for j in jobs}.values())
        done: list[tuple[dict, dict]] = []
        todo = []
        for job in jobs:
            cached = self.cache.get(self._key(job))
            if cached is not None:
                done.append((job, {**cached, "cached": True}))
            else:
                todo.append(job)
        if todo and not self.cut:
            if self.deadline is not None:  # as a wall-clock time: a Ray task may run on another host
                wall = time.time() + (self.deadline - time.monotonic())
                for job in todo:  # this phase's own copies of the jobs
                    job["deadline"] = wall
            with self.progress.task(what, len(jobs)) as advance:
                advance(len(done))
                for job, result in self.executor.map_unordered(self.job_fn, todo, self.handle, self.deadline):
                    self.jobs_run += 1
                    outputs = result.pop("outputs", None)
                    if outputs is not None and self.metric is not None:
                        feeds = self.split.holdout
                        result["metric"] = self.metric(self.hold_ref, outputs, feeds)
                    if not result.get("cut") and not result.get("error", "").startswith("task failed"):
                        self.cache.put(self._key(job), result)
                    done.append((job, {**result, "cached": False}))
                    advance(1)
        if len(done) < len(jobs) and self.deadline is not None and time.monotonic() >= self.deadline:
            self.cut = True
        elif len(done) < len(jobs):
            self.notes.append(f"{what}: {len(jobs) - len(done)} of {len(jobs)} left out to keep time for what follows")
        order = {id(j): i for i, j in enumerate(jobs)}
        done.sort(key=lambda pair: order[id(pair[0])])  # ids follow the jobs' order, not who finished first
        for job, result in done:
            self._record(job, result)
        return done

    def _record(self, job: dict, result: dict) -> None:
        if job["kind"] == "probe":
            self.probes.append({"family": job["family"], "layer": job["layer"], "option": job["option"],
                                "error": probe_error(result), "bytes": result.get("bytes"),
                                "seconds": result.get("seconds"), "cached": result.get("cached", False),
                                "failure": result.get("error"), "node": result.get("node")})
            return
        trial = {"id": f"{'p' if job['type'] == 'preset' else 't'}{len(self.trials) + 1}",
                 "pipeline": job["pipeline"], "kind": job["type"], "preset": job.get("preset"),
                 "label": job.get("label") or job.get("preset") or "",
                 "bytes": result.get("bytes"), "latency_ratio": result.get("latency_ratio"),
                 "latency_ms": result.get("latency_ms"), "cosine": result.get("cosine"),
                 "cosines": result.get("cosines"), "metric": result.get("metric"),
                 "predicted_error": job.get("predicted_error"), "sha": result.get("sha"),
                 "modified": result.get("modified"), "error": result.get("error"),
                 "seconds": result.get("seconds"), "cached": result.get("cached", False),
                 "config": job.get("config"), "changed_layers": result.get("changed_layers"),
                 "node": result.get("node")}
        if job.get("preset") == "default":
            trial["label"] = "default (clean-up only: reference)"
        trial["meets_floor"] = meets_floor(trial, self.min_cosine, self.min_metric)
        self.trials.append(trial)

    def _remaining(self) -> bool:
        return not self.cut and (self.deadline is None or time.monotonic() < self.deadline)

    # ---- the phases ---------------------------------------------------------------

    def run(self) -> SearchResult:
        self.executor = make_executor(*self.executor_args)
        try:
            self._prepare()
            self.handle = self.executor.share(self.shared)
            watch = {"int8": [x.name for x in self.layers.compute], "int4": [x.name for x in self.layers.int4]}
            whole = [config_job(Config(b, label=f"{b} (whole model)"), watch=watch.get(b, ()))
                     for b in ("int8", "int4", "fp16") if b in self.families]
            self._run(whole, "each family on the whole model")
            quantizing = [f for f in self.families if f in ("int8", "int4")]
            only = {f: self._whole(f).get("changed") for f in quantizing}
            weights = [f for f in self.families if f in ("prune", "share")]
            probes = probe_jobs(quantizing, self.layers, only) + probe_jobs(weights, self.layers)
            channels = probe_jobs(["channels"], self.layers) if "channels" in self.families else []
            # the presets run beside the probes (and are never dropped for time: they are
            # the comparison; one that trains runs last); the probes may start until half
            # of the budget, channel probes until 60 %
            refs, notes = preset_jobs(self.families)
            self.notes += notes
            training = [j for j in refs if j["trains"]]
            if self._remaining():
                self._run([j for j in refs if not j["trains"]] + _until(probes, self._until(0.5))
                          + _until(channels, self._until(0.6)), "presets and sensitivity probes")
            if self._remaining():
                self._run(_until(self._allocate(), self._until(0.85)), "candidates")
            for _ in range(REFINE_ROUNDS):
                if not self._remaining():
                    break
                jobs = self._refine()
                if not jobs:
                    break
                self._run(jobs, "refinement")
            # a preset that trains takes minutes: measured last, with what is left of the
            # budget, so that it never holds a worker the candidates needed
            if training and self._remaining():
                self._run(training, "presets that train")
            elif training:
                self.notes.append(f"{', '.join(j['preset'] for j in training)}: not measured, "
                                  "no time was left for a preset that trains")
            return self._finish()
        finally:
            self.executor.close()

    def _whole(self, family: str) -> dict:
        """The family applied to the whole model: the layers it changed (None: unknown)
        and its measured error."""
        for t in self.trials:
            cfg = t.get("config")
            if cfg is not None and cfg.branch == family and not cfg.float_layers and not cfg.channels \
                    and not cfg.fp16 and not cfg.finetune and not t.get("error"):
                changed = t.get("changed_layers")
                return {"changed": set(changed) if changed is not None else None,
                        "error": None if t.get("cosine") is None else 1.0 - t["cosine"]}
        return {"changed": None, "error": None}

    def _ladder(self, family: str):
        """The family's quantization ladder, its probe errors scaled so that quantizing
        every layer predicts the error the whole-model trial measured (layers interact:
        the sum of errors alone underestimates it)."""
        errors = {p["layer"]: p["error"] for p in self.probes if p["family"] == family}
        measured = self._whole(family)["error"]
        total = sum(e for e in errors.values() if e is not None)
        if measured is not None and total > 0:
            errors = {k: None if e is None else e * measured / total for k, e in errors.items()}
        layers = self.layers.compute if family == "int8" else self.layers.int4
        return quant_ladder(layers, errors, self.objective)

    def _allocate(self) -> list[dict]:
        allowance = 1.0 - self.min_cosine or 1e-4
        jobs = []
        for family in ("int8", "int4"):
            if family not in self.families:
                continue
            ladder = self._ladder(family)
            for k in ladder.prefixes(allowance):
                cfg = Config(family, float_layers=ladder.float_layers(k),
                             label=f"{family}, {len(ladder.order) - k} of {len(ladder.order)} layers float")
                jobs.append(config_job(cfg, predicted=ladder.predicted(k)))
        if {"prune", "share"} & set(self.families):
            jobs += self._dc_jobs(allowance)
        if "channels" in self.families:
            jobs += self._channel_jobs(allowance)
        return jobs

    def _dc_jobs(self, allowance: float) -> list[dict]:
        probes: dict[str, dict] = {}
        for p in self.probes:
            if p["family"] in ("prune", "share"):
                value = None if p["error"] is None else (p["error"], p["bytes"])
                probes.setdefault(p["layer"], {})[(p["family"], p["option"])] = value
        options = {}
        for w in self.layers.weights:
            opts = dc_options(w, probes.get(w.name, {}), self.clean_bytes)
            if "prune" not in self.families:
                opts = [o for o in opts if o.sparsity == 0]
            if "share" not in self.families:
                opts = [o for o in opts if o.bits == 0]
            if len(opts) > 1:
                options[w.name] = opts
        jobs = []
        for choice, err, _saved in dc_candidates(options, allowance):
            prune = tuple(sorted((n, o.sparsity) for n, o in choice.items() if o.sparsity))
            share = tuple(sorted((n, o.bits) for n, o in choice.items() if o.bits))
            cfg = Config("dc", prune=prune, share=share, label=_dc_label(prune, share))
            jobs.append(config_job(cfg, predicted=err))
        return jobs

    def _channel_jobs(self, allowance: float) -> list[dict]:
        from .allocate import channel_candidates

        errors = {int(p["layer"]): p["error"] for p in self.probes if p["family"] == "channels"}
        jobs = []
        for ratio, exclude, predicted in channel_candidates(self.layers.groups, errors, allowance):
            cfg = Config("fp32", channels=ratio, channel_exclude=exclude,
                         label=f"channels {ratio:g}, {len(exclude)} layers' groups kept")
            jobs.append(config_job(cfg, predicted=predicted))
        return jobs

    def _refine(self) -> list[dict]:
        jobs = []
        for family in ("int8", "int4"):
            if family in self.families:
                jobs += self._bisect(family)
        jobs += self._recalibrated()
        jobs += self._combinations()
        jobs += self._finetuned()
        return jobs

    def _finetuned(self) -> list[dict]:
        """Once, with ``finetune`` in the space: the candidates that missed the floor by
        less than :data:`FINETUNE_REACH` times the allowance and beat the best one that
        met it by :data:`FINETUNE_GAIN` on the objective, again with training last (at
        most :data:`FINETUNE_TRIALS`: the best of each kind first, best objective first)."""
        if "finetune" not in self.families or "finetune" in self.recalibrated:
            return []
        allowance = 1.0 - self.min_cosine or 1e-4
        ok = ranked(self.trials, self.objective, self.min_cosine, self.min_metric,
                    eligible=lambda t: t.get("preset") != "default" and bool(t.get("modified")))
        bar = objective_value(self.trials[ok[0]], self.objective) * (1 - FINETUNE_GAIN) if ok else None
        near = []
        for t in self.trials:
            cfg, value = t.get("config"), objective_value(t, self.objective)
            if cfg is None or cfg.finetune or t["meets_floor"] or t.get("error") or t.get("cosine") is None \
                    or value is None or (bar is not None and value > bar) \
                    or 1.0 - t["cosine"] > FINETUNE_REACH * allowance:
                continue
            near.append(t)
        if not near:
            return []
        self.recalibrated.add("finetune")
        near.sort(key=lambda t: (objective_value(t, self.objective), -t["cosine"], t["id"]))
        kinds: set[str] = set()
        first = []  # the best of each kind first, then the next best of any
        for t in near:
            cfg = t["config"]
            kind = ("channels" if cfg.channels else cfg.branch) + ("+fp16" if cfg.fp16 else "")
            if kind not in kinds:
                kinds.add(kind)
                first.append(t)
        chosen = (first + [t for t in near if t not in first])[:FINETUNE_TRIALS]
        return [config_job(replace(t["config"], finetune=True, label=t["config"].label + " + finetune"))
                for t in chosen]

    def _recalibrated(self) -> list[dict]:
        """Candidates of the per-weight and per-group allocations again, once, with the
        budget divided by how far the measured errors exceeded the predicted ones (the
        layers' errors do not simply add up)."""
        allowance = 1.0 - self.min_cosine or 1e-4
        jobs = []
        for kind, make in (("dc", self._dc_jobs), ("channels", self._channel_jobs)):
            if kind in self.recalibrated:
                continue
            ratios = []
            for t in self.trials:
                cfg, predicted = t.get("config"), t.get("predicted_error")
                if cfg is None or not predicted or t.get("cosine") is None or cfg.fp16 or \
                        ("channels" if cfg.channels else cfg.branch) != kind or cfg.branch == "int8":
                    continue
                ratios.append(max(1.0 - t["cosine"], 0.0) / predicted)
            if not ratios:
                continue
            self.recalibrated.add(kind)
            scale = float(statistics.median(ratios))
            if scale > 1.5:
                jobs += make(allowance / scale)
        return jobs

    def _bisect(self, family: str) -> list[dict]:
        ladder = self._ladder(family)
        n = len(ladder.order)
        measured: dict[int, bool] = {}
        for t in self.trials:
            cfg = t.get("config")
            if cfg is not None and cfg.branch == family and not cfg.channels and not cfg.fp16 and not cfg.finetune:
                k = n - len(cfg.float_layers)
                if ladder.float_layers(k) == tuple(sorted(cfg.float_layers)):
                    measured[k] = t["meets_floor"]
        ok = max([k for k, met in measured.items() if met] + [0])
        above = [k for k, met in measured.items() if not met and k > ok]
        if not above:
            return []
        fail = min(above)
        if fail - ok <= 1:
            return []
        points = min(BISECT_POINTS, fail - ok - 1)
        ks = sorted({ok + round((fail - ok) * (i + 1) / (points + 1)) for i in range(points)} - {ok, fail})
        return [config_job(Config(family, float_layers=ladder.float_layers(k),
                                  label=f"{family}, {n - k} of {n} layers float"), predicted=ladder.predicted(k))
                for k in ks]

    def _combinations(self) -> list[dict]:
        """What met the floor, combined: Deep Compression then fp16 (size), channels then
        the best int8 choice."""
        jobs = []
        fp16_ok = any(t["meets_floor"] for t in self.trials if (t.get("config") or Config("")).branch == "fp16")
        best = {}
        for i in ranked(self.trials, self.objective, self.min_cosine, self.min_metric,
                        eligible=lambda t: t.get("config") is not None):
            cfg = self.trials[i]["config"]
            key = ("channels" if cfg.channels else cfg.branch) + ("+fp16" if cfg.fp16 else "")
            best.setdefault(key, cfg)
        if fp16_ok and self.objective == "size" and "dc" in best:
            jobs.append(config_job(replace(best["dc"], fp16=True, label=best["dc"].label + " + fp16")))
        if "channels" in best and "int8" in best:
            ch = best["channels"]
            jobs.append(config_job(Config("int8", float_layers=best["int8"].float_layers, channels=ch.channels,
                                          channel_exclude=ch.channel_exclude,
                                          label=f"{ch.label} + {best['int8'].label}")))
        return jobs

    def _finish(self) -> SearchResult:
        return finish(self)


def _until(jobs: list[dict], until: float | None) -> list[dict]:
    return [{**j, "until": until} for j in jobs]


def _dc_label(prune, share) -> str:
    parts = []
    if prune:
        sparsities = sorted({s for _, s in prune})
        parts.append(f"prune {len(prune)} layers ({'/'.join(f'{s:g}' for s in sparsities)})")
    if share:
        bits = sorted({b for _, b in share})
        parts.append(f"share {len(share)} layers ({'/'.join(map(str, bits))} bits)")
    return ", ".join(parts)


def _check_report_path(path) -> None:
    if path is None:
        return
    folder = Path(path).parent
    if not folder.is_dir():
        raise UsageError(f"--report {path}: folder {folder} does not exist")
