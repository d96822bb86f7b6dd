"""The compression report: per layer and in total, what the weights cost as stored
(parameters, non-zeros, storage form, bits per weight, bytes plain and gzipped, ratio to
dense), and the whole file's bytes before and after.

Layers that share a storage block are given shares of the block's bytes, so that the
rows add up to the totals, which count each block once.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import const_value
from ..model import Model, tensor_nbytes
from .decode import NotDecodable, evaluate
from .sites import WEIGHT_OPS, WeightSite, find_weights

__all__ = ["compression_report", "format_report", "gzip_size"]


def gzip_size(data: bytes) -> int:
    """Bytes after general-purpose compression (gzip, level 9, no timestamp)."""
    return len(gzip.compress(data, compresslevel=9, mtime=0))


_PASS_THROUGH = ("Reshape", "Split", "Identity", "Squeeze", "Unsqueeze", "Cast")


def _entry_share(t: gs.Tensor, memo: dict) -> float | None:
    """For a layer of a sparse block: its share of the block's stored entries (those whose
    position falls in the layer's part of the scatter's output). None otherwise."""
    x, part = t, None
    while True:
        if isinstance(x, gs.Constant) or len(x.inputs) != 1:
            return None
        node = x.inputs[0]
        if node.op in ("ScatterND", "ScatterElements"):
            break
        if node.op == "Gather" and len(node.inputs) == 2:  # a codebook lookup: follow the indices
            x = node.inputs[1]
            continue
        if node.op not in _PASS_THROUGH:
            return None
        if node.op == "Split":
            part = (node, next(i for i, o in enumerate(node.outputs) if o is x))
        x = node.inputs[0]
    try:
        flat = evaluate(node.outputs[0], memo)
        lo, hi = 0, flat.size
        if part is not None:
            split, k = part
            sizes = [evaluate(o, memo).size for o in split.outputs]
            lo = int(sum(sizes[:k]))
            hi = lo + sizes[k]
        pos = evaluate(node.inputs[1], memo).ravel()
    except NotDecodable:
        return None
    return float(np.count_nonzero((pos >= lo) & (pos < hi))) / max(pos.size, 1)


def _blocks(sites: list[WeightSite]) -> list[list[WeightSite]]:
    """Compact layers grouped into blocks: layers whose decoders share a node (Constant
    nodes aside: small constants are shared between blocks)."""
    parent = list(range(len(sites)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for i, s in enumerate(sites):
        for n in s.cone:
            if n.op == "Constant":
                continue
            j = owner.setdefault(id(n), i)
            if j != i:
                parent[find(i)] = find(j)
    groups: dict[int, list[WeightSite]] = {}
    for i, s in enumerate(sites):
        groups.setdefault(find(i), []).append(s)
    return list(groups.values())


def _exclusive_leaves(cone: list[gs.Node]) -> list[gs.Tensor]:
    """The constants of a cone that nothing outside it reads."""
    inside = {id(n) for n in cone}
    leaves, seen = [], set()
    for node in cone:
        tensors = node.outputs if node.op == "Constant" else [x for x in node.inputs if isinstance(x, gs.Constant)]
        for x in tensors:
            if id(x) not in seen and all(id(r) in inside for r in x.outputs):
                seen.add(id(x))
                leaves.append(x)
    return leaves


def _raw(t: gs.Tensor) -> bytes:
    return np.ascontiguousarray(const_value(t, load=False)).tobytes()


def compression_report(model: Model, original: Model | None = None, *, ops: Sequence[str] = WEIGHT_OPS,
                       names: Sequence[str] | None = None) -> dict:
    """Per layer and in total: parameters, non-zeros, storage form, bits per weight,
    bytes stored, bytes after gzip and the ratio to the dense original; and the whole
    file's bytes, plain and gzipped, before (``original``) and after.

    A layer stored in a block is given its share of the block's bytes (plain and
    gzipped): by stored entries in sparse blocks, by elements in the others. The totals
    count each block once. ``names`` restricts the rows to those weights (and the totals
    to their blocks).
    """
    memo: dict[int, np.ndarray] = {}
    sites, _ = find_weights(model, ops, memo)
    wanted = None if names is None else set(names)
    figures: dict[int, tuple[int, int]] = {}
    total_bytes = total_gzip = 0
    compact = [s for s in sites if s.storage != "dense" and s.cone]
    for block in _blocks(compact):
        if wanted is not None and not any(s.name in wanted for s in block):
            continue
        cone: list[gs.Node] = []
        seen: set[int] = set()
        for s in block:
            for n in s.cone:
                if id(n) not in seen:
                    seen.add(id(n))
                    cone.append(n)
        leaves = _exclusive_leaves(cone)
        raw = b"".join(_raw(x) for x in leaves)
        nbytes = sum(tensor_nbytes(x) if isinstance(x, gs.Constant) else len(_raw(x)) for x in leaves)
        gz = gzip_size(raw)
        total_bytes += nbytes
        total_gzip += gz
        elements = sum(s.size for s in block)
        for s in block:
            share = _entry_share(s.tensor, memo)
            share = s.size / elements if share is None else share
            figures[id(s.tensor)] = (int(round(nbytes * share)), int(round(gz * share)))
    rows = []
    for s in sites:
        if wanted is not None and s.name not in wanted:
            continue
        if id(s.tensor) in figures:
            own, gz = figures[id(s.tensor)]
        else:
            raw = _raw(s.tensor) if s.storage == "dense" else b""
            own, gz = len(raw), gzip_size(raw) if raw else 0
            total_bytes += own
            total_gzip += gz
        params = s.size
        dense = params * s.value.dtype.itemsize
        rows.append({
            "layer": s.name,
            "op": "/".join(s.ops),
            "shape": list(s.value.shape),
            "params": params,
            "nonzeros": int(np.count_nonzero(s.value)),
            "storage": s.storage,
            "bits_per_weight": round(8.0 * own / params, 3) if params else 0.0,
            "bytes": own,
            "gzip_bytes": gz,
            "dense_bytes": dense,
            "ratio": round(dense / own, 3) if own else None,
        })
    params = sum(r["params"] for r in rows)
    dense = sum(r["dense_bytes"] for r in rows)
    total = {
        "layers": len(rows),
        "params": params,
        "nonzeros": sum(r["nonzeros"] for r in rows),
        "bits_per_weight": round(8.0 * total_bytes / params, 3) if params else 0.0,
        "bytes": total_bytes,
        "gzip_bytes": total_gzip,
        "dense_bytes": dense,
        "ratio": round(dense / total_bytes, 3) if total_bytes else None,
    }
    total.update(_file_figures(model, original))
    return {"layers": rows, "total": total}


def _file_figures(model: Model, original: Model | None) -> dict:
    out: dict = {}
    if model.has_external_data() or (original is not None and original.has_external_data()):
        return out
    data = model.to_bytes()
    out["file_bytes"] = len(data)
    out["file_gzip_bytes"] = gzip_size(data)
    if original is not None:
        ref = original.to_bytes()
        out["original_file_bytes"] = len(ref)
        out["original_file_gzip_bytes"] = gzip_size(ref)
        out["file_ratio"] = round(len(ref) / len(data), 3)
        out["file_gzip_ratio"] = round(len(ref) / out["file_gzip_bytes"], 3)
    return out


def format_report(report: dict, *, limit: int | None = None) -> str:
    """A compression report (or the stats of a compression pass) as a plain-text table:
    one row per layer, the total, and the file figures."""
    cols = ["layer", "storage", "params", "nonzeros", "bits_per_weight", "bytes", "gzip_bytes", "ratio"]
    head = ["layer", "storage", "params", "non-zeros", "bits/weight", "bytes", "gzip bytes", "ratio"]
    layers = report.get("layers", [])
    rows = layers if limit is None else layers[:limit]
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    if limit is not None and len(layers) > limit:
        cells.append([f"... {len(layers) - limit} more", "", "", "", "", "", "", ""])
    t = report["total"]
    cells.append(["total", ""] + [_cell(t.get(c)) for c in cols[2:]])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]

    def line(values):
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    lines = [line(head)] + [line(c) for c in cells]
    if "file_bytes" in t:
        text = f"file: {t['file_bytes']:,} bytes ({t['file_gzip_bytes']:,} gzipped)"
        if "original_file_bytes" in t:
            text += (f"; original {t['original_file_bytes']:,} ({t['original_file_gzip_bytes']:,} gzipped): "
                     f"{t['file_ratio']:.2f}x smaller, {t['file_gzip_ratio']:.2f}x once gzipped")
        lines.append(text)
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)
