"""The charts of the HTML report, drawn as inline SVG with matplotlib's SVG back end.

Each function takes plain figures from the JSON report and returns a :class:`Plot`: its
title, a text alternative (what the chart shows, in one or two sentences, for screen
readers and for whoever cannot see it) and the ``<svg>`` element itself, ready to be
placed in a page. Text stays text (``svg.fonttype: none``) so the page is small and
searchable, element ids are prefixed per plot so that many plots can share one page, and
every data mark (bar, line, point) carries an id containing ``-data-`` so a test can find
it. matplotlib is the optional ``report`` extra: :func:`require` says so in one line when
it is missing, and nothing here is imported by the core at start-up.
"""

from __future__ import annotations

import io
import math
import re
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import UsageError

__all__ = ["EXTRA_HINT", "Plot", "require", "preload", "op_counts_plot", "pass_gains_plot", "fidelity_plot",
           "latency_plot", "layer_plot", "group_plot", "pareto_plot", "history_plot"]

EXTRA_HINT = "HTML reports need matplotlib: pip install 'onnxopt[report]'"

BEFORE, AFTER, FAIL, PASS, GUARD, PRESET, CHOSEN, MUTED = (
    "#9ca3af", "#2563eb", "#dc2626", "#16a34a", "#f59e0b", "#7c3aed", "#eab308", "#6b7280")

_STYLE = {
    "svg.fonttype": "none",
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica"],
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e5e7eb",
    "grid.linewidth": 0.6,
    "axes.axisbelow": True,
    "legend.frameon": False,
    "legend.fontsize": 8,
}
WIDTH = 9.0  # inches; the page scales the SVG to its column


@dataclass
class Plot:
    """One chart: ``slug`` (unique in a page), ``title``, ``alt`` (text alternative), ``svg``."""

    slug: str
    title: str
    alt: str
    svg: str


def require() -> None:
    """Raise :class:`UsageError` naming the ``report`` extra when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UsageError(EXTRA_HINT) from exc


def preload() -> threading.Thread:
    """Import matplotlib on a background thread, so that a long run that will end in a page
    pays for the import while onnxruntime works (it releases the interpreter). A failure
    is left to :func:`require`, which reports it when the page is made."""

    def load() -> None:
        try:
            import matplotlib.backends.backend_svg  # noqa: F401
            import matplotlib.figure  # noqa: F401
        except Exception:  # noqa: BLE001 - reported by require() when the page is made
            pass

    thread = threading.Thread(target=load, name="onnxopt-plots-preload", daemon=True)
    thread.start()
    return thread


@contextmanager
def _figure(width: float, height: float, *, left: float = 0.7, bottom: float = 0.5, top: float = 0.25,
            right: float = 0.25, wspace: float = 0.8, hspace: float = 0.25, **subplots):
    """A figure with fixed margins in inches (a layout engine would draw every figure twice)."""
    require()
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(width, height))
        axes = fig.subplots(**subplots) if subplots else fig.subplots()
        ncols = subplots.get("ncols", 1)
        inner = width - left - right - wspace * (ncols - 1)
        fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                            top=1 - top / height, wspace=wspace * ncols / max(inner, 0.5),
                            hspace=hspace * subplots.get("nrows", 1) / max(height - top - bottom, 0.5))
        yield fig, axes


def _label_inches(labels: Sequence[str], size: float = 9) -> float:
    """Room a column of tick labels needs (an estimate: 0.6 em per character)."""
    return 0.15 + 0.6 * size / 72 * max((len(label) for label in labels), default=0)


def _finish(fig, slug: str, title: str, alt: str) -> Plot:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({**_STYLE, "svg.hashsalt": slug}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r'id="([^"]+)"', lambda m: f'id="{slug}-{m.group(1)}"', text)
    text = text.replace("url(#", f"url(#{slug}-").replace('href="#', f'href="#{slug}-')
    head = text.index(">") + 1
    root = re.sub(r'\swidth="[^"]*"\sheight="[^"]*"', "", text[:head - 1])
    root += (f' role="img" aria-labelledby="{slug}-title {slug}-desc" preserveAspectRatio="xMidYMid meet">'
             f'<title id="{slug}-title">{_esc(title)}</title><desc id="{slug}-desc">{_esc(alt)}</desc>')
    return Plot(slug, title, alt, root + text[head:])


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _mark(artists, tag: str) -> None:
    """Give each data artist an id the browser test looks for (``...-data-...``)."""
    for i, artist in enumerate(artists):
        artist.set_gid(f"data-{tag}-{i}")


def _log_axis(axis, set_scale) -> None:
    """A log axis labelled ``1e-05``: matplotlib's default labels are mathtext, whose parser
    costs more than drawing the whole chart."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    set_scale("log")
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")))
    axis.set_minor_formatter(NullFormatter())


def _short(label: str, limit: int = 28) -> str:
    return label if len(label) <= limit else label[:limit // 2 - 1] + "…" + label[-(limit // 2):]


def _range(values: Sequence[float]) -> str:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "no values"
    return f"from {min(vals):.4g} to {max(vals):.4g}"


# --------------------------------------------------------------------------------------
# model and passes
# --------------------------------------------------------------------------------------


def op_counts_plot(before: dict, after: dict, top: int = 18) -> Plot:
    """Nodes by op type, input against output, the most frequent ``top`` ops."""
    ops = sorted(set(before) | set(after), key=lambda op: (-max(before.get(op, 0), after.get(op, 0)), op))
    shown, rest = ops[:top], ops[top:]
    rows = [(op, before.get(op, 0), after.get(op, 0)) for op in shown]
    if rest:
        rows.append((f"{len(rest)} other op types", sum(before.get(o, 0) for o in rest),
                     sum(after.get(o, 0) for o in rest)))
    labels = [_short(r[0]) for r in rows]
    with _figure(WIDTH, 0.8 + 0.24 * len(rows), left=_label_inches(labels)) as (fig, ax):
        y = list(range(len(rows)))
        b = ax.barh([i - 0.2 for i in y], [r[1] for r in rows], 0.4, color=BEFORE, label="input")
        a = ax.barh([i + 0.2 for i in y], [r[2] for r in rows], 0.4, color=AFTER, label="output")
        _mark(b, "before")
        _mark(a, "after")
        for i, r in enumerate(rows):
            ax.text(max(r[1], r[2]), i, f" {r[1]} → {r[2]}", va="center", fontsize=7, color=MUTED)
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.set_xlabel("nodes (subgraphs included)")
        ax.grid(axis="y", visible=False)
        ax.legend(loc="lower right")
        ax.margins(x=0.12)
    alt = (f"Horizontal bar chart of nodes per op type for the {len(ops)} op types of the two models: "
           + "; ".join(f"{op} {b} to {a}" for op, b, a in rows[:8]) + ("; ..." if len(rows) > 8 else "") + ".")
    return _finish(fig, "ops", "Nodes by op type, input and output", alt)


def pass_gains_plot(passes: list[dict]) -> Plot | None:
    """Nodes removed and tensor bytes saved by each pass run that changed the model."""
    runs = [p for p in passes if p.get("modified") and not p.get("rolled_back")]
    if not runs:
        return None
    labels = [p["name"] + (f" (round {p['round']})" if p.get("round") else "") for p in runs]
    nodes = [p["nodes_before"] - p["nodes_after"] for p in runs]
    kib = [(p["bytes_before"] - p["bytes_after"]) / 1024 for p in runs]
    short = [_short(label, 34) for label in labels]
    with _figure(WIDTH, 0.9 + 0.24 * len(runs), left=_label_inches(short), wspace=0.3,
                 ncols=2, sharey=True) as (fig, (left, right)):
        y = list(range(len(runs)))
        _mark(left.barh(y, nodes, color=[AFTER if n >= 0 else FAIL for n in nodes]), "nodes")
        _mark(right.barh(y, kib, color=[AFTER if k >= 0 else FAIL for k in kib]), "bytes")
        left.set_yticks(y, short)
        left.invert_yaxis()
        left.set_xlabel("nodes removed")
        right.set_xlabel("tensor KiB saved (negative: added)")
        for ax in (left, right):
            ax.axvline(0, color="#374151", linewidth=0.8)
            ax.grid(axis="y", visible=False)
    alt = ("Bar charts of what each pass run bought: "
           + "; ".join(f"{label}: {n} nodes, {k:.1f} KiB" for label, n, k in zip(labels, nodes, kib)) + ".")
    return _finish(fig, "gains", "What each pass bought: nodes removed and tensor bytes saved", alt)


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


def fidelity_plot(provider: str, outputs: list[dict], min_cosine: float | None, slug: str) -> Plot:
    """Cosine and max abs difference per output; failed outputs in red."""
    names = [o["name"] for o in outputs]
    cos = [o.get("cosine") for o in outputs]
    diff = [o.get("max_abs") for o in outputs]
    colors = [PASS if o.get("passed") else FAIL for o in outputs]
    short = [_short(n) for n in names]
    with _figure(WIDTH, 1.0 + 0.3 * len(outputs), left=_label_inches(short), wspace=0.3,
                 ncols=2, sharey=True) as (fig, (left, right)):
        y = list(range(len(outputs)))
        cvals = [c if c is not None and not math.isnan(c) else 0.0 for c in cos]
        _mark(left.barh(y, cvals, color=colors), "cosine")
        low = min([*cvals, min_cosine if min_cosine is not None else 1.0])
        left.set_xlim(max(-1.0, min(0.99, low - 0.05 * (1 - low))), 1.0)
        if min_cosine is not None:
            left.axvline(min_cosine, color=FAIL, linestyle="--", linewidth=1)
            left.text(min_cosine, 1.0, f"bound {min_cosine:g}", transform=left.get_xaxis_transform(),
                      ha="center", va="bottom", color=FAIL, fontsize=8)
        left.set_xlabel("cosine similarity to the original")
        left.set_yticks(y, short)
        left.invert_yaxis()
        from matplotlib.ticker import FuncFormatter, MaxNLocator

        left.xaxis.set_major_locator(MaxNLocator(5))
        left.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))
        dvals = [d if d is not None and d > 0 and not math.isnan(d) else 0.0 for d in diff]
        _mark(right.barh(y, dvals, color=colors), "maxabs")
        if any(d > 0 for d in dvals):
            _log_axis(right.xaxis, right.set_xscale)
        right.set_xlabel("max abs difference")
        for ax in (left, right):
            ax.grid(axis="y", visible=False)
    failed = [n for n, o in zip(names, outputs) if not o.get("passed")]
    alt = (f"Fidelity of {len(outputs)} outputs on {provider}: "
           + "; ".join(f"{n}: cosine {c if c is None else format(c, '.6g')}, max abs "
                       f"{d if d is None else format(d, '.3g')}" for n, c, d in zip(names[:12], cos, diff))
           + (f". Failed: {', '.join(failed)}." if failed else ". All within the bound."))
    return _finish(fig, slug, f"Fidelity per output on {provider}", alt)


def latency_plot(validation: list[dict]) -> Plot | None:
    """Median and p90 latency of the original and the output, per provider."""
    rows = [(v["provider"], v["latency_ms"]) for v in validation if v.get("latency_ms")]
    if not rows:
        return None
    labels, med, p90, colors = [], [], [], []
    for provider, lat in rows:
        for which, color in (("reference", BEFORE), ("candidate", AFTER)):
            labels.append(f"{provider}: {'original' if which == 'reference' else 'optimized'}")
            med.append(lat[which]["median"])
            p90.append(lat[which]["p90"])
            colors.append(color)
    with _figure(WIDTH, 0.9 + 0.42 * len(labels), left=_label_inches(labels)) as (fig, ax):
        y = list(range(len(labels)))
        _mark(ax.barh([i + 0.18 for i in y], p90, 0.34, color=colors, alpha=0.45, label="p90"), "p90")
        _mark(ax.barh([i - 0.18 for i in y], med, 0.34, color=colors, label="median"), "median")
        for i in y:
            ax.text(p90[i], i + 0.18, f" p90 {p90[i]:.3g} ms", va="center", fontsize=7, color=MUTED)
            ax.text(med[i], i - 0.18, f" median {med[i]:.3g} ms", va="center", fontsize=7)
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.set_xlabel("latency (ms): solid = median, light = p90")
        ax.grid(axis="y", visible=False)
        ax.margins(x=0.2)
    alt = "Latency: " + "; ".join(f"{label} median {m:.3g} ms, p90 {p:.3g} ms"
                                  for label, m, p in zip(labels, med, p90)) + "."
    return _finish(fig, "latency", "Latency: median and p90", alt)


# --------------------------------------------------------------------------------------
# per layer
# --------------------------------------------------------------------------------------


def layer_plot(slug: str, title: str, layers: Sequence[str], series: list[tuple[str, list, list | None]],
               note: str = "") -> Plot:
    """Bars over layers in graph order, one panel per figure in ``series``.

    ``series``: (label, values, colors or ``None``) — a value may be ``None`` (no bar)."""
    n = len(layers)
    ticks = [_short(name, 24) for name in layers] if n <= 60 else []
    bottom = _label_inches(ticks, 6) if ticks else 0.5
    with _figure(WIDTH, 0.5 + 1.5 * len(series) + bottom, bottom=bottom, top=0.4 if note else 0.2,
                 nrows=len(series), squeeze=False) as (fig, axes):
        x = list(range(n))
        pad = max(0.0, (12 - n) / 2)  # a few layers: keep the bars narrow, centred
        for k, (label, values, colors) in enumerate(series):
            ax = axes[k][0]
            vals = [0 if v is None else v for v in values]
            _mark(ax.bar(x, vals, 0.8, color=colors or AFTER), f"s{k}")
            ax.set_ylabel(label)
            ax.grid(axis="x", visible=False)
            ax.set_xlim(-0.7 - pad, n - 0.3 + pad)
            if k < len(series) - 1:  # same x as the panel below; only the bottom one is labelled
                ax.set_xticks([])
        if ticks:
            axes[-1][0].set_xticks(x, ticks, rotation=90, fontsize=6)
        else:
            axes[-1][0].set_xlabel("layer (graph order; names in the JSON report)")
        if note:
            fig.suptitle(note, fontsize=8, color=MUTED)
    alt = (f"Bar chart over {n} layers in graph order"
           + "".join(f"; {label}: {_range(v)}" for label, v, _ in series) + "."
           + (f" {note}" if note else ""))
    return _finish(fig, slug, title, alt)


def group_plot(slug: str, title: str, labels: list[str], values: list[float], ylabel: str,
               noun: str = "groups") -> Plot:
    """Bars over named groups or layers (channel groups by sensitivity, layers kept float)."""
    ticks = [_short(label, 24) for label in labels] if len(labels) <= 40 else []
    bottom = _label_inches(ticks, 7) if ticks else 0.5
    with _figure(WIDTH, 1.8 + bottom, bottom=bottom) as (fig, ax):
        x = list(range(len(labels)))
        _mark(ax.bar(x, values, 0.8, color=AFTER), "group")
        if ticks:
            ax.set_xticks(x, ticks, rotation=90, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.grid(axis="x", visible=False)
        pad = max(0.0, (12 - len(labels)) / 2)
        ax.set_xlim(-0.7 - pad, len(labels) - 0.3 + pad)
    alt = f"Bar chart over {len(labels)} {noun}: {ylabel} {_range(values)}."
    return _finish(fig, slug, title, alt)


# --------------------------------------------------------------------------------------
# search and fine-tuning
# --------------------------------------------------------------------------------------


def pareto_plot(search: dict) -> Plot:
    """Objective against fidelity for every trial: the Pareto front, the presets, the chosen one."""
    objective = search.get("objective", "size")
    key, xlabel = (("latency_ratio", "latency / original's") if objective == "latency"
                   else ("bytes", "file MiB"))
    scale = 1.0 if key == "latency_ratio" else 1 / 2 ** 20
    trials = [t for t in search.get("trials", []) if t.get(key) is not None and t.get("cosine") is not None]
    floor = (search.get("floor") or {}).get("min_cosine")
    with _figure(WIDTH, 4.2, left=0.8) as (fig, ax):
        def pts(sel):
            return [t[key] * scale for t in sel], [t["cosine"] for t in sel]

        plain = [t for t in trials if t.get("kind") != "preset"]
        ok = [t for t in plain if t.get("meets_floor")]
        bad = [t for t in plain if not t.get("meets_floor")]
        if ok:
            _mark([ax.scatter(*pts(ok), s=22, color=AFTER, alpha=0.7, label="trial (meets floor)")], "ok")
        if bad:
            _mark([ax.scatter(*pts(bad), s=22, facecolors="none", edgecolors=MUTED, label="trial (below floor)")],
                  "bad")
        front = sorted((t for t in trials if t.get("pareto")), key=lambda t: t[key])
        if front:
            _mark(ax.step(*pts(front), where="post", color=AFTER, linewidth=1.2, label="Pareto front"), "front")
        presets = [t for t in trials if t.get("kind") == "preset"]
        if presets:
            _mark([ax.scatter(*pts(presets), s=60, marker="D", color=PRESET, label="preset", zorder=3)], "preset")
            for t in presets:
                ax.annotate(t.get("preset") or t["id"], (t[key] * scale, t["cosine"]), xytext=(6, 4),
                            textcoords="offset points", fontsize=8, color=PRESET)
        chosen = [t for t in trials if t.get("chosen")]
        if chosen:
            c = chosen[0]
            _mark([ax.scatter([c[key] * scale], [c["cosine"]], s=260, marker="*", color=CHOSEN,
                              edgecolors="#713f12", linewidths=0.8, label="chosen", zorder=4)], "chosen")
            ax.annotate(f"chosen: {c['id']}", (c[key] * scale, c["cosine"]), xytext=(8, -12),
                        textcoords="offset points", fontsize=8, fontweight="bold")
        if floor is not None:
            ax.axhline(floor, color=FAIL, linestyle="--", linewidth=1, label=f"floor: cosine {floor:g}")
        ax.set_xlabel(f"{objective} objective: {xlabel} (smaller is better)")
        ax.set_ylabel("cosine to the original (higher is better)")
        ax.legend(loc="lower right", ncols=2)
    best = chosen[0] if chosen else None
    alt = (f"Scatter plot of {len(trials)} trials, {objective} objective ({xlabel}) against cosine; "
           f"{len(front)} on the Pareto front, {len(presets)} presets"
           + (f"; chosen {best['id']} ({best.get('pipeline', '')}) at {best[key] * scale:.4g} {xlabel}, "
              f"cosine {best['cosine']:.6g}" if best else "; none chosen")
           + (f"; floor cosine {floor:g}." if floor is not None else "."))
    return _finish(fig, "pareto", f"Search: {objective} against fidelity", alt)


def history_plot(slug: str, name: str, history: dict) -> Plot:
    """Training loss, and hold-out fidelity at its own steps, of a fine-tuning pass."""
    steps, loss = history.get("step") or [], history.get("loss") or []
    hold = history.get("holdout") or []
    hsteps = history.get("holdout_step") or (steps if len(hold) == len(steps) else list(range(len(hold))))
    with _figure(WIDTH, 3.0, top=0.4, ncols=2) as (fig, (left, right)):
        _mark(left.plot(steps[:len(loss)], loss, color=AFTER, linewidth=1.4), "loss")
        if loss and min(loss) > 0 and max(loss) / min(loss) > 100:
            _log_axis(left.yaxis, left.set_yscale)
        left.set_xlabel("step")
        left.set_ylabel("training loss")
        left.set_title("loss")
        if hold:
            _mark(right.plot(hsteps[:len(hold)], hold, color=PASS, marker="o", markersize=3, linewidth=1.4),
                  "holdout")
        right.set_xlabel("step")
        right.set_ylabel("hold-out fidelity")
        right.set_title("hold-out fidelity")
    alt = (f"Line charts of {name}: training loss over {len(loss)} steps, {_range(loss)}; "
           f"hold-out fidelity at {len(hold)} points, {_range(hold)}.")
    return _finish(fig, slug, f"{name}: loss and hold-out fidelity", alt)
