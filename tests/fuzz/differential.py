"""Differential testing of the exact passes: random graphs through ``default``,
compared with the original on onnxruntime.

Each graph of :func:`tests.fuzz.graphs.random_graph` is held to the conformance
contract (:func:`tests.conformance.conformance.check_pipeline_on`: the result passes the
checker, keeps the inputs and outputs, gives the original's outputs within the suite's
float tolerance on generated feeds, and a second run changes nothing). A graph that
fails is shrunk (:func:`shrink`) — outputs dropped, nodes bypassed or cut into new
inputs — while it still fails the same way, and written out in ONNX text: the
regression test to add to the test file of the pass at fault.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx.printer

__all__ = ["GraphResult", "Differential", "check_graph", "shrink", "run_differential"]

PIPELINE = "default"


def single_passes() -> list[str]:
    """The passes of the default preset: one graph in three also goes through one of them
    alone (what ``-p fuse`` runs), since the preset's order can hide what a pass does on
    input the others have not cleaned."""
    import re

    from onnxopt.framework import presets

    return re.findall(r"[a-z][a-z0-9-]*", presets()[PIPELINE][0])
#: Seconds one graph may take (generation, passes, both onnxruntime runs) before it
#: counts as a hang.
GRAPH_TIMEOUT = 60


@dataclass
class GraphResult:
    seed: int
    kind: str  # "ok", "skipped" (onnxruntime cannot run the original), "wrong", "invalid", "crash",
    # "not-idempotent", "contract", "hang", "generator" (the generator made an invalid model)
    detail: str = ""
    nodes_before: int = 0
    nodes_after: int = 0
    seconds: float = 0.0
    shrunk: str = ""  # the minimal failing model in ONNX text
    pipeline: str = PIPELINE


def _feeds(proto: onnx.ModelProto) -> dict:
    from onnxopt import Model
    from onnxopt.data import random_feeds

    feeds, _ = random_feeds(Model.from_proto(proto))
    return feeds


def _classify(exc: BaseException) -> tuple[str, str]:
    """(kind, signature) of a failed check."""
    text = " ".join(str(exc).split())[:300]
    if isinstance(exc, AssertionError):
        if "values differ" in text or "differs" in text or "optional differs" in text:
            return "wrong", text
        if "not idempotent" in text:
            return "not-idempotent", text
        return "contract", text
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/onnxopt/" in f.filename or "/passes/" in f.filename]
    where = f"{Path(ours[-1].filename).name}:{ours[-1].name}" if ours else "?"
    if any("checker" in f.filename for f in frames[-3:]) or type(exc).__name__ == "ValidationError":
        return "invalid", f"{type(exc).__name__}: {text}"
    if "onnxruntime" in text or "ONNXRuntimeError" in text:
        return "invalid", f"onnxruntime: {text}"
    return "crash", f"{type(exc).__name__} at {where}: {text}"


def check_graph(proto: onnx.ModelProto, feeds: dict | None = None, *,
                pipeline: str = PIPELINE) -> tuple[str, str, dict]:
    """``(kind, detail, figures)`` of one model through ``pipeline``; kind ``ok`` when it
    keeps the conformance contract."""
    import pytest

    from tests.conformance.conformance import check_pipeline_on

    try:
        feeds = _feeds(proto) if feeds is None else feeds
    except Exception as exc:
        return "generator", f"no feeds: {exc}", {}
    try:
        figures = check_pipeline_on(proto, feeds, pipeline=pipeline)
    except pytest.skip.Exception as exc:  # onnxruntime cannot run the original (its limits, not ours)
        return "skipped", str(exc)[:300], {}
    except Exception as exc:  # AssertionError included
        kind, detail = _classify(exc)
        return kind, detail, {}
    batch = _other_batch(proto)
    if batch is not None:  # a dynamic batch: the result must hold for another size too
        try:
            check_pipeline_on(proto, batch, pipeline=pipeline)
        except pytest.skip.Exception:  # the original itself is tied to batch 1
            pass
        except Exception as exc:
            kind, detail = _classify(exc)
            return kind, f"batch 2: {detail}", {}
    return "ok", "", figures


def _other_batch(proto: onnx.ModelProto) -> dict | None:
    """Feeds with 2 on every dynamic first axis, or None when no input has one."""
    from onnxopt import Model
    from onnxopt.data import input_specs, random_feeds

    model = Model.from_proto(proto)
    shapes = {}
    for spec in input_specs(model):
        if spec.shape and not isinstance(spec.shape[0], int):
            shapes[spec.name] = (2,) + tuple(d if isinstance(d, int) else 1 for d in spec.shape[1:])
    if not shapes:
        return None
    return random_feeds(model, shapes, seed=1)[0]


def _one(seed: int) -> GraphResult:
    from tests.fuzz.graphs import random_graph

    t0 = time.perf_counter()
    pipeline = PIPELINE
    signal.alarm(GRAPH_TIMEOUT)
    try:
        try:
            proto = random_graph(seed)
            onnx.checker.check_model(proto)
        except Exception as exc:
            return GraphResult(seed, "generator", f"{type(exc).__name__}: {exc}"[:300])
        kind, detail, figures = check_graph(proto)
        if kind == "ok" and seed % 3 == 0:
            single = single_passes()
            pipeline = single[(seed // 3) % len(single)]
            kind, detail, _ = check_graph(proto, pipeline=pipeline)
    except _Hang:
        kind, detail, figures = "hang", f"over {GRAPH_TIMEOUT} s", {}
    finally:
        signal.alarm(0)
    result = GraphResult(seed, kind, detail, figures.get("nodes_before", 0), figures.get("nodes_after", 0),
                         time.perf_counter() - t0, pipeline=pipeline)
    if kind not in ("ok", "skipped", "generator", "hang"):
        signal.alarm(GRAPH_TIMEOUT * 5)
        try:
            small = shrink(proto, kind, detail, pipeline=pipeline)
        except _Hang:
            small = proto
        finally:
            signal.alarm(0)
        result.shrunk = onnx.printer.to_text(small)
    return result


class _Hang(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` swallows it."""


def _alarm(signum, frame):
    raise _Hang


def _init_worker() -> None:
    signal.signal(signal.SIGALRM, _alarm)
    import onnxopt.passes  # noqa: F401  (registers the passes once per worker)


# --------------------------------------------------------------------------------------
# Shrinking
# --------------------------------------------------------------------------------------


def _same_failure(kind: str, detail: str, pipeline: str):
    key = detail.split(":")[0] if kind == "crash" else ""

    def still(proto: onnx.ModelProto) -> bool:
        try:
            onnx.checker.check_model(proto)
            got, got_detail, _ = check_graph(proto, pipeline=pipeline)
        except Exception:
            return False
        return got == kind and (not key or got_detail.split(":")[0] == key)

    return still


def _shapes(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        out[vi.name] = vi.type
    return out


def _prune(proto: onnx.ModelProto) -> None:
    """Drop initializers, value_info and graph inputs nothing reads any more (nodes stay:
    a failure may live in code nobody reads, so dead nodes go one at a time, as
    candidates of their own)."""
    g = proto.graph
    needed = {o.name for o in g.output}
    for node in g.node:
        needed.update(node.input)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                needed.update(_body_reads(a.g))
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    vis = [v for v in g.value_info if v.name in needed]
    del g.value_info[:]
    g.value_info.extend(vis)
    ins = [i for i in g.input if i.name in needed] or list(g.input)[:1]
    del g.input[:]
    g.input.extend(ins)


def _body_reads(g: onnx.GraphProto) -> set[str]:
    names = set()
    for n in g.node:
        names.update(n.input)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names.update(_body_reads(a.g))
    return names


def _candidates(proto: onnx.ModelProto):
    """Smaller variants of ``proto``, boldest first."""
    g = proto.graph
    if len(g.output) > 1:
        for i in range(len(g.output)):
            m = onnx.ModelProto()
            m.CopyFrom(proto)
            del m.graph.output[i]
            _prune(m)
            yield m
    read = {o.name for o in g.output}
    for node in g.node:
        read.update(node.input)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                read.update(_body_reads(a.g))
    for i in reversed(range(len(g.node))):  # a node nobody reads
        if not any(o in read for o in g.node[i].output):
            m = onnx.ModelProto()
            m.CopyFrom(proto)
            del m.graph.node[i]
            _prune(m)
            yield m
    types = _shapes(proto)
    for i in reversed(range(len(g.node))):
        node = g.node[i]
        if node.op_type == "Constant" or len(node.output) != 1:
            continue
        out = node.output[0]
        t = types.get(out)
        # bypass: read one of the node's inputs of the same type instead
        for src in node.input:
            if src and t is not None and types.get(src) == t:
                m = onnx.ModelProto()
                m.CopyFrom(proto)
                del m.graph.node[i]
                _rewire(m, out, src)
                _prune(m)
                yield m
                break
        # cut: the node's output becomes a graph input
        if t is not None and t.tensor_type.elem_type == onnx.TensorProto.FLOAT and out not in {
                o.name for o in g.output}:
            m = onnx.ModelProto()
            m.CopyFrom(proto)
            del m.graph.node[i]
            vi = m.graph.input.add()
            vi.name = out
            vi.type.CopyFrom(t)
            _prune(m)
            yield m


def _rewire(m: onnx.ModelProto, old: str, new: str) -> None:
    for g in _graphs(m.graph):
        for n in g.node:
            for k, name in enumerate(n.input):
                if name == old:
                    n.input[k] = new
    for o in m.graph.output:
        if o.name == old:
            # keep the output's name: a node that copies ``new`` into it
            m.graph.node.append(onnx.helper.make_node("Identity", [new], [old]))
            break


def _graphs(g: onnx.GraphProto):
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)


def shrink(proto: onnx.ModelProto, kind: str = "", detail: str = "", *, budget: int = 300,
           pipeline: str = PIPELINE, still=None) -> onnx.ModelProto:
    """The smallest variant of ``proto`` found that still fails as ``kind`` through
    ``pipeline`` (or for which ``still(model)`` holds); greedy: take the first smaller
    variant that fails, start again from it."""
    still = still or _same_failure(kind, detail, pipeline)
    best = proto
    tries = 0
    improved = True
    while improved and tries < budget:
        improved = False
        for cand in _candidates(best):
            tries += 1
            if len(cand.graph.node) + len(cand.graph.output) >= len(best.graph.node) + len(best.graph.output) + 1:
                continue
            if still(cand):
                best = cand
                improved = True
                break
            if tries >= budget:
                break
    return best


# --------------------------------------------------------------------------------------
# The campaign
# --------------------------------------------------------------------------------------


@dataclass
class Differential:
    results: list[GraphResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[GraphResult]:
        return [r for r in self.results if r.kind not in ("ok", "skipped")]

    def summary(self) -> dict:
        kinds = Counter(r.kind for r in self.results)
        return {"graphs": len(self.results), "seconds": round(self.seconds, 1), "kinds": dict(kinds),
                "nodes_before": sum(r.nodes_before for r in self.results),
                "nodes_after": sum(r.nodes_after for r in self.results),
                "failures": [{"seed": r.seed, "pipeline": r.pipeline, "kind": r.kind, "detail": r.detail,
                              "shrunk": r.shrunk}
                             for r in self.failures]}

    def text(self) -> str:
        s = self.summary()
        lines = [f"differential: {s['graphs']} graphs in {s['seconds']:.0f} s, {s['kinds']}; "
                 f"nodes {s['nodes_before']} -> {s['nodes_after']}"]
        for r in self.failures:
            lines.append(f"  seed {r.seed} ({r.pipeline}): {r.kind}: {r.detail[:200]}")
            if r.shrunk:
                lines.append("    " + r.shrunk.replace("\n", "\n    "))
        return "\n".join(lines)


def run_differential(seeds, *, workers: int = 2, root: Path | None = None, verbose: bool = False) -> Differential:
    """Check the graphs of ``seeds``; failures' shrunk models go to ``root/differential``."""
    out = Differential()
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, maxtasksperchild=200) as pool:
        for r in pool.imap_unordered(_one, list(seeds), chunksize=4):
            out.results.append(r)
            if verbose and r.kind not in ("ok", "skipped"):
                print(f"seed {r.seed} ({r.pipeline}): {r.kind}: {r.detail[:200]}", flush=True)
            if r.kind not in ("ok", "skipped") and root is not None:
                folder = root / "differential"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"seed-{r.seed}.txt").write_text(f"# {r.pipeline}: {r.kind}: {r.detail}\n{r.shrunk}\n")
    out.results.sort(key=lambda r: r.seed)
    out.seconds = time.perf_counter() - t0
    return out
