"""Intermediate activations on onnxruntime: what calibration, reconstruction and
activation-based criteria read.

:func:`capture` makes chosen intermediate tensors extra graph outputs of a copy of the
model and runs it sample by sample, yielding a dict per sample — callers accumulate what
they need (running min/max, histograms, Gram matrices), so memory stays flat in the
number of samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from .errors import UsageError
from .model import Model, iter_graphs
from .shapes import infer_shapes
from .validate import make_session

__all__ = ["capture", "capture_session"]


def capture_session(model: Model, names: Sequence[str], *, provider: str = "cpu",
                    threads: int | None = None, optimization: str = "all"):
    """A session of a copy of ``model`` whose outputs are the graph outputs followed by
    the tensors ``names`` (top-graph tensors)."""
    work = model.copy()
    by_name: dict[str, gs.Tensor] = {}
    for node in work.graph.nodes:
        for t in node.outputs:
            by_name[t.name] = t
    for t in work.graph.inputs:
        by_name.setdefault(t.name, t)
    missing = [n for n in names if n not in by_name]
    if missing:
        inner = {t.name for g in iter_graphs(work.graph) if g is not work.graph for n in g.nodes for t in n.outputs}
        where = " (inside a subgraph: not capturable)" if set(missing) & inner else ""
        raise UsageError(f"cannot capture tensors {missing[:5]}: not in the main graph{where}")
    info = infer_shapes(work)
    existing = {id(t) for t in work.graph.outputs}
    for name in names:
        t = by_name[name]
        if id(t) in existing:
            continue
        if isinstance(t, gs.Variable) and t.dtype is None:
            ti = info.get(name)
            t.dtype = ti.dtype if ti is not None and ti.dtype is not None else np.float32
        work.graph.outputs.append(t)
        existing.add(id(t))
    return make_session(work, provider, threads=threads, optimization=optimization)


def capture(model: Model, names: Sequence[str], feeds: Iterable[dict[str, np.ndarray]], *,
            provider: str = "cpu", threads: int | None = None,
            include_outputs: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Yield, per feed dict, ``{name: array}`` for the requested tensors (and the graph
    outputs too with ``include_outputs``)."""
    names = list(dict.fromkeys(names))
    sess = capture_session(model, names, provider=provider, threads=threads)
    wanted = names + ([o.name for o in model.graph.outputs] if include_outputs else [])
    wanted = list(dict.fromkeys(wanted))
    for feed in feeds:
        values = sess.run(wanted, dict(feed))
        yield dict(zip(wanted, values))
