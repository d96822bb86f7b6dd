"""The end of a search: the choice, its validation on unseen feeds, and what is written.

The candidates meeting the floor on the held-out samples are taken best objective first;
each is rebuilt from the original model by its pipeline and measured on the final feeds,
which the search never used; the first that still meets the floor is chosen (at most
:data:`FINAL_TRIES` are tried, :data:`CUT_TRIES` when the budget is spent, and then the
one with the most fidelity to spare). When the chosen pipeline read calibration data, the
samples it calibrated on are written beside the model (``NAME.calib.npz``) so that the
printed ``onnxopt optimize`` command rebuilds the very same model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data import Calibration
from ..errors import ValidationFailed
from ..framework import PassContext
from ..manager import PassManager
from ..model import Model
from ..report import write_json
from .pareto import meets_floor, objective_value, pareto_front, ranked
from .space import Config, pipeline
from .summary import limiting_layers, search_report
from .tasks import cosines, run_outputs

__all__ = ["SearchResult", "finish", "write_calibration", "FINAL_TRIES"]

#: Candidates tried in turn when the best one fails the final validation.
FINAL_TRIES = 5
#: Fewer when the time budget is already spent.
CUT_TRIES = 2


@dataclass
class SearchResult:
    """What a search found: the chosen model (None when nothing met the floor and it was
    not forced), the pipeline and command that reproduce it, and the report."""

    model: Model | None
    pipeline: str | None
    command: str | None
    report: dict
    met: bool
    cut: bool
    output: str | None = None
    trials: list[dict] = field(default_factory=list)


def _eligible(t: dict) -> bool:
    """A candidate answer: a lossy pass changed the model (the clean-up alone is a
    reference point, not an answer)."""
    return bool(t.get("modified")) and t.get("preset") != "default"


def final_check(run, trial: dict) -> dict:
    """Rebuild ``trial``'s pipeline from the original and measure it on the final feeds;
    ``calibrated`` says whether a pass read calibration data."""
    samples = list(run.split.calibration)
    used = {"read": False}

    def factory():
        used["read"] = True
        return iter(samples)

    calibration = Calibration(run.original, factory, len(samples), "the search's calibration samples")
    model = run.original.copy()
    PassManager(trial["pipeline"]).run(model, PassContext(reference=run.original, calibration=calibration,
                                                          seed=run.seed))
    data = model.to_bytes()
    reference = run_outputs(run.shared.models["original"], run.split.final)
    got = run_outputs(data, run.split.final)
    per_output = cosines(reference, got)
    final = {"trial": trial["id"], "cosines": per_output, "cosine": min(per_output.values()),
             "samples": len(run.split.final), "source": run.split.final_source,
             "reproduced": hashlib.blake2b(data, digest_size=16).hexdigest() == trial.get("sha")}
    if run.metric is not None:
        final["metric"] = run.metric(reference, got, run.split.final)
    final["meets_floor"] = meets_floor(final, run.min_cosine, run.min_metric)
    return {"model": model, "calibrated": used["read"], **final}


def write_calibration(samples: list[dict[str, np.ndarray]], path: str | os.PathLike) -> str:
    """Write feed dicts as a calibration ``.npz`` (first axis = samples) when they share
    their shapes, else as a folder of ``.npz`` files; atomically (temporary, then rename)."""
    path = Path(path)
    same = all(s.keys() == samples[0].keys() and all(np.shape(s[k]) == np.shape(samples[0][k]) for k in s)
               for s in samples)
    if same:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: np.stack([np.asarray(s[k]) for s in samples]) for k in samples[0]})
        os.replace(tmp, path)
        return str(path)
    folder = path.with_suffix("")
    tmp_dir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{folder.name}."))
    for i, s in enumerate(samples):
        np.savez(tmp_dir / f"{i:06d}.npz", **{k: np.asarray(v) for k, v in s.items()})
    if folder.exists():
        for old in folder.glob("*.npz"):
            old.unlink()
        folder.rmdir()
    os.replace(tmp_dir, folder)
    return str(folder)


def _command(source: str | None, output, pipe: str, calib: str | None) -> str:
    model = shlex.quote(source) if source else "MODEL.onnx"
    out = shlex.quote(str(output)) if output else "OUT.onnx"
    tail = f" --calib {shlex.quote(calib)}" if calib else ""
    return f"onnxopt optimize {model} -o {out} -p {shlex.quote(pipe)}{tail}"


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Config):
        return pipeline(value)
    return str(value)


def _final_order(order: list[int], trials: list[dict], tries: int) -> list[int]:
    """The candidates to validate on unseen feeds: the best ``tries`` on the objective,
    then the one with the most fidelity to spare among the rest — a search that found
    something robust writes it, even when its best candidates were too close to the floor."""
    first = order[:tries]
    rest = order[tries:]
    if rest:
        first.append(max(rest, key=lambda i: (trials[i]["cosine"], trials[i].get("metric") or 0.0, -rest.index(i))))
    return first


def _choose(run) -> tuple[tuple[int, dict] | None, list[dict]]:
    order = ranked(run.trials, run.objective, run.min_cosine, run.min_metric, eligible=_eligible)
    finals = []
    with run.progress.task("final validation on unseen feeds"):
        for i in _final_order(order, run.trials, FINAL_TRIES if not run.cut else CUT_TRIES):
            check = final_check(run, run.trials[i])
            finals.append({k: v for k, v in check.items() if k != "model"})
            if check["meets_floor"]:
                return (i, check), finals
    return None, finals


def finish(run) -> SearchResult:
    """Choose, validate, write (model, calibration samples, report); raise
    :class:`ValidationFailed` when nothing meets the floor."""
    chosen, finals = _choose(run)
    front = pareto_front(run.trials, run.objective, with_metric=run.metric is not None)
    for j, t in enumerate(run.trials):
        t["pareto"] = j in front
        t["chosen"] = chosen is not None and j == chosen[0]
    closest = None
    if chosen is None:
        measured = [i for i, t in enumerate(run.trials) if _eligible(t) and t.get("cosine") is not None
                    and not t.get("error")]
        if measured:
            closest = max(measured, key=lambda i: (run.trials[i]["cosine"],
                                                   -(objective_value(run.trials[i], run.objective) or 0)))
    report = search_report(run, chosen, finals, closest)
    pick = chosen if chosen is not None else (
        (closest, final_check(run, run.trials[closest])) if run.force and closest is not None else None)
    model = pick[1]["model"] if pick else None
    pipe = run.trials[pick[0]]["pipeline"] if pick else None
    written = calib = None
    if model is not None and run.output is not None:
        if pick[1]["calibrated"]:
            calib = write_calibration(run.split.calibration, Path(run.output).with_suffix(".calib.npz"))
        model.save(run.output)
        written = str(run.output)
    command = _command(run.source, run.output, pipe, calib or ("DATA" if pick and pick[1]["calibrated"] else None)) \
        if pipe else None
    report["search"]["command"] = command
    report["search"]["calibration_file"] = calib
    report["output"]["path"] = written
    if run.report_path is not None:
        write_json(json.dumps(report, indent=2, default=_plain), run.report_path)
    result = SearchResult(model, pipe, command, report, chosen is not None, run.cut, written, run.trials)
    if chosen is None:
        raise ValidationFailed(_floor_message(run, closest, written), model=model, report=report)
    return result


def _floor_message(run, best: int | None, written: str | None) -> str:
    floor = f"min cosine {run.min_cosine}" + (f", min metric {run.min_metric}" if run.min_metric is not None else "")
    if best is None:
        return f"no candidate meets the floor ({floor}): none could be built and measured"
    t = run.trials[best]
    got = f"cosine {t['cosine']:.5f}" + (f", metric {t['metric']:.4f}" if t.get("metric") is not None else "")
    limits = limiting_layers(run.probes)
    named = "; limited by " + ", ".join(limits) if limits else ""
    tail = f"; wrote the closest ({t['id']}) to {written}" if written else "; --force writes the closest"
    return f"no candidate meets the floor ({floor}): the closest, {t['id']} '{t['label']}', reaches {got}{named}{tail}"
