"""The JSON report (a stable schema, documented in the README) and its terminal tables.

Schema version 1, top-level keys:

``schema`` (1), ``onnxopt`` (version), ``pipeline``, ``input`` and ``output``
(``path``, ``bytes``, ``nodes``, ``nodes_total``, ``initializers``, ``parameters``,
``tensor_bytes``), ``passes`` (one entry per pass run: ``name``, ``options``, ``exact``,
``modified``, ``seconds``, ``nodes_before``, ``nodes_after``, ``bytes_before``,
``bytes_after``, ``stats``, ``group``, ``round``, ``rolled_back``, ``error``),
``converged``, ``groups``, ``validated``, ``validation`` (one entry per provider:
``provider``, ``passed``, ``outputs`` [``name``, ``shape``, ``dtype``, ``max_abs``,
``max_rel``, ``cosine``, ``top1_agreement``, ``equal_fraction``, ``passed``,
``reason``], ``latency_ms`` {``reference``, ``candidate``: {``median``, ``p90``}},
``error``), ``validation_mode``, ``validation_bound``, ``feeds``, ``seconds``.

Added within schema 1 (new keys only; every key above keeps its meaning): ``input`` and
``output`` also carry ``ir_version``, ``opsets`` (domain -> version, ``""`` for the
default domain) and ``ops`` (nodes by op type, subgraphs included, most frequent first);
``layers`` lists the output model's weighted layers in graph order (see
:func:`layer_figures`); ``search`` is ``null`` unless a search filled it (its fields are
documented in the README and in :mod:`onnxopt.html_report`). :meth:`Report.to_html` draws
the self-contained HTML page from :meth:`Report.as_dict`.
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from .errors import ModelSaveError
from .model import ExternalValues, Model, _tmp_name, iter_graphs, node_subgraphs

__all__ = ["SCHEMA_VERSION", "Report", "model_figures", "layer_figures", "inspect_model", "render_report",
           "render_inspect", "write_json"]

SCHEMA_VERSION = 1


def model_figures(model: Model, path: str | None = None, file_bytes: int | None = None) -> dict:
    """The ``input``/``output`` block of the report."""
    s = model.summary()
    if file_bytes is None:
        file_bytes = _estimated_bytes(model)
    return {"path": path, "bytes": file_bytes, "nodes": s.nodes, "nodes_total": s.nodes_total,
            "initializers": s.initializers, "parameters": s.parameters,
            "tensor_bytes": s.tensor_bytes, "ir_version": model.ir_version,
            "opsets": dict(sorted(model.opset_imports.items())), "ops": dict(_op_counts(model).most_common())}


def _op_counts(model: Model) -> collections.Counter:
    """Nodes by op type over the graph and its subgraphs (``domain::Op`` outside ai.onnx)."""
    ops: collections.Counter = collections.Counter()
    for g in iter_graphs(model.graph):
        for n in g.nodes:
            ops[n.op if not n.domain or n.domain == "ai.onnx" else f"{n.domain}::{n.op}"] += 1
    return ops


def _estimated_bytes(model: Model) -> int:
    proto = model.to_proto()
    size = proto.ByteSize()
    for t in model.constants():
        if isinstance(t._values, ExternalValues):
            size += t._values.nbytes
    return size


#: Ops whose constant operand is a layer's weight (float, QDQ-quantized or MatMulNBits).
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulNBits")
_QUANT_BITS = {"int8": 8, "uint8": 8, "int4": 4, "uint4": 4, "int16": 16, "uint16": 16,
               "float8e4m3fn": 8, "float8e5m2": 8}
_FLOAT_BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "float64": 64}
_SHAPE_KEEPING = {"DequantizeLinear", "Cast", "Identity", "Neg", "Abs"}


def layer_figures(reference: Model | None, candidate: Model, passes: list[dict] | None = None, *,
                  before: dict[str, int | None] | None = None) -> list[dict]:
    """The report's ``layers``: one entry per weighted layer of ``candidate``, in graph order.

    A weighted layer is a Conv, ConvTranspose, Gemm, MatMul or MatMulNBits whose weight
    operand is computed from constants alone (a plain weight, a DequantizeLinear of an
    integer tensor, a compact expansion). Each entry: ``layer`` (its first output's name,
    how layers are matched between models), ``name`` (the node's), ``op``, ``weight``,
    ``parameters`` and ``channels`` (output channels) where the weight's shape is known,
    ``channels_before`` (the same layer's channels in ``reference``), ``bits`` (of the
    stored weight: 8 or 4 when quantized, 16 or 32 for floats, ``None`` when unknown) and
    ``float_by_guard`` (quantize's accuracy guard kept it in float). Pruning's channel map
    (model metadata) says which layers lost channels. ``before`` may give
    :func:`layer_channels` of the reference instead of the reference itself.
    """
    from .channels import channel_maps, layer_key

    guarded = set()
    for record in passes or ():
        guard = record.get("stats", {}).get("guard") if not record.get("rolled_back") else None
        if isinstance(guard, dict):
            guarded |= {f.get("name") for f in guard.get("float_layers") or [] if isinstance(f, dict)}
    if before is None:
        before = layer_channels(reference)
    maps = channel_maps(candidate)
    rows = []
    memo = {}
    for node in candidate.graph.nodes:
        found = _weight_of(node, memo)
        if found is None:
            continue
        weight, shape, bits = found
        key = layer_key(node)
        channels = len(maps[key]) if key in maps else _out_channels(node, shape)
        rows.append({"layer": key, "name": node.name, "op": node.op, "weight": weight,
                     "parameters": int(np.prod(shape)) if shape is not None else None,
                     "channels": channels, "channels_before": before.get(key, before.get(f"node:{node.name}")),
                     "bits": bits, "float_by_guard": node.name in guarded})
    return rows


def layer_channels(model: Model) -> dict[str, int | None]:
    """Output channels of each weighted layer of ``model``, by layer key and by node name
    (what :func:`layer_figures` reports as ``channels_before``)."""
    from .channels import layer_key

    before: dict[str, int | None] = {}
    memo: dict = {}
    for node in model.graph.nodes:
        found = _weight_of(node, memo)
        if found is not None:  # passes keep tensor names; a fold renames the output, not the node
            before[layer_key(node)] = before[f"node:{node.name}"] = _out_channels(node, found[1])
    return before


def _weight_of(node: gs.Node, memo: dict) -> tuple[str | None, list | None, int | None] | None:
    """(weight name, weight shape, bits) of a weighted layer; ``None`` for any other node."""
    if node.op not in WEIGHTED_OPS or len(node.inputs) < 2:
        return None
    if node.op == "MatMulNBits":
        n, k = node.attrs.get("N"), node.attrs.get("K")
        return node.inputs[1].name, [n, k] if n and k else None, int(node.attrs.get("bits", 4))
    for tensor in (node.inputs[1], node.inputs[0]) if node.op == "MatMul" else (node.inputs[1],):
        traced = _trace_constant(tensor, memo)
        if traced is not None:
            return (tensor.name, *traced)
    return None


def _trace_constant(tensor: gs.Tensor, memo: dict, depth: int = 32) -> tuple[list | None, int | None] | None:
    """(shape, bits) when ``tensor`` is computed from constants alone, else ``None``.

    Bits: those of a DequantizeLinear's integer input on the way, else of the float type
    the weight is computed in. ``memo`` (id -> result) keeps shared chains linear."""
    if isinstance(tensor, gs.Constant):
        return _shape_of(tensor), _FLOAT_BITS.get(_dtype_name(tensor))
    if id(tensor) in memo:
        return memo[id(tensor)]
    memo[id(tensor)] = None  # a cycle or an over-deep chain is not a weight
    if depth == 0 or not tensor.inputs:
        return None
    producer = tensor.inputs[0]
    if producer.op == "Constant":
        value = producer.attrs.get("value")
        result = (_shape_of(value), _FLOAT_BITS.get(_dtype_name(value)))
    else:
        found = [_trace_constant(t, memo, depth - 1) for t in producer.inputs if t is not None and t.name]
        if not found or any(f is None for f in found):
            return None
        shape = _shape_of(tensor)
        if shape is None and producer.op == "Reshape" and isinstance(producer.inputs[1], gs.Constant):
            target = [int(d) for d in np.asarray(producer.inputs[1].values).ravel()]
            shape = target if all(d > 0 for d in target) else None
        if producer.op == "DequantizeLinear":
            bits = _QUANT_BITS.get(_dtype_name(producer.inputs[0]))
        else:
            bits = _FLOAT_BITS.get(_dtype_name(tensor)) or max((f[1] for f in found if f[1]), default=None)
        if shape is None and producer.op in _SHAPE_KEEPING:
            shape = found[0][0]
        result = (shape, bits)
    memo[id(tensor)] = result
    return result


def _dtype_name(tensor) -> str | None:
    dtype = getattr(tensor, "dtype", None)
    if dtype is None:
        return None
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype).rsplit(".", 1)[-1].lower()


def _shape_of(tensor) -> list | None:
    shape = getattr(tensor, "shape", None)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return list(shape)


def _out_channels(node: gs.Node, shape: list | None) -> int | None:
    if not shape:
        return None
    if node.op == "Conv":
        return shape[0]
    if node.op == "ConvTranspose" and len(shape) > 1:
        return shape[1] * int(node.attrs.get("group", 1))
    if node.op == "Gemm" and len(shape) == 2:
        return shape[0] if node.attrs.get("transB", 0) else shape[1]
    if node.op == "MatMulNBits":
        return shape[0]
    return shape[-1]


@dataclass
class Report:
    """Everything ``optimize`` did, ready for JSON (:meth:`as_dict`) and the terminal."""

    pipeline: str
    input: dict
    output: dict
    passes: list[dict]
    converged: bool
    groups: list[dict]
    validation: list[dict] | None = None
    validation_mode: str | None = None
    validation_bound: dict | None = None
    feeds: dict | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    search: dict | None = None

    @property
    def validated(self) -> bool:
        return self.validation is not None

    @property
    def passed(self) -> bool | None:
        if self.validation is None:
            return None
        return all(v["passed"] for v in self.validation)

    def as_dict(self) -> dict:
        from . import __version__

        return {
            "schema": SCHEMA_VERSION,
            "onnxopt": __version__,
            "pipeline": self.pipeline,
            "input": self.input,
            "output": self.output,
            "passes": self.passes,
            "converged": self.converged,
            "groups": self.groups,
            "validated": self.validated,
            "validation": self.validation,
            "validation_mode": self.validation_mode,
            "validation_bound": self.validation_bound,
            "feeds": self.feeds,
            "seconds": round(self.seconds, 4),
            "notes": self.notes,
            "layers": self.layers,
            "search": self.search,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=False, default=_json_default)

    def to_html(self) -> str:
        """The report as one self-contained HTML page (plots as inline SVG, no network).

        Needs the ``report`` extra (matplotlib); without it raises :class:`UsageError`
        naming the extra."""
        from .html_report import render_html

        return render_html(json.loads(self.to_json()))

    def write_html(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_html` atomically."""
        from .html_report import write_html

        write_html(json.loads(self.to_json()), path)


def _json_default(value: Any):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(value)


def write_json(data: dict | str, path: str | os.PathLike) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    write_text(data if isinstance(data, str) else json.dumps(data, indent=2, default=_json_default), path)


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` and a final newline atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ModelSaveError(f"{path}: folder {folder} does not exist")
    try:
        tmp = _tmp_name(folder, path.name)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise ModelSaveError(f"{path}: cannot write ({exc.strerror or exc})") from exc


# --------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------


def _dims(shape) -> list | None:
    if shape is None:
        return None
    return [d if isinstance(d, (int, str)) and d != "" else None for d in shape]


def inspect_model(model: Model, path: str | None = None) -> dict:
    """Inputs/outputs, opsets, op histogram, counts, bytes, subgraphs and external data."""
    s = model.summary()
    ops = _op_counts(model)
    subgraphs = []
    for g in iter_graphs(model.graph):
        for n in g.nodes:
            for sub in node_subgraphs(n):
                subgraphs.append({"node": n.name or n.op, "op": n.op, "graph": sub.name,
                                  "nodes": sum(len(x.nodes) for x in iter_graphs(sub))})
    external = collections.Counter()
    for t in model.constants():
        if isinstance(t._values, ExternalValues):
            loc = {e.key: e.value for e in t._values.tensor.external_data}.get("location", "?")
            external[loc] += t._values.nbytes

    def io(t: gs.Tensor) -> dict:
        dtype = getattr(t, "dtype", None)
        return {"name": t.name, "dtype": None if dtype is None else str(dtype),
                "shape": _dims(getattr(t, "shape", None)),
                "initializer": isinstance(t, gs.Constant)}

    info = {
        "path": path,
        "file_bytes": os.path.getsize(path) if path and os.path.exists(path) else None,
        "ir_version": model.ir_version,
        "opsets": dict(sorted(model.opset_imports.items())),
        "producer": " ".join(x for x in (model.producer_name, model.producer_version) if x),
        "graph": model.graph.name,
        "inputs": [io(t) for t in model.graph.inputs if not isinstance(t, gs.Constant)],
        "overridable_initializers": sum(isinstance(t, gs.Constant) for t in model.graph.inputs),
        "outputs": [io(t) for t in model.graph.outputs],
        "nodes": s.nodes,
        "nodes_total": s.nodes_total,
        "initializers": s.initializers,
        "parameters": s.parameters,
        "tensor_bytes": s.tensor_bytes,
        "functions": [f"{f.domain}::{f.name}" if f.domain else f.name for f in model.functions],
        "subgraphs": subgraphs,
        "external_data": dict(external),
        "metadata": dict(model.metadata_props),
        "ops": dict(ops.most_common()),
    }
    return info


# --------------------------------------------------------------------------------------
# terminal rendering (rich)
# --------------------------------------------------------------------------------------


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _stats_text(stats: dict, limit: int = 8) -> str:
    parts = []
    for k, v in stats.items():
        if isinstance(v, (dict, list)) or not v:
            continue
        if isinstance(v, float):
            v = f"{v:.4g}"
        parts.append(f"{k}={v}")
        if len(parts) >= limit:
            break
    return " ".join(parts)


def render_report(report: Report, console) -> None:
    """Print the report as tables: passes, sizes, validation per provider."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(f"onnxopt: {report.pipeline}"), title_justify="left")
    for col in ("pass", "changed", "nodes", "tensor bytes", "seconds", "figures"):
        t.add_column(col, justify="right" if col in ("nodes", "tensor bytes", "seconds") else "left",
                     overflow="fold", no_wrap=col not in ("figures",))
    for p in report.passes:
        name = p["name"] + (f" r{p['round']}" if p.get("round") else "")
        changed = "rolled back" if p["rolled_back"] else ("yes" if p["modified"] else "no")
        nodes = f"{p['nodes_before']} → {p['nodes_after']}" if p["modified"] else str(p["nodes_after"])
        nbytes = (f"{_fmt_bytes(p['bytes_before'])} → {_fmt_bytes(p['bytes_after'])}"
                  if p["bytes_before"] != p["bytes_after"] else _fmt_bytes(p["bytes_after"]))
        t.add_row(escape(name), changed, nodes, nbytes, f"{p['seconds']:.3f}",
                  escape(p["error"] or _stats_text(p["stats"])))
    console.print(t)
    for p in report.passes:
        _render_layers(p, console)

    s = Table(title="model", title_justify="left")
    for col in ("", "nodes (total)", "initializers", "parameters", "file bytes"):
        s.add_column(col, justify="right")
    for label, m in (("input", report.input), ("output", report.output)):
        s.add_row(label, f"{m['nodes']} ({m['nodes_total']})", str(m["initializers"]),
                  f"{m['parameters']:,}", _fmt_bytes(m["bytes"]))
    console.print(s)
    groups = ", ".join(f"{g['pipeline']}: {g['rounds']} round(s), "
                       f"{'converged' if g['converged'] else 'NOT converged'}" for g in report.groups)
    if groups:
        console.print(escape(f"fixed point: {groups}"))

    if report.validation is None:
        console.print("validation: skipped (--no-validate)")
        return
    for v in report.validation:
        vt = Table(title=f"validation on {v['provider']} ({report.validation_mode}: "
                         + ", ".join(f"{k}={val}" for k, val in (report.validation_bound or {}).items())
                         + ")", title_justify="left")
        for col in ("output", "shape", "max abs", "max rel", "cosine", "top-1", "ok"):
            vt.add_column(col, justify="left" if col in ("output", "shape") else "right")
        for o in v["outputs"]:
            vt.add_row(escape(o["name"]), "x".join(map(str, o["shape"])), _fmt(o["max_abs"]), _fmt(o["max_rel"]),
                       _fmt(o["cosine"], ".6f"), _fmt(o["top1_agreement"], ".3f"),
                       "[green]yes[/]" if o["passed"] else f"[red]no[/] {escape(o['reason'])}")
        console.print(vt)
        if v.get("error"):
            console.print(f"[red]{v['provider']}: {escape(v['error'])}[/]")
        lat = v.get("latency_ms")
        if lat:
            ratio = lat["reference"]["median"] / lat["candidate"]["median"] if lat["candidate"]["median"] else 0
            console.print(
                f"latency ({v['provider']}): reference {lat['reference']['median']:.3f} ms "
                f"(p90 {lat['reference']['p90']:.3f}), candidate {lat['candidate']['median']:.3f} ms "
                f"(p90 {lat['candidate']['p90']:.3f}); speed-up {ratio:.2f}x")
    if report.feeds and report.feeds.get("defaulted"):
        console.print(escape("feeds: generated; defaulted " + "; ".join(report.feeds["defaulted"])))


#: Rows of a pass's per-layer table shown in the terminal (the JSON report has them all).
LAYER_ROWS = 40
LAYER_COLUMNS = 9


def _render_layers(record: dict, console) -> None:
    """A pass whose stats hold ``layers`` (a list of per-layer dicts) and optionally
    ``total`` (a dict) gets a table of its own under the passes table: its first
    :data:`LAYER_COLUMNS` scalar columns (a pass puts the telling ones first)."""
    from rich.markup import escape
    from rich.table import Table

    layers = record["stats"].get("layers")
    if record.get("rolled_back") or not isinstance(layers, list) or not layers or not isinstance(layers[0], dict):
        return
    columns = [k for k, v in layers[0].items() if not isinstance(v, (list, dict))][:LAYER_COLUMNS]
    t = Table(title=escape(f"{record['name']}: per layer"), title_justify="left")
    for col in columns:
        t.add_column(col, justify="left" if col in ("layer", "op", "storage", "shape") else "right")

    def cell(v) -> str:
        if isinstance(v, list):
            return "x".join(map(str, v))
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    for row in layers[:LAYER_ROWS]:
        t.add_row(*(escape(cell(row.get(c))) for c in columns))
    if len(layers) > LAYER_ROWS:
        t.add_row(escape(f"... {len(layers) - LAYER_ROWS} more (see --report)"), *([""] * (len(columns) - 1)))
    total = record["stats"].get("total")
    if isinstance(total, dict):
        t.add_row("total", *(escape(cell(total.get(c))) if c in total else "" for c in columns[1:]))
    console.print(t)
    if isinstance(total, dict) and "file_bytes" in total:
        line = f"file: {_fmt_bytes(total['file_bytes'])} ({_fmt_bytes(total.get('file_gzip_bytes'))} gzipped)"
        if "original_file_bytes" in total:
            line += (f"; original {_fmt_bytes(total['original_file_bytes'])}: {total['file_ratio']:.2f}x smaller, "
                     f"{total['file_gzip_ratio']:.2f}x once gzipped")
        console.print(escape(line))


def render_inspect(info: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    head = Table(show_header=False, title=escape(info.get("path") or "model"), title_justify="left")
    head.add_column("", style="bold")
    head.add_column("")
    head.add_row("IR version", str(info["ir_version"]))
    head.add_row("opsets", ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in info["opsets"].items()))
    if info["producer"]:
        head.add_row("producer", info["producer"])
    head.add_row("nodes", f"{info['nodes']} (with subgraphs: {info['nodes_total']})")
    head.add_row("initializers", str(info["initializers"]))
    head.add_row("parameters", f"{info['parameters']:,}")
    head.add_row("tensor bytes", _fmt_bytes(info["tensor_bytes"]))
    if info["file_bytes"] is not None:
        head.add_row("file bytes", _fmt_bytes(info["file_bytes"]))
    if info["overridable_initializers"]:
        head.add_row("initializers listed as inputs", str(info["overridable_initializers"]))
    if info["functions"]:
        head.add_row("local functions", ", ".join(info["functions"]))
    if info["external_data"]:
        head.add_row("external data", ", ".join(f"{k} ({_fmt_bytes(v)})" for k, v in info["external_data"].items()))
    if info["subgraphs"]:
        head.add_row("subgraphs", ", ".join(f"{s['op']} {s['node']} → {s['graph']} ({s['nodes']} nodes)"
                                            for s in info["subgraphs"][:8])
                     + (" ..." if len(info["subgraphs"]) > 8 else ""))
    console.print(head)
    io = Table(title="inputs and outputs", title_justify="left")
    for col in ("", "name", "dtype", "shape"):
        io.add_column(col)
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            shape = "?" if t["shape"] is None else "x".join("?" if d is None else str(d) for d in t["shape"])
            io.add_row(kind[:-1], escape(t["name"]), t["dtype"] or "?", shape)
    console.print(io)
    ops = Table(title="operators", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in info["ops"].items():
        ops.add_row(escape(op), str(n))
    console.print(ops)
