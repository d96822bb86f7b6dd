"""inline-if: keep only the branch an If always takes.

A traced export writes every Python ``if`` on a tensor's rank or dimension as an ONNX
``If``: PyTorch's LSTM asks whether its input is batched, a squeeze asks whether a
dimension is 1, a model asks how many state tensors it was given. Where the answer is the
same for every input the model accepts, the other branch is dead weight and the If costs
a subgraph call at every run.

Deciding. A condition is computed here from constants and from the shapes that
:class:`onnxopt.tensorinfo.ShapeIndex` infers from the declared graph inputs — the model's
contract: onnxruntime refuses an input of another rank or another fixed dimension —
through the small integer and boolean ops conditions are made of (Shape, Size, Gather,
Slice, Concat, Squeeze/Unsqueeze/Reshape, Cast, comparisons, Not/And/Or, Add/Sub/Mul,
Where). A dynamic dimension stays unknown, and so does everything computed from it: a
condition on the batch size is never decided; one on the rank of an input whose rank is
declared is. Shapes inside Loop/Scan bodies are unknown (a loop-carried value can grow),
so only constant conditions are decided there.

Inlining. The taken branch's nodes (Constant nodes included) and initializers move into
the graph holding the If, at its place; nodes that read tensors of enclosing graphs keep
reading them (they are in scope there as well). The node computing a branch output now
computes the If's output, whose name and type stay (an Identity where the branch returns
an outer tensor, a constant, or one tensor twice); a name the branch defines that some
other graph of the model also uses is renamed. The If, its other branch and the nodes
that only fed its condition go. Ifs nested in a taken branch are decided as well.

Checking. onnxruntime checks the nodes of a graph more strictly than those of a branch it
may never run: models that run today stop loading once a branch is inlined (a Range fed
a one-element tensor). So the result is re-checked on onnxruntime at ORT_ENABLE_ALL, the
level it will be served at: it must load and, on the context's feeds (the validation
feeds) — or feeds generated from the signature as validation generates them, when none
are given — give the outputs the model gave before. All decided Ifs are tried together
first; if that fails, one at a time, and each one that fails is left as it was, counted
and named with the reason in the stats. When the model runs on no feeds at hand (a model
that needs real inputs, and none were given), what is checked is that it loads
(``check: load`` in the stats): that is where onnxruntime's stricter checks stop a model,
and validation compares the outputs afterwards. A model onnxruntime does not load as it
is gets no inlining.
"""

from __future__ import annotations

import functools
import itertools
import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.data import check_feeds, random_feeds
from onnxopt.errors import OnnxoptError
from onnxopt.framework import Pass, PassContext, PassResult, register
from onnxopt.graph import NameAllocator, replace_uses
from onnxopt.model import EXTERNAL_DATA_THRESHOLD, Model, extras, iter_graphs, node_subgraphs
from onnxopt.rewrite import const_value_if_small, drop_nodes, gc_paused, prune_unused
from onnxopt.tensorinfo import ShapeIndex
from onnxopt.validate import compare_outputs, make_session

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["InlineIf"]

log = logging.getLogger(__name__)

_STD = (None, "", "ai.onnx")
_SMALL = 1 << 16  # conditions are computed from small integer tensors: no weight is read


@register
class InlineIf(Pass):
    """Replace an If whose condition the declared input signature decides by the branch it
    takes, checked on onnxruntime.

    Edge cases: see the module docstring — dynamic dimensions decide nothing, Loop/Scan
    bodies only constant conditions, each inlining that onnxruntime rejects is undone with
    its reason in ``stats``, a model that does not load gets none, graph inputs and outputs
    keep their names, types and order.
    """

    name = "inline-if"
    summary = "inline the branch an If takes for every input (condition decided by static shapes)"
    exact = True
    options = {}

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        stats: Counter = Counter({"inlined": 0, "undecided": 0, "rolled_back": 0, "nodes_removed": 0})
        if not any(_is_if(n) for g in iter_graphs(model.graph) for n in g.nodes):
            return PassResult(False, dict(stats))
        with gc_paused():
            decisions, skipped = _decide(model, _Conditions(ShapeIndex(model)))
        stats.update(skipped)
        if not decisions:
            return PassResult(False, dict(stats))
        with tempfile.TemporaryDirectory(prefix="onnxopt-inline-if-") as tmp:
            check = _Recheck(model, ctx, tmp)
            if check.unusable:
                stats["skipped_unchecked"] = len(decisions)
                log.info("inline-if: %d If(s) decided but not inlined: %s", len(decisions), check.unusable)
                return PassResult(False, dict(stats) | {"check": check.unusable})
            before = _node_count(model)
            kept, rejected = _inline_checked(model, decisions, check)
        stats["inlined"] = len(kept)
        stats["rolled_back"] = len(rejected)
        stats["nodes_removed"] = before - _node_count(model)
        out: dict = dict(stats) | {"check": check.mode}
        if rejected:
            out["rolled_back_why"] = [f"If '{d.name}' ({d.key}): {why}" for d, why in rejected]
            for line in out["rolled_back_why"]:
                log.info("inline-if: not inlined: %s", line)
        return PassResult(bool(kept), out)


# --------------------------------------------------------------------------------------
# Match: which Ifs are decided, and how
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Decision:
    """An If to inline, found by its position (node index, subgraph index, ..., node index
    from the main graph: the same in a copy of the model) and the branch it takes."""

    path: tuple[int, ...]
    key: str  # "then_branch" or "else_branch"
    name: str


def _is_if(node: gs.Node) -> bool:
    if node.op != "If" or node.domain not in _STD or len(node.inputs) != 1:
        return False
    branches = [node.attrs.get("then_branch"), node.attrs.get("else_branch")]
    return all(isinstance(b, gs.Graph) and not b.inputs and len(b.outputs) == len(node.outputs)
               for b in branches)


def _decide(model: Model, conditions: _Conditions) -> tuple[list[_Decision], Counter]:
    """The Ifs whose condition is known, outer before inner (the untaken branches are not
    searched), and the count of those left alone by reason."""
    found: list[_Decision] = []
    skipped: Counter = Counter()

    def walk(g: gs.Graph, prefix: tuple[int, ...]) -> None:
        for i, node in enumerate(g.nodes):
            subs = node_subgraphs(node)
            if _is_if(node):
                value = conditions.decide(node)
                key = None if value is None else ("then_branch" if value else "else_branch")
                if key is None:
                    skipped["undecided"] += 1
                else:
                    found.append(_Decision(prefix + (i,), key, node.name or "?"))
                    branch = node.attrs[key]
                    walk(branch, prefix + (i, next(k for k, s in enumerate(subs) if s is branch)))
                    continue
            for k, sub in enumerate(subs):
                walk(sub, prefix + (i, k))

    walk(model.graph, ())
    return found, skipped


class _Conditions:
    """Values of the small integer and boolean tensors conditions are made of, computed
    from constants and inferred shapes. A shape whose rank is known but some dimension is
    not is an object array holding None there; anything that needs an unknown entry is
    unknown (None)."""

    def __init__(self, index: ShapeIndex):
        self.index = index
        self.memo: dict[int, np.ndarray | None] = {}

    def decide(self, node: gs.Node) -> bool | None:
        """The If's condition, or None when it is not known for every input."""
        v = self.value(node.inputs[0])
        if v is None or v.dtype != np.bool_ or v.size != 1:
            return None
        return bool(v.reshape(-1)[0])

    def value(self, t: gs.Tensor, depth: int = 0) -> np.ndarray | None:
        if id(t) in self.memo:
            return self.memo[id(t)]
        self.memo[id(t)] = None  # a tensor is not its own input (nor is a deep chain a condition)
        found = None
        if depth <= 64:
            try:
                found = self._compute(t, depth)
            except (ValueError, TypeError, IndexError, KeyError, OverflowError):
                found = None
        self.memo[id(t)] = found
        return found

    def _compute(self, t: gs.Tensor, depth: int) -> np.ndarray | None:
        if not t.name:
            return None
        c = const_value_if_small(t, _SMALL, load=False)
        if c is not None:
            return np.asarray(c)
        if isinstance(t, gs.Constant) or len(t.inputs) != 1:
            return None
        node = t.inputs[0]
        if node.domain not in _STD or node.outputs[0] is not t:
            return None
        if node.op == "Shape":
            return self._shape(node)
        if node.op == "Size":
            return self._size(node.inputs[0], depth)
        rule = _RULES.get(node.op)
        if rule is None:
            return None
        args = [self.value(x, depth + 1) if x.name else None for x in node.inputs]
        out = rule(node, args)
        return None if out is None else _settled(np.asarray(out))

    def _shape(self, node: gs.Node) -> np.ndarray | None:
        dims = self.index.dims(node.inputs[0])
        if dims is None:
            return None
        rank = len(dims)
        start = _clamp(int(node.attrs.get("start", 0)), rank)
        end = _clamp(int(node.attrs.get("end", rank)), rank)
        picked = np.empty(max(end - start, 0), dtype=object)
        picked[:] = list(dims[start:end])
        return _settled(picked)

    def _size(self, x: gs.Tensor, depth: int) -> np.ndarray | None:
        dims = self.index.dims(x)
        if dims is not None and all(d is not None for d in dims):
            return np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)
        v = self.value(x, depth + 1)
        return None if v is None else np.array(v.size, dtype=np.int64)


def _clamp(axis: int, rank: int) -> int:
    return min(max(axis + rank if axis < 0 else axis, 0), rank)


def _settled(v: np.ndarray) -> np.ndarray:
    """A partial shape all of whose entries became known, as the int64 array it is."""
    if v.dtype == object and all(e is not None for e in v.flat):
        return np.array([int(e) for e in v.flat], dtype=np.int64).reshape(v.shape)
    return v


def _known(args: list, count: int | None = None) -> bool:
    use = args if count is None else args[:count]
    return bool(use) and all(a is not None and a.dtype != object for a in use)


def _axes(node: gs.Node, args: list) -> list[int] | None:
    """Axes of Squeeze/Unsqueeze: the attribute (opset < 13) or the second input."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(args) > 1 and args[1] is not None and args[1].dtype != object:
        return [int(a) for a in args[1].reshape(-1)]
    return [] if len(node.inputs) < 2 or not node.inputs[1].name else None


def _unsqueeze(node: gs.Node, args: list):
    axes = _axes(node, args)
    if args[0] is None or axes is None:
        return None
    x = args[0]
    rank = x.ndim + len(axes)
    for a in sorted(a % rank for a in axes):
        x = np.expand_dims(x, a)
    return x


def _squeeze(node: gs.Node, args: list):
    axes = _axes(node, args)
    if args[0] is None or axes is None:
        return None
    x = args[0]
    return np.squeeze(x, axis=tuple(a % x.ndim for a in axes)) if axes else np.squeeze(x)


def _reshape(node: gs.Node, args: list):
    if args[0] is None or not _known(args[1:2]):
        return None
    x = args[0]
    target = [int(d) for d in args[1].reshape(-1)]
    if not node.attrs.get("allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


def _cast(node: gs.Node, args: list):
    x = args[0]
    to = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    if x is None:
        return None
    if x.dtype == object:  # dimensions: stay dimensions under an integer cast
        return x if to.kind in "iu" else None
    return x.astype(to)


def _gather(node: gs.Node, args: list):
    if args[0] is None or not _known(args[1:2]) or args[1].dtype.kind not in "iu":
        return None
    return np.take(args[0], args[1].astype(np.int64), axis=int(node.attrs.get("axis", 0)))


def _slice(node: gs.Node, args: list):
    x = args[0]
    if x is None:
        return None
    if len(node.inputs) == 1:  # opset < 10: attributes
        starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
        axes = node.attrs.get("axes", list(range(len(starts or []))))
        steps = [1] * len(axes)
    else:
        given = [None if a is None else [int(v) for v in a.reshape(-1)] for a in args[1:5]]
        if any(a is None and t.name for a, t in zip(given, node.inputs[1:5])):
            return None
        given += [None] * (4 - len(given))
        starts, ends, axes, steps = given
        axes = axes if axes is not None else list(range(len(starts or [])))
        steps = steps if steps is not None else [1] * len(axes)
    if starts is None or ends is None:
        return None
    for s, e, a, k in zip(starts, ends, axes, steps):
        # Python's slice clamps out-of-range starts and ends exactly as ONNX Slice does.
        x = x[(slice(None),) * (a % x.ndim) + (slice(s, e, k),)]
    return x


def _concat(node: gs.Node, args: list):
    if any(a is None for a in args):
        return None
    return np.concatenate(args, axis=int(node.attrs.get("axis", 0)))


def _elementwise(fn: Callable) -> Callable:
    def rule(node: gs.Node, args: list):
        return fn(*args) if _known(args) else None
    return rule


def _variadic(fn: Callable) -> Callable:
    def rule(node: gs.Node, args: list):
        return functools.reduce(fn, args) if _known(args) else None
    return rule


_RULES: Mapping[str, Callable] = {
    "Identity": lambda node, args: args[0],
    "Cast": _cast,
    "Gather": _gather,
    "Slice": _slice,
    "Concat": _concat,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Reshape": _reshape,
    "Equal": _elementwise(np.equal),
    "Greater": _elementwise(np.greater),
    "GreaterOrEqual": _elementwise(np.greater_equal),
    "Less": _elementwise(np.less),
    "LessOrEqual": _elementwise(np.less_equal),
    "Not": _elementwise(np.logical_not),
    "And": _elementwise(np.logical_and),
    "Or": _elementwise(np.logical_or),
    "Xor": _elementwise(np.logical_xor),
    "Add": _elementwise(np.add),
    "Sub": _elementwise(np.subtract),
    "Mul": _elementwise(np.multiply),
    "Neg": _elementwise(np.negative),
    "Abs": _elementwise(np.abs),
    "Max": _variadic(np.maximum),
    "Min": _variadic(np.minimum),
    "Where": _elementwise(np.where),
}


# --------------------------------------------------------------------------------------
# Check on onnxruntime
# --------------------------------------------------------------------------------------


class _Recheck:
    """Loads rewritten models on onnxruntime (ORT_ENABLE_ALL) and, where feeds run the model
    as it was, compares their outputs with its outputs; :meth:`restore` puts the model back
    as it was. ``unusable`` says why nothing can be checked (the model does not load)."""

    def __init__(self, model: Model, ctx: PassContext, workdir: str):
        self.workdir = workdir
        self.unusable = ""
        self.mode = "load"
        self.feeds: dict | None = None
        self.expected: dict = {}
        self.snapshot = model.to_proto()
        self.on_disk = model.has_external_data() or self.snapshot.ByteSize() >= EXTERNAL_DATA_THRESHOLD
        try:
            session = self._session(model, self.snapshot)
        except Exception as exc:  # onnxruntime's errors have many types
            self.unusable = f"the model does not load on onnxruntime: {_first_line(exc)}"
            return
        feeds = _feeds(model, ctx)
        if feeds is None:
            return
        try:
            self.expected = _run(session, feeds)
        except Exception as exc:
            log.debug("inline-if: the model does not run on the feeds at hand (%s); checking loads only",
                      _first_line(exc))
            return
        self.feeds, self.mode = feeds, "run"

    def _session(self, model: Model, proto: onnx.ModelProto) -> ort.InferenceSession:
        if self.on_disk:  # written beside its data to a file onnxruntime reads
            return make_session(model, "cpu", optimization="all", workdir=self.workdir)
        return make_session(proto.SerializeToString(), "cpu", optimization="all")

    def restore(self, model: Model) -> None:
        """Make ``model`` what it was when the check was set up."""
        model.__dict__.update(Model.from_proto(self.snapshot, base_dir=model.base_dir,
                                               source_path=model.source_path).__dict__)

    def problem(self, candidate: Model) -> str:
        """Why ``candidate`` fails the check ("" when it passes)."""
        try:
            session = self._session(candidate, candidate.to_proto())
        except Exception as exc:
            return f"does not load on onnxruntime: {_first_line(exc)}"
        if self.feeds is None:
            return ""
        try:
            got = _run(session, self.feeds)
        except Exception as exc:
            return f"does not run on onnxruntime: {_first_line(exc)}"
        for name, ref in self.expected.items():
            if not isinstance(ref, np.ndarray) or not isinstance(got.get(name), np.ndarray):
                return f"output '{name}' is not a tensor: not compared"
            m = compare_outputs(name, ref, got[name], exact=True)
            if not m.passed:
                return f"output '{name}' changes: {m.reason}"
        return ""


def _feeds(model: Model, ctx: PassContext) -> dict | None:
    """The context's feeds, or feeds generated from the signature as validation would;
    None when the context's do not fit the model or none can be generated."""
    try:
        if ctx.feeds is not None:
            check_feeds(model, ctx.feeds)
            return dict(ctx.feeds)
        return random_feeds(model, ctx.shapes, seed=ctx.seed)[0]
    except (OnnxoptError, ValueError, TypeError) as exc:
        log.debug("inline-if: no feeds for the check (%s)", exc)
        return None


def _run(session: ort.InferenceSession, feeds: dict) -> dict:
    import onnxruntime as ort  # imported where used: a run with nothing to inline never needs it

    options = ort.RunOptions()
    options.log_severity_level = 4  # a failed run is an answer here, not an error to log
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds, options)))


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in (str(exc).strip() or type(exc).__name__).splitlines() if ln.strip()]
    return " ".join(lines[:2])[:300]


def _inline_checked(model: Model, decisions: list[_Decision], check: _Recheck
                    ) -> tuple[list[_Decision], list[tuple[_Decision, str]]]:
    """Inline the decided Ifs that pass the check: all at once when that passes; else each
    one with those that passed so far, the model restored before every try. Returns the
    inlined decisions and the rejected ones with the reason."""
    with gc_paused():
        _apply(model, decisions)
    problem = check.problem(model)
    if not problem:
        return decisions, []
    kept: list[_Decision] = []
    rejected: list[tuple[_Decision, str]] = []
    for d in decisions if len(decisions) > 1 else []:
        check.restore(model)
        _apply(model, kept + [d])
        problem = check.problem(model)
        if problem:
            rejected.append((d, problem))
        else:
            kept.append(d)
    if len(decisions) == 1:
        rejected.append((decisions[0], problem))
    check.restore(model)
    _apply(model, kept)
    return kept, rejected


def _node_count(model: Model) -> int:
    return sum(len(g.nodes) for g in iter_graphs(model.graph))


# --------------------------------------------------------------------------------------
# Rewrite
# --------------------------------------------------------------------------------------


def _apply(model: Model, decisions: list[_Decision]) -> None:
    """Inline the decided Ifs of ``model``, inner ones first (all are found before any
    moves: positions change as branches are inlined)."""
    targets = []
    for d in decisions:
        graph = model.graph
        for j in range(0, len(d.path) - 1, 2):
            graph = node_subgraphs(graph.nodes[d.path[j]])[d.path[j + 1]]
        targets.append((graph, graph.nodes[d.path[-1]], d.key))
    names = NameAllocator(model)
    for graph, node, key in reversed(targets):
        live = {id(g) for g in iter_graphs(model.graph)}
        if id(graph) not in live or not any(n is node for n in graph.nodes):
            continue  # an If inlined before left this one unread: it was pruned with its graph
        _inline(model, graph, node, key, names)


def _inline(model: Model, graph: gs.Graph, node: gs.Node, key: str, names: NameAllocator) -> None:
    branch = node.attrs[key]
    _rename_clashes(model, node, branch, names)
    results = list(node.outputs)
    node.outputs.clear()
    moved = list(branch.nodes)
    producer = {id(t): n for n in moved for t in n.outputs}
    bridges: list[gs.Node] = []
    claimed: set[int] = set()
    for x, y in zip(results, branch.outputs):
        if not x.name:
            continue
        source = producer.get(id(y))
        if source is not None and id(y) not in claimed:
            claimed.add(id(y))
            replace_uses(y, x)  # readers in the branch and in graphs nested in it
            for g in iter_graphs(branch):
                g.outputs = [x if t is y else t for t in g.outputs]
            source.outputs[next(k for k, t in enumerate(source.outputs) if t is y)] = x
        else:  # an outer tensor, a constant, or a tensor returned twice
            bridges.append(gs.Node("Identity", name=names(f"{x.name}_inlined"), inputs=[y], outputs=[x]))
    at = next(i for i, n in enumerate(graph.nodes) if n is node)
    graph.nodes[at:at] = moved + bridges
    mine, theirs = extras(graph), extras(branch)
    mine.initializers.extend(theirs.initializers)
    mine.quantization_annotation.extend(theirs.quantization_annotation)
    branch.nodes = []
    del node.attrs[key]
    prune_unused(model, drop_nodes(model, {id(node)}))


def _rename_clashes(model: Model, node: gs.Node, branch: gs.Graph, names: NameAllocator) -> None:
    """Rename the tensors ``branch`` defines whose name some graph outside ``node`` also
    uses: once inlined they are in scope for every other subgraph of the parent."""
    own = [t for t in extras(branch).initializers] + [t for n in branch.nodes for t in n.outputs if t.name]
    if not own:
        return
    inside = {id(g) for sub in node_subgraphs(node) for g in iter_graphs(sub)}
    elsewhere: set[str] = set()
    for g in iter_graphs(model.graph):
        if id(g) in inside:
            continue
        elsewhere.update(t.name for t in itertools.chain(g.inputs, g.outputs, extras(g).initializers))
        for n in g.nodes:
            elsewhere.update(t.name for t in itertools.chain(n.inputs, n.outputs))
    for t in own:
        if t.name in elsewhere:
            t.name = names(t.name)
