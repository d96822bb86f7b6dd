"""The search's report (the JSON ``search`` block) and its terminal table.

The ``search`` block holds ``objective``, ``floor`` {``min_cosine``, ``min_metric``},
``trials`` (each: ``id``, ``pipeline``, ``kind`` trial|preset, ``preset``, ``bytes``,
``latency_ratio``, ``cosine``, ``metric``, ``meets_floor``, ``pareto``, ``chosen``,
``seconds``), ``chosen`` (the chosen trial's id, or None), ``cut`` (the time budget
stopped the search), ``seconds`` and ``workers`` — and beside them what a reader needs to
trust the result: the final validation on unseen feeds, the probes, the data split, the
space searched, the executor, cache hits, and the command that reproduces the model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from .. import __version__
from ..report import SCHEMA_VERSION

__all__ = ["search_report", "limiting_layers", "render_search"]

TRIAL_KEYS = ("id", "pipeline", "kind", "preset", "label", "bytes", "latency_ratio", "latency_ms", "cosine",
              "cosines", "metric", "meets_floor", "pareto", "chosen", "seconds", "cached", "predicted_error",
              "error", "node")


def limiting_layers(probes: Sequence[dict], count: int = 5) -> list[str]:
    """The layers whose transform alone moved the outputs most (the probes' figures)."""
    measured = [p for p in probes if p.get("error") is not None]
    worst = sorted(measured, key=lambda p: -p["error"])[:count]
    out = []
    for p in worst:
        option = f"@{p['option']:g}" if isinstance(p.get("option"), (int, float)) else ""
        out.append(f"{p['layer']} ({p['family']}{option} alone: 1-cos {p['error']:.2g})")
    return out


def search_report(run, chosen, finals: list[dict], best_effort: int | None) -> dict:
    """The whole JSON report of a search (``run`` is the driver's state)."""
    trials = [{k: t.get(k) for k in TRIAL_KEYS} for t in run.trials]
    executor = run.executor.describe()
    nodes = {j.get("node") for j in run.trials + run.probes if j.get("node") and not j.get("cached")}
    executor["nodes_used"] = len(nodes) if nodes else None
    block = {
        "objective": run.objective,
        "floor": {"min_cosine": run.min_cosine, "min_metric": run.min_metric},
        "trials": trials,
        "chosen": run.trials[chosen[0]]["id"] if chosen else None,
        "cut": run.cut,
        "seconds": round(time.monotonic() - run.started, 2),
        "workers": executor["workers"],
        "executor": executor,
        "time_budget": run.time_budget,
        "space": list(run.families),
        "notes": list(run.notes),
        "metric": run.metric.spec if run.metric is not None else None,
        "metric_original": getattr(run, "metric_reference", None),
        "data": run.split.describe(),
        "final": finals,
        "closest": run.trials[best_effort]["id"] if best_effort is not None else None,
        "limiting_layers": limiting_layers(run.probes) if not chosen else [],
        "probes": run.probes,
        "jobs_run": run.jobs_run,
        "cache": {"folder": str(run.cache.folder) if run.cache.folder else None, "hits": run.cache.hits,
                  "writes": run.cache.writes},
    }
    if run.cut:
        block["notes"].append(f"the time budget ({run.time_budget:g} s) ran out: the best found so far was chosen")
    chosen_trial = run.trials[chosen[0]] if chosen else None
    # a schema-1 report (what `onnxopt report` and the HTML page read) whose pipeline is the
    # chosen one; the search itself is the "search" block
    return {"schema": SCHEMA_VERSION, "onnxopt": __version__,
            "pipeline": chosen_trial["pipeline"] if chosen_trial else None,
            "input": {"path": run.source, "bytes": len(run.shared.models["original"])},
            "output": {"path": None, "bytes": chosen_trial["bytes"] if chosen_trial else None},
            "passes": [], "converged": True, "groups": [], "validated": chosen is not None,
            "validation": None, "notes": list(block["notes"]), "search": block}


def _fmt_bytes(n) -> str:
    if n is None:
        return "—"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def render_search(report: dict, console, *, all_trials: bool = False) -> None:
    """The Pareto front (and the presets) as a table, then the choice and its command."""
    from rich.markup import escape
    from rich.table import Table

    s = report["search"]
    rows = [t for t in s["trials"] if all_trials or t["pareto"] or t["kind"] == "preset" or t["chosen"]]
    title = (f"search ({s['objective']}, floor cosine ≥ {s['floor']['min_cosine']}"
             + (f", metric ≥ {s['floor']['min_metric']}" if s["floor"]["min_metric"] is not None else "")
             + f"): {len(s['trials'])} models measured in {s['seconds']:.0f} s on {s['workers']} worker(s)"
             + (" — cut by the time budget" if s["cut"] else ""))
    t = Table(title=title, title_justify="left")
    for col in ("id", "what", "size", "latency ×", "cosine", "metric", "floor", "front"):
        t.add_column(col, overflow="fold")
    for tr in rows:
        mark = "[bold green]chosen[/]" if tr["chosen"] else ("yes" if tr["pareto"] else "")
        what = tr["label"] or tr["pipeline"]
        if tr.get("error"):
            what += f" (failed: {tr['error'][:60]})"
        t.add_row(tr["id"], escape(what), _fmt_bytes(tr["bytes"]),
                  "—" if tr["latency_ratio"] is None else f"{tr['latency_ratio']:.3f}",
                  "—" if tr["cosine"] is None else f"{tr['cosine']:.5f}",
                  "—" if tr["metric"] is None else f"{tr['metric']:.4f}",
                  "meets" if tr["meets_floor"] else "no", mark)
    console.print(t)
    for note in s["notes"]:
        console.print(f"note: {escape(note)}")
    if s["chosen"]:
        final = next((f for f in s["final"] if f["trial"] == s["chosen"]), None)
        if final:
            console.print(f"chosen {s['chosen']}: on {final['samples']} unseen samples ({escape(final['source'])}) "
                          f"cosine {final['cosine']:.5f}"
                          + (f", metric {final['metric']:.4f}" if final.get("metric") is not None else ""))
    if s.get("command"):
        console.print("reproduce with:")
        console.print(escape(s["command"]), soft_wrap=True)
