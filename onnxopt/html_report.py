"""The HTML report: one self-contained page drawn from the JSON report (schema 1).

The JSON report stays the source of truth; this module only reads it, so a page can be
made long after the run (``onnxopt report report.json -o report.html``). The page is one
file that works offline: inline CSS, plots as inline SVG (:mod:`onnxopt.plots`), no
script, and a Content-Security-Policy that forbids every fetch, so nothing can leave the
file even by accident. It prints well (no backgrounds needed, figures kept whole).

The page is a list of sections, each drawn only when its data is present:

* status — validation passed, failed or skipped; a failed validation opens the page
  with the outputs that failed, in red, first;
* model — input against output: file and tensor bytes, nodes, initializers, parameters,
  IR version, opsets, and nodes by op type (``input.ops``/``output.ops``);
* passes — the pass table with each pass's own figures, and what each run bought;
* fidelity and latency — per provider, per output (failed first) and median/p90 bars;
* layers — per lossy pass, figures over the layers in graph order: ``stats.layers``
  rows (prune-magnitude's sparsity, share-weights' bits ...), the report's ``layers``
  (channels kept, weight bits, layers the accuracy guard kept float), prune-channels'
  ``stats.sensitivity`` by group, the guard's ``float_layers``;
* search — the ``search`` key, filled by a search over pipelines::

      {"objective": "latency" | "size", "floor": {"min_cosine": float, "min_metric": float | None},
       "trials": [{"id": str, "pipeline": str, "kind": "trial" | "preset", "preset": str | None,
                   "bytes": int, "latency_ratio": float, "cosine": float, "metric": float | None,
                   "meets_floor": bool, "pareto": bool, "chosen": bool, "seconds": float}],
       "chosen": str | None, "cut": bool, "seconds": float, "workers": int}

  drawn as the Pareto plot (objective against cosine, presets and the chosen trial
  marked) and the trial table with each trial's reproducible pipeline string;
* fine-tuning — any pass whose stats hold ``history``::

      {"step": [int], "loss": [float], "holdout": [float], "holdout_step": [int]}

  (``holdout_step`` only when hold-out fidelity was measured at other steps than the
  loss) drawn as the loss and hold-out fidelity curves;
* notes and feeds.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

from . import plots
from .errors import ModelLoadError, UsageError
from .report import SCHEMA_VERSION, _fmt_bytes, _stats_text, write_text

__all__ = ["render_html", "write_html", "load_report", "LAYER_FIGURES"]

#: Per-layer columns of a pass's ``stats.layers`` drawn as bars, in this order (at most three).
LAYER_FIGURES = ("sparsity", "bits", "bits_per_weight", "channels_kept", "sensitivity",
                 "error_before", "error_after", "max_abs_change")

_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"

_CSS = """
:root { --fail: #b91c1c; --fail-bg: #fee2e2; --ok: #15803d; --ok-bg: #dcfce7; --muted: #6b7280;
        --line: #e5e7eb; --accent: #2563eb; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #111827;
       max-width: 1120px; margin: 0 auto; padding: 24px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 32px 0 8px;
     border-bottom: 1px solid var(--line); padding-bottom: 4px; } h3 { font-size: 15px; margin: 20px 0 6px; }
code { font: 12px/1.4 "DejaVu Sans Mono", ui-monospace, monospace; background: #f3f4f6; padding: 1px 4px;
       border-radius: 3px; overflow-wrap: anywhere; }
.sub { color: var(--muted); margin: 0 0 16px; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 999px; font-weight: 600; font-size: 13px; }
.badge.ok { background: var(--ok-bg); color: var(--ok); } .badge.fail { background: var(--fail-bg); color: var(--fail); }
.badge.skip { background: #f3f4f6; color: var(--muted); }
.banner { border: 2px solid var(--fail); background: var(--fail-bg); color: var(--fail); padding: 10px 14px;
          border-radius: 6px; margin: 12px 0; } .banner ul { margin: 6px 0 0 18px; padding: 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(190px, 1fr)); gap: 10px; margin: 12px 0; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; }
.card .k { color: var(--muted); font-size: 12px; } .card .v { font-size: 18px; font-weight: 600; }
.card .d { font-size: 12px; color: var(--muted); }
table { border-collapse: collapse; width: 100%; margin: 8px 0 12px; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f9fafb; font-weight: 600; } td.n, th.n { text-align: right; font-variant-numeric: tabular-nums;
     white-space: nowrap; }
tr.fail td { background: var(--fail-bg); color: var(--fail); } tr.fail td:first-child { font-weight: 700; }
tr.chosen td { background: #fef9c3; font-weight: 600; } tr.off td { color: var(--muted); }
.fig { font-size: 12px; color: #374151; }
figure { margin: 12px 0 20px; break-inside: avoid; page-break-inside: avoid; }
figure svg { width: 100%; height: auto; display: block; }
figcaption { font-size: 12px; color: var(--muted); margin-top: 4px; } figcaption b { color: #111827; }
.scroll { overflow-x: auto; }
footer { margin-top: 36px; color: var(--muted); font-size: 12px; }
@media print {
  body { max-width: none; padding: 0; font-size: 11px; } h2 { break-after: avoid; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  table, figure, .banner, .cards { break-inside: avoid; } .scroll { overflow: visible; }
}
"""


def load_report(path: str | os.PathLike) -> dict:
    """Read a JSON report written by ``--report``; a clear error when it is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path}: no such file") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a JSON report ({exc})") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION or "passes" not in data:
        raise UsageError(f"{path}: not an onnxopt JSON report of schema {SCHEMA_VERSION}")
    return data


def write_html(data: dict, path: str | os.PathLike) -> None:
    """Render ``data`` (a JSON report) and write the page atomically."""
    write_text(render_html(data), path)


def render_html(data: dict) -> str:
    """The page for one JSON report (a dict as ``Report.as_dict()`` gives it)."""
    plots.require()
    title = f"onnxopt report: {data.get('pipeline') or 'run'}"
    parts = [
        "<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{_e(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        _status_section(data), _model_section(data), _passes_section(data),
        _validation_section(data), _layers_section(data), _search_section(data),
        _finetune_section(data), _notes_section(data),
        f"<footer>onnxopt {_e(str(data.get('onnxopt', '')))}, JSON report schema {data.get('schema')}: "
        "this page is drawn from it; the JSON holds every figure.</footer>",
        "</body>", "</html>",
    ]
    return "\n".join(p for p in parts if p)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _num(x, spec: str = ".4g") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    return format(x, spec) if isinstance(x, (int, float)) else _e(x)


def _figure(plot: plots.Plot | None) -> str:
    if plot is None:
        return ""
    return (f'<figure id="{plot.slug}" class="plot">{plot.svg}'
            f"<figcaption><b>{_e(plot.title)}.</b> {_e(plot.alt)}</figcaption></figure>")


def _table(head: list[str], rows: list[tuple[str, list[str]]], numeric: set[int], cls: str) -> str:
    """``rows``: (row class, cells already escaped); ``numeric``: column indexes set right."""
    th = "".join(f'<th class="n">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>"
                 for i, h in enumerate(head))
    body = []
    for row_cls, cells in rows:
        tds = "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(cells))
        body.append(f'<tr class="{row_cls}">{tds}</tr>' if row_cls else f"<tr>{tds}</tr>")
    return (f'<div class="scroll"><table class="{cls}"><thead><tr>{th}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _pipeline(text: str) -> str:
    """A pipeline string, escaped, that may wrap after each comma (its text is unchanged)."""
    return f"<code>{_e(text).replace(',', ',<wbr>')}</code>"


def _failed_outputs(data: dict) -> list[tuple[str, dict]]:
    return [(v["provider"], o) for v in data.get("validation") or [] for o in v.get("outputs", [])
            if not o.get("passed")]


# --------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------


def _status_section(data: dict) -> str:
    validation = data.get("validation")
    failed = _failed_outputs(data)
    errors = [f"{v['provider']}: {v['error']}" for v in validation or [] if v.get("error")]
    if validation is None:
        badge = '<span class="badge skip">not validated</span>'
    elif failed or errors or not all(v.get("passed") for v in validation):
        badge = '<span class="badge fail">validation failed</span>'
    else:
        badge = '<span class="badge ok">validation passed</span>'
    bound = ", ".join(f"{k}={v}" for k, v in (data.get("validation_bound") or {}).items())
    out = [f"<header><h1>onnxopt report {badge}</h1>",
           f'<p class="sub">pipeline {_pipeline(data.get("pipeline", ""))}'
           + (f" · {_e(data.get('validation_mode'))} validation ({_e(bound)})" if data.get("validation_mode") else "")
           + f" · {_num(data.get('seconds'), '.3g')} s</p></header>"]
    if failed or errors:
        items = [f"<li><b>{_e(o['name'])}</b> on {_e(p)}: {_e(o.get('reason') or 'outside the bound')}</li>"
                 for p, o in failed] + [f"<li>{_e(x)}</li>" for x in errors]
        out.append(f'<div class="banner" role="alert"><b>Validation failed: {len(failed)} output(s) outside '
                   f"the bound.</b><ul>{''.join(items)}</ul></div>")
    out.append(_cards(data))
    return "\n".join(out)


def _cards(data: dict) -> str:
    a, b = data.get("input") or {}, data.get("output") or {}

    def card(key: str, before, after, fmt) -> str:
        if before is None and after is None:
            return ""
        ratio = (f"{before / after:.2f}× smaller" if after and before and after < before
                 else f"{after / before:.2f}× larger" if after and before and after > before else "unchanged")
        return (f'<div class="card"><div class="k">{_e(key)}</div><div class="v">{fmt(after)}</div>'
                f'<div class="d">from {fmt(before)} · {ratio}</div></div>')

    cards = [card("file size", a.get("bytes"), b.get("bytes"), _fmt_bytes),
             card("nodes", a.get("nodes_total"), b.get("nodes_total"), _num),
             card("parameters", a.get("parameters"), b.get("parameters"), _num)]
    for v in data.get("validation") or []:
        lat = v.get("latency_ms")
        if lat and lat["candidate"]["median"]:
            speed = lat["reference"]["median"] / lat["candidate"]["median"]
            cards.append(f'<div class="card"><div class="k">latency on {_e(v["provider"])} (median)</div>'
                         f'<div class="v">{lat["candidate"]["median"]:.3g} ms</div>'
                         f'<div class="d">from {lat["reference"]["median"]:.3g} ms · {speed:.2f}× speed-up</div></div>')
        cos = [o["cosine"] for o in v.get("outputs", []) if o.get("cosine") is not None]
        if cos:
            cards.append(f'<div class="card"><div class="k">lowest cosine on {_e(v["provider"])}</div>'
                         f'<div class="v">{min(cos):.6g}</div><div class="d">over {len(cos)} output(s)</div></div>')
    return f'<div class="cards">{"".join(cards)}</div>'


def _model_section(data: dict) -> str:
    a, b = data.get("input") or {}, data.get("output") or {}
    if not a and not b:
        return ""

    def opsets(m: dict) -> str:
        ops = m.get("opsets")
        return "–" if not ops else ", ".join(f"{_e(d or 'ai.onnx')} {v}" for d, v in ops.items())

    rows = [("path", _e(a.get("path") or "–"), _e(b.get("path") or "–")),
            ("file bytes", _num(a.get("bytes")), _num(b.get("bytes"))),
            ("tensor bytes", _num(a.get("tensor_bytes")), _num(b.get("tensor_bytes"))),
            ("nodes (top graph)", _num(a.get("nodes")), _num(b.get("nodes"))),
            ("nodes (with subgraphs)", _num(a.get("nodes_total")), _num(b.get("nodes_total"))),
            ("initializers", _num(a.get("initializers")), _num(b.get("initializers"))),
            ("parameters", _num(a.get("parameters")), _num(b.get("parameters"))),
            ("IR version", _num(a.get("ir_version")), _num(b.get("ir_version"))),
            ("opsets", opsets(a), opsets(b))]
    table = _table(["", "input", "output"], [("", list(r)) for r in rows], set(), "model")
    chart = ""
    if a.get("ops") or b.get("ops"):
        chart = _figure(plots.op_counts_plot(a.get("ops") or {}, b.get("ops") or {}))
    return f'<section id="model"><h2>Model before and after</h2>{table}{chart}</section>'


def _passes_section(data: dict) -> str:
    passes = data.get("passes") or []
    if not passes:
        return ""
    rows = []
    for p in passes:
        name = _e(p["name"]) + (f" <small>round {p['round']}</small>" if p.get("round") else "")
        changed = "rolled back" if p.get("rolled_back") else ("yes" if p.get("modified") else "no")
        nodes = (f"{p['nodes_before']:,} → {p['nodes_after']:,}" if p.get("modified")
                 else f"{p['nodes_after']:,}")
        nbytes = (f"{_fmt_bytes(p['bytes_before'])} → {_fmt_bytes(p['bytes_after'])}"
                  if p["bytes_before"] != p["bytes_after"] else _fmt_bytes(p["bytes_after"]))
        kind = "exact" if p.get("exact") else "lossy"
        figures = _e(p.get("error") or _stats_text(p.get("stats") or {}, limit=12))
        cls = "fail" if p.get("rolled_back") or p.get("error") else ("" if p.get("modified") else "off")
        rows.append((cls, [name, kind, changed, nodes, _e(nbytes), f"{p['seconds']:.3f}",
                           f'<span class="fig">{figures}</span>']))
    table = _table(["pass", "kind", "changed", "nodes", "tensor bytes", "seconds", "figures"], rows,
                   {3, 4, 5}, "passes")
    groups = "".join(f"<li>{_pipeline(g['pipeline'])}: {g['rounds']} round(s), "
                     f"{'converged' if g['converged'] else '<b>not converged</b>'}</li>"
                     for g in data.get("groups") or [])
    return (f'<section id="passes"><h2>Passes</h2>{table}'
            + (f"<p>Fixed-point groups:</p><ul>{groups}</ul>" if groups else "")
            + _figure(plots.pass_gains_plot(passes)) + "</section>")


def _validation_section(data: dict) -> str:
    validation = data.get("validation")
    if validation is None:
        return ('<section id="fidelity"><h2>Fidelity and latency</h2>'
                "<p>Not validated (<code>--no-validate</code>).</p></section>")
    bound = (data.get("validation_bound") or {}).get("min_cosine") if data.get("validation_mode") == "fidelity" \
        else None
    out = ['<section id="fidelity"><h2>Fidelity and latency</h2>']
    for i, v in enumerate(validation):
        outputs = sorted(v.get("outputs", []), key=lambda o: bool(o.get("passed")))  # failed first
        rows = [("" if o.get("passed") else "fail",
                 [_e(o["name"]), _e("x".join(map(str, o.get("shape") or [])) or "–"), _e(o.get("dtype") or "–"),
                  _num(o.get("max_abs"), ".3g"), _num(o.get("max_rel"), ".3g"), _num(o.get("cosine"), ".6f"),
                  _num(o.get("top1_agreement"), ".3f"),
                  "yes" if o.get("passed") else f"<b>no</b> {_e(o.get('reason') or '')}"]) for o in outputs]
        out.append(f"<h3>On {_e(v['provider'])}</h3>")
        if v.get("error"):
            out.append(f'<div class="banner">{_e(v["error"])}</div>')
        out.append(_table(["output", "shape", "dtype", "max abs", "max rel", "cosine", "top-1", "ok"], rows,
                          {3, 4, 5, 6}, "fidelity"))
        if outputs:
            out.append(_figure(plots.fidelity_plot(v["provider"], outputs, bound, f"fidelity{i}")))
    out.append(_figure(plots.latency_plot(validation)))
    feeds = data.get("feeds") or {}
    if feeds:
        out.append(f"<p>Feeds: {_e(feeds.get('source') or '–')}"
                   + (f"; defaulted dimensions: {_e('; '.join(feeds['defaulted']))}" if feeds.get("defaulted") else "")
                   + "</p>")
    out.append("</section>")
    return "".join(out)


def _layers_section(data: dict) -> str:
    figures = []
    for i, p in enumerate(data.get("passes") or []):
        if p.get("rolled_back") or not p.get("modified"):
            continue
        figures += _pass_layer_plots(i, p)
    figures += _model_layer_plots(data)
    if not figures:
        return ""
    return ('<section id="layers"><h2>Per layer</h2><p>Figures the lossy passes keep per layer, over the layers '
            "in graph order.</p>" + "".join(_figure(f) for f in figures) + "</section>")


def _pass_layer_plots(i: int, p: dict) -> list[plots.Plot]:
    stats = p.get("stats") or {}
    found = []
    layers = stats.get("layers")
    if isinstance(layers, list) and layers and isinstance(layers[0], dict) and "layer" in layers[0]:
        keys = [k for k in LAYER_FIGURES if any(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                                               for r in layers)][:3]
        if keys:
            series = [(k.replace("_", " "), [r.get(k) for r in layers], None) for k in keys]
            found.append(plots.layer_plot(f"pass{i}-layers", f"{p['name']}: per layer",
                                          [str(r["layer"]) for r in layers], series))
    sens = stats.get("sensitivity")
    if isinstance(sens, dict) and sens:
        labels = list(sens)
        found.append(plots.group_plot(f"pass{i}-sensitivity", f"{p['name']}: measured sensitivity by channel group",
                                      [f"group {k}" for k in labels], [float(sens[k]) for k in labels],
                                      "sensitivity (loss when pruned)"))
    guard = stats.get("guard")
    if isinstance(guard, dict) and guard.get("float_layers"):
        kept = guard["float_layers"]
        found.append(plots.group_plot(f"pass{i}-guard", f"{p['name']}: layers the accuracy guard kept float",
                                      [str(f.get("name")) for f in kept], [float(f.get("sensitivity") or 0) for f in kept],
                                      "sensitivity (1 − cosine)", noun="layers, most sensitive first"))
    return found


def _model_layer_plots(data: dict) -> list[plots.Plot]:
    """Channels kept and weight bits over the output's weighted layers (the report's ``layers``)."""
    layers = data.get("layers") or []
    if not layers:
        return []
    names = [str(r.get("name") or r.get("layer")) for r in layers]
    found = []
    if any(r.get("channels") is not None and r.get("channels_before") not in (None, r.get("channels"))
           for r in layers):
        kept = [r["channels"] / r["channels_before"] if r.get("channels") is not None and r.get("channels_before")
                else None for r in layers]
        found.append(plots.layer_plot(
            "layers-channels", "Channels kept per layer", names,
            [("channels kept (share)", kept, None),
             ("output channels", [r.get("channels") for r in layers], None)],
            note="share of each layer's output channels left after pruning or merging"))
    if any((r.get("bits") or 32) < 32 or r.get("float_by_guard") for r in layers):
        colors = [plots.GUARD if r.get("float_by_guard") else plots.AFTER if (r.get("bits") or 32) < 32
                  else plots.BEFORE for r in layers]
        guarded = sum(bool(r.get("float_by_guard")) for r in layers)
        found.append(plots.layer_plot(
            "layers-bits", "Weight bits per layer", names, [("weight bits", [r.get("bits") for r in layers], colors)],
            note=f"blue: quantized, grey: float, orange: kept float by the accuracy guard ({guarded})"))
    return found


def _search_section(data: dict) -> str:
    search = data.get("search")
    if not isinstance(search, dict):
        return ""
    trials = search.get("trials") or []
    floor = search.get("floor") or {}
    floor_text = ", ".join(f"{k} {v:g}" for k, v in floor.items() if isinstance(v, (int, float)))
    chosen = next((t for t in trials if t.get("chosen") or t.get("id") == search.get("chosen")), None)
    head = (f"<p>Objective: <b>{_e(search.get('objective', '–'))}</b>; floor: {_e(floor_text or 'none')}; "
            f"{len(trials)} trials in {_num(search.get('seconds'), '.3g')} s on {_num(search.get('workers'))} "
            "worker(s).</p>")
    if search.get("cut"):
        head += '<div class="banner">The time budget ran out: the search was cut short.</div>'
    head += (f"<p>Chosen: <b>{_e(chosen['id'])}</b> {_pipeline(chosen.get('pipeline', ''))}</p>" if chosen
             else "<p>No trial met the floor: nothing was chosen.</p>")
    rows = []
    for t in trials:
        cls = "chosen" if t is chosen else ("" if t.get("meets_floor") else "off")
        kind = f"preset {t['preset']}" if t.get("kind") == "preset" and t.get("preset") else _e(t.get("kind", ""))
        rows.append((cls, [_e(t.get("id", "")), _e(kind), _pipeline(t.get("pipeline", "")),
                           _num(t.get("bytes")), _num(t.get("latency_ratio"), ".3f"), _num(t.get("cosine"), ".6f"),
                           _num(t.get("metric"), ".4g"), "yes" if t.get("meets_floor") else "no",
                           "yes" if t.get("pareto") else "", _num(t.get("seconds"), ".3g")]))
    table = _table(["trial", "kind", "pipeline", "bytes", "latency ratio", "cosine", "metric", "meets floor",
                    "Pareto", "seconds"], rows, {3, 4, 5, 6, 9}, "trials")
    plot = _figure(plots.pareto_plot(search)) if trials else ""
    return f'<section id="search"><h2>Search</h2>{head}{plot}{table}</section>'


def _finetune_section(data: dict) -> str:
    figures = []
    for i, p in enumerate(data.get("passes") or []):
        history = (p.get("stats") or {}).get("history")
        if isinstance(history, dict) and history.get("loss"):
            figures.append(plots.history_plot(f"history{i}", p["name"], history))
    if not figures:
        return ""
    return '<section id="finetune"><h2>Fine-tuning</h2>' + "".join(_figure(f) for f in figures) + "</section>"


def _notes_section(data: dict) -> str:
    notes = data.get("notes") or []
    if not notes:
        return ""
    return '<section id="notes"><h2>Notes</h2><ul>' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul></section>"
