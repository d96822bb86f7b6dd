"""The Pareto front of measured candidates and the choice among them.

A candidate is a dict as the report holds it (``bytes``, ``latency_ratio``, ``cosine``,
``metric``, ``error`` ...). Its objective value is its file bytes (objective ``size``) or
its latency ratio to the original (``latency``); lower is better. Fidelity is the worst
output's cosine on held-out samples and, with a user metric, that metric; higher is
better. A candidate is on the front when no other is at least as good on every axis and
better on one. The choice is the best objective among the candidates that meet the floor
(ties: higher cosine, then fewer bytes, then the shorter pipeline, then the earlier trial).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["objective_value", "meets_floor", "pareto_front", "ranked"]


def objective_value(trial: dict, objective: str) -> float | None:
    value = trial.get("bytes") if objective == "size" else trial.get("latency_ratio")
    return None if value is None else float(value)


def meets_floor(trial: dict, min_cosine: float, min_metric: float | None) -> bool:
    if trial.get("error") or trial.get("cosine") is None:
        return False
    if trial["cosine"] < min_cosine:
        return False
    if min_metric is not None and (trial.get("metric") is None or trial["metric"] < min_metric):
        return False
    return True


def _axes(trial: dict, objective: str, with_metric: bool) -> tuple | None:
    obj = objective_value(trial, objective)
    if obj is None or trial.get("error") or trial.get("cosine") is None:
        return None
    axes = [-obj, trial["cosine"]]
    if with_metric:
        if trial.get("metric") is None:
            return None
        axes.append(trial["metric"])
    return tuple(axes)


def pareto_front(trials: Sequence[dict], objective: str, with_metric: bool = False) -> list[int]:
    """Indices of the trials on the front (all axes: higher is better once negated)."""
    points = [(i, _axes(t, objective, with_metric)) for i, t in enumerate(trials)]
    points = [(i, a) for i, a in points if a is not None]
    front = []
    for i, a in points:
        dominated = any(all(x >= y for x, y in zip(b, a)) and any(x > y for x, y in zip(b, a))
                        for j, b in points if j != i)
        if not dominated:
            front.append(i)
    return front


def ranked(trials: Sequence[dict], objective: str, min_cosine: float, min_metric: float | None,
           eligible=lambda t: True) -> list[int]:
    """Indices of the eligible trials meeting the floor, best first."""
    keep = [i for i, t in enumerate(trials)
            if eligible(t) and meets_floor(t, min_cosine, min_metric) and objective_value(t, objective) is not None]

    def key(i: int):
        # ties: fidelity, then the file size (deterministic, unlike a second latency
        # figure), then the shorter pipeline (a preset over its spelled-out twin)
        t = trials[i]
        size = t.get("bytes") if objective == "latency" else 0
        return (objective_value(t, objective), -t["cosine"], size or 0, len(t.get("pipeline") or ""), i)

    return sorted(keep, key=key)
