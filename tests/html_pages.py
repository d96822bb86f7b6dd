"""The reports the HTML tests draw: real runs of ``optimize`` and dicts built by hand.

``exact``, ``lossy`` and ``failed`` come from real runs on the small CNN; ``search``
is the exact report with the keys a search and a fine-tuning pass fill (``search`` and a
pass whose stats hold ``history``), written as those features document them. Each is
computed once per test session.
"""

from __future__ import annotations

import copy
import functools

import numpy as np

from models.builders import cnn
from onnxopt import ValidationFailed, optimize

SHAPES = {"input": (4, 3, 32, 32)}
LOSSY = "prune-channels(ratio=0.3,scope=sensitivity),reconstruct,quantize(min_cosine=0.99999)"
FAILING = "prune-magnitude(sparsity=0.9,min_size=100)"


def _calibration() -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"input": rng.standard_normal(SHAPES["input"]).astype(np.float32)} for _ in range(8)]


@functools.cache
def _report(kind: str) -> dict:
    if kind == "exact":
        return optimize(cnn(), "default", shapes=SHAPES, runs=3)[1].as_dict()
    if kind == "lossy":
        return optimize(cnn(), LOSSY, calibration=_calibration(), shapes=SHAPES, runs=3, min_cosine=0.9)[1].as_dict()
    if kind == "failed":
        try:
            optimize(cnn(), FAILING, shapes=SHAPES, runs=3, min_cosine=0.999)
        except ValidationFailed as exc:
            return exc.report.as_dict()
        raise AssertionError(f"{FAILING} was expected to fail validation at cosine 0.999")
    if kind == "search":
        return with_search(_report("exact"))
    raise KeyError(kind)


def report(kind: str) -> dict:
    """A fresh copy of one of the reports: ``exact``, ``lossy``, ``failed`` or ``search``."""
    return copy.deepcopy(_report(kind))


KINDS = ("exact", "lossy", "search", "failed")


def search_block() -> dict:
    """A ``search`` key as a search over pipelines fills it: presets, trials, a chosen one."""
    def trial(i, pipeline, nbytes, ratio, cos, *, kind="trial", preset=None, pareto=False, chosen=False):
        return {"id": f"t{i:02d}", "pipeline": pipeline, "kind": kind, "preset": preset, "bytes": nbytes,
                "latency_ratio": ratio, "cosine": cos, "metric": None, "meets_floor": cos >= 0.99,
                "pareto": pareto, "chosen": chosen, "seconds": 1.5 + i / 10}

    trials = [
        trial(0, "default", 43_000, 1.0, 1.0, kind="preset", preset="default", pareto=True),
        trial(1, "default,quantize(mode=static,method=percentile,min_cosine=0.995)", 14_000, 0.62, 0.9961,
              kind="preset", preset="int8", pareto=True),
        trial(2, "prune-magnitude(sparsity=0.5),share-weights(bits=5)", 12_500, 1.01, 0.9932, pareto=True,
              chosen=True),
        trial(3, "prune-magnitude(sparsity=0.8),share-weights(bits=4)", 8_100, 1.0, 0.951),
        trial(4, "share-weights(bits=6)", 16_400, 1.0, 0.9979),
        trial(5, "prune-channels(ratio=0.5),reconstruct", 11_000, 0.55, 0.962),
        trial(6, "share-weights(bits=3)", 9_900, 1.0, 0.981),
    ]
    return {"objective": "size", "floor": {"min_cosine": 0.99, "min_metric": None}, "trials": trials,
            "chosen": "t02", "cut": False, "seconds": 42.5, "workers": 2}


def finetune_record() -> dict:
    """A ``finetune`` pass record whose stats hold the loss and hold-out fidelity history."""
    steps = list(range(0, 200, 5))
    loss = [float(0.8 * np.exp(-s / 50) + 0.02) for s in steps]
    holdout_step = list(range(0, 200, 25))
    holdout = [float(0.95 + 0.045 * (1 - np.exp(-s / 60))) for s in holdout_step]
    return {"name": "finetune", "options": {"steps": 200}, "exact": False, "modified": True, "seconds": 12.0,
            "nodes_before": 12, "nodes_after": 12, "bytes_before": 40_000, "bytes_after": 40_000,
            "stats": {"steps": 200, "history": {"step": steps, "loss": loss, "holdout": holdout,
                                                "holdout_step": holdout_step}},
            "group": None, "round": None, "rolled_back": False, "error": ""}


def with_search(data: dict) -> dict:
    data = copy.deepcopy(data)
    data["search"] = search_block()
    data["passes"].append(finetune_record())
    return data
