"""Graph queries and small mutations on the graphsurgeon IR, shared by every pass.

Identity is object identity: gs tensors compare equal by *name* (``Tensor.__eq__``)
and are unhashable, so everything here keys on ``id()`` and compares with ``is``.

gs keeps producer/consumer links for us: ``tensor.inputs`` are the nodes producing it,
``tensor.outputs`` the nodes consuming it — including nodes inside subgraphs that read
it from the enclosing scope.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .model import Model, RawAttribute, extras, iter_graphs, node_subgraphs, tensor_nbytes

if TYPE_CHECKING:
    import networkx as nx

__all__ = [
    "GraphIndex",
    "NameAllocator",
    "SHAPE_OPS",
    "const_value",
    "const_through_shape_ops",
    "write_constant",
    "overwrite_constant",
    "is_const",
    "implicit_inputs",
    "disconnect",
    "toposort",
    "to_networkx",
    "replace_uses",
    "bypass",
    "release_constant",
    "remove_nodes",
    "detach_nodes",
    "graph_outputs",
]


def is_const(tensor: gs.Tensor) -> bool:
    """Whether the tensor's value is known without running the model: a gs Constant
    (initializer not overridable by a graph input) or the output of a Constant node."""
    return const_value(tensor) is not None


def const_value(tensor: gs.Tensor, *, load: bool = True) -> np.ndarray | None:
    """The value of a constant tensor, or None.

    Initializers that are also graph inputs (overridable defaults) are *not* constant.
    ``load=False`` avoids caching lazily-loaded values on the tensor (read-only scans).
    """
    if isinstance(tensor, gs.Constant):
        if vars(tensor).get("input_value_info") is not None:
            return None  # listed as a graph input: a user may feed it
        if load:
            return tensor.values
        values = tensor._values
        return values if isinstance(values, np.ndarray) else values.load()
    if len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.op != "Constant" or node.domain not in (None, "", "ai.onnx") or node.inputs:
        return None
    return constant_node_value(node)


#: Ops that only re-shape or re-type a tensor, through which a constant stays constant.
SHAPE_OPS = frozenset(["Reshape", "Unsqueeze", "Squeeze", "Identity", "Cast", "Flatten", "Transpose"])

_STD = (None, "", "ai.onnx")


def const_through_shape_ops(tensor: gs.Tensor, *, depth: int = 4, max_bytes: int | None = None
                            ) -> np.ndarray | None:
    """The value of ``tensor`` if it is a constant (:func:`const_value`) or the end of a
    chain of at most ``depth`` :data:`SHAPE_OPS` over constants; None otherwise.

    Exporters write per-channel biases and scales as a Reshape or Unsqueeze of a 1-D
    constant (a Cast of it, a Transpose of a weight), and a pass that asks "is this
    operand a weight, a per-channel vector?" must see through that. ``max_bytes``: no
    constant holding more bytes is read, the chain's shape operands included (None: any
    size), so that a matcher never loads a large weight only to learn that it is not the
    small vector it looks for.
    """
    if max_bytes is not None and _const_nbytes(tensor) > max_bytes:
        return None
    value = const_value(tensor)
    if value is not None:
        return np.asarray(value)
    if depth <= 0 or not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.op not in SHAPE_OPS or node.domain not in _STD or len(node.outputs) != 1:
        return None
    args = [const_through_shape_ops(t, depth=depth - 1, max_bytes=max_bytes) if t.name else None
            for t in node.inputs]
    if not args or args[0] is None:
        return None
    try:
        return _apply_shape_op(node, args[0], args[1:])
    except (ValueError, KeyError, TypeError):
        return None


def _const_nbytes(tensor: gs.Tensor) -> int:
    """Bytes a constant holds, without loading it (0 when it is not a stored constant)."""
    if isinstance(tensor, gs.Constant):
        return tensor_nbytes(tensor)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        held = tensor.inputs[0].attrs.get("value")
        if isinstance(held, gs.Constant):
            return tensor_nbytes(held)
    return 0


def _apply_shape_op(node: gs.Node, x: np.ndarray, rest: list) -> np.ndarray | None:
    """What the shape op ``node`` makes of ``x`` (``rest``: its other inputs' values)."""
    op = node.op
    if op == "Identity":
        return x
    if op == "Cast":
        return x.astype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    if op == "Reshape":
        if not rest or rest[0] is None:
            return None
        shape = [int(d) for d in rest[0]]
        if node.attrs.get("allowzero", 0):
            return x.reshape(shape)
        return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])
    if op in ("Unsqueeze", "Squeeze"):
        axes = node.attrs.get("axes")
        if axes is None and rest:
            if rest[0] is None:
                return None
            axes = [int(a) for a in rest[0]]
        if op == "Squeeze":
            return np.squeeze(x, axis=tuple(axes)) if axes is not None else np.squeeze(x)
        rank = x.ndim + len(axes)
        for a in sorted(a % rank for a in axes):
            x = np.expand_dims(x, a)
        return x
    if op == "Flatten":
        axis = int(node.attrs.get("axis", 1)) % max(x.ndim, 1)
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if op == "Transpose":
        return np.transpose(x, node.attrs.get("perm"))
    return None


def constant_node_value(node: gs.Node) -> np.ndarray | None:
    """The value of a Constant node, from whichever ``value*`` attribute it uses."""
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        return value.values if isinstance(value, gs.Constant) else None
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    if "value_string" in attrs and not isinstance(attrs["value_string"], RawAttribute):
        return np.array(attrs["value_string"].encode(), dtype=object)
    if "value_strings" in attrs and not isinstance(attrs["value_strings"], RawAttribute):
        return np.array([s.encode() for s in attrs["value_strings"]], dtype=object)
    return None


def graph_outputs(graph: gs.Graph) -> set[int]:
    """ids of the tensors that are outputs of ``graph`` or of any graph nested in it."""
    return {id(t) for g in iter_graphs(graph) for t in g.outputs}


def implicit_inputs(node: gs.Node) -> list[gs.Variable]:
    """Variables that ``node``'s subgraphs read from enclosing scopes (outer-scope
    references), in first-use order. Constants are left out: they have no producer, and
    their users are already linked in ``tensor.outputs``."""
    found: list[gs.Variable] = []
    seen: set[int] = set()
    for sub in node_subgraphs(node):
        _collect_implicit(sub, set(), found, seen)
    return found


def _collect_implicit(g: gs.Graph, outer_defined: set[int], found: list, seen: set[int]) -> None:
    defined = set(outer_defined)
    defined.update(id(t) for t in g.inputs)
    for node in g.nodes:
        defined.update(id(t) for t in node.outputs)

    def use(t: gs.Tensor) -> None:
        if isinstance(t, gs.Variable) and t.name and id(t) not in defined and id(t) not in seen:
            seen.add(id(t))
            found.append(t)

    for node in g.nodes:
        for t in node.inputs:
            use(t)
        for sub in node_subgraphs(node):
            _collect_implicit(sub, defined, found, seen)
    for t in g.outputs:
        use(t)


def toposort(graph: gs.Graph, *, recurse: bool = True) -> None:
    """Order ``graph.nodes`` so that every node comes after the producers of its inputs,
    outer-scope references of its subgraphs included. Stable: an already-sorted graph
    keeps its order. Raises ``ValueError`` on a cycle."""
    nodes = list(graph.nodes)
    index = {id(n): i for i, n in enumerate(nodes)}
    producer_of: dict[int, int] = {}
    for i, n in enumerate(nodes):
        for t in n.outputs:
            producer_of[id(t)] = i
    deps: list[set[int]] = []
    for n in nodes:
        d = set()
        for t in itertools.chain(n.inputs, implicit_inputs(n)):
            p = producer_of.get(id(t))
            if p is not None and p != index[id(n)]:
                d.add(p)
        deps.append(d)
    users: list[list[int]] = [[] for _ in nodes]
    indeg = [len(d) for d in deps]
    for i, d in enumerate(deps):
        for p in d:
            users[p].append(i)
    ready = [i for i, k in enumerate(indeg) if k == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        stuck = [nodes[i].name or nodes[i].op for i, k in enumerate(indeg) if k > 0][:5]
        raise ValueError(f"graph '{graph.name}' has a cycle through {stuck}")
    graph.nodes = [nodes[i] for i in order]
    if recurse:
        for n in graph.nodes:
            for sub in node_subgraphs(n):
                toposort(sub)


def to_networkx(graph: gs.Graph) -> nx.DiGraph:
    """Dataflow of one graph level as a ``networkx.DiGraph``.

    Nodes are ``id(gs.Node)`` with attribute ``node``; an edge ``p -> c`` carries the
    list of tensors (``tensors``) that ``c`` reads from ``p``, outer-scope reads of
    ``c``'s subgraphs included.
    """
    import networkx as nx  # imported where used: most commands never build this view

    g = nx.DiGraph()
    producer: dict[int, gs.Node] = {}
    for n in graph.nodes:
        g.add_node(id(n), node=n)
        for t in n.outputs:
            producer[id(t)] = n
    for n in graph.nodes:
        for t in itertools.chain(n.inputs, implicit_inputs(n)):
            p = producer.get(id(t))
            if p is None:
                continue
            if g.has_edge(id(p), id(n)):
                g.edges[id(p), id(n)]["tensors"].append(t)
            else:
                g.add_edge(id(p), id(n), tensors=[t])
    return g


class GraphIndex:
    """Which graph each node lives in, and each graph's parent node, for a whole model."""

    def __init__(self, model: Model):
        self.graph_of: dict[int, gs.Graph] = {}
        self.parent: dict[int, gs.Node | None] = {id(model.graph): None}
        for g in iter_graphs(model.graph):
            for n in g.nodes:
                self.graph_of[id(n)] = g
                for sub in node_subgraphs(n):
                    self.parent[id(sub)] = n

    def depth(self, graph: gs.Graph) -> int:
        d = 0
        node = self.parent.get(id(graph))
        while node is not None:
            d += 1
            node = self.parent.get(id(self.graph_of[id(node)]))
        return d


class NameAllocator:
    """Fresh tensor/node names that collide with nothing in the model."""

    def __init__(self, model: Model):
        self._next: dict[str, int] = {}
        self.taken: set[str] = set()
        for g in iter_graphs(model.graph):
            for t in itertools.chain(g.inputs, g.outputs, extras(g).initializers):
                self.taken.add(t.name)
            for n in g.nodes:
                self.taken.add(n.name)
                for t in itertools.chain(n.inputs, n.outputs):
                    self.taken.add(t.name)

    def __call__(self, hint: str) -> str:
        hint = hint or "t"
        if hint not in self.taken:
            self.taken.add(hint)
            return hint
        # Resume after the last suffix given for this hint: every lower one is taken, so
        # the name is the same as probing from 1, without the quadratic probing.
        for i in itertools.count(self._next.get(hint, 1)):
            name = f"{hint}_{i}"
            if name not in self.taken:
                self.taken.add(name)
                self._next[hint] = i + 1
                return name
        raise AssertionError("unreachable")


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> int:
    """Make every node that reads ``old`` (in any graph, subgraphs included) read ``new``.
    Graph outputs are not touched. Returns the number of inputs rewired."""
    count = 0
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new
                count += 1
    return count


def bypass(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> bool:
    """Replace tensor ``old`` of ``graph`` by ``new`` everywhere, keeping the graph's
    output names: where ``old`` is an output of ``graph``, ``new`` takes its name (and its
    declared type) — possible only when ``new`` is produced by a node of ``graph`` and is
    not itself an input or output of any graph. Returns False, changing nothing, when that
    is not possible."""
    out_positions = [i for i, t in enumerate(graph.outputs) if t is old]
    if out_positions:
        if not _can_take_name(graph, new):
            return False
        keep_name = old.name
        replace_uses(old, new)
        old.name = keep_name + "__replaced"
        new.name = keep_name
        for key in ("value_info", "value_info_key"):
            if key in vars(old):
                setattr(new, key, vars(old)[key])
        if isinstance(old, gs.Variable):
            new.dtype = old.dtype if old.dtype is not None else new.dtype
            new.shape = old.shape if old.shape is not None else new.shape
            new.type = old.type
        for i in out_positions:
            graph.outputs[i] = new
        return True
    replace_uses(old, new)
    return True


def _can_take_name(graph: gs.Graph, new: gs.Tensor) -> bool:
    if not isinstance(new, gs.Variable) or len(new.inputs) != 1:
        return False
    producer = new.inputs[0]
    if not any(producer is n for n in graph.nodes):
        return False
    outs = graph_outputs(graph)
    if id(new) in outs:
        return False
    return not any(new is t for t in graph.inputs)


def disconnect(node: gs.Node) -> None:
    """Unlink ``node`` from the tensors it reads and writes, by identity. graphsurgeon's own
    ``clear`` removes the first *equal* node from a tensor's lists, and two nodes of two
    bodies that share names and inputs compare equal: it would unlink the other one."""
    for ends, field in ((node.inputs, "outputs"), (node.outputs, "inputs")):
        for t in ends:
            links = getattr(t, field)
            at = next((i for i, other in enumerate(links) if other is node), None)
            if at is not None:
                list.__delitem__(links, at)
        list.clear(ends)


def remove_nodes(graph: gs.Graph, dead: set[int]) -> int:
    """Remove the nodes whose ids are in ``dead`` from ``graph`` and disconnect them."""
    kept, removed = [], 0
    for n in graph.nodes:
        if id(n) in dead:
            disconnect(n)
            removed += 1
        else:
            kept.append(n)
    graph.nodes = kept
    return removed


def detach_nodes(nodes: list[gs.Node]) -> None:
    """Unlink ``nodes`` — and every node of their subgraphs — from the tensors they read
    and write, in one sweep. Same effect as clearing each node's inputs and outputs, but
    linear: graphsurgeon removes a node from a tensor's consumer list by comparing nodes
    one by one (``Node.__eq__``), which is quadratic when many removed nodes read one
    widely shared tensor (a deduplicated constant). The nodes stay in their graph's list."""
    dead: dict[int, gs.Node] = {}
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if id(n) in dead:
            continue
        dead[id(n)] = n
        for sub in node_subgraphs(n):
            stack.extend(sub.nodes)
    touched: dict[int, gs.Tensor] = {}
    for n in dead.values():
        for t in itertools.chain(n.inputs, n.outputs):
            touched[id(t)] = t
    for t in touched.values():
        # list methods, not the SynchronizedList ones: the other side is cleared below
        kept_consumers = [c for c in t.outputs if id(c) not in dead]
        kept_producers = [p for p in t.inputs if id(p) not in dead]
        list.clear(t.outputs)
        list.extend(t.outputs, kept_consumers)
        list.clear(t.inputs)
        list.extend(t.inputs, kept_producers)
    for n in dead.values():
        list.clear(n.inputs)
        list.clear(n.outputs)


def release_constant(model: Model, tensor: gs.Tensor) -> bool:
    """Drop ``tensor`` from the initializer lists if nothing uses it any more (call after
    a rewrite that replaced a weight). Returns whether it was dropped."""
    if not isinstance(tensor, gs.Constant) or tensor.outputs:
        return False
    for g in iter_graphs(model.graph):
        if any(tensor is t for t in g.inputs) or any(tensor is t for t in g.outputs):
            return False
    dropped = False
    for g in iter_graphs(model.graph):
        inits = extras(g).initializers
        kept = [t for t in inits if t is not tensor]
        if len(kept) != len(inits):
            extras(g).initializers = kept
            dropped = True
    return dropped


def overwrite_constant(t: gs.Tensor, value: np.ndarray) -> None:
    """Give ``t`` — an initializer, or the output of a Constant node — ``value`` in place:
    the tensor keeps its name and its readers."""
    if isinstance(t, gs.Constant):
        t.values = value
        return
    producer = t.inputs[0]
    for key in [k for k in producer.attrs if k.startswith("value")]:
        del producer.attrs[key]
    producer.attrs["value"] = gs.Constant(t.name, value)
    types = vars(producer).get("attr_types")
    if types:
        types.pop("value", None)
    t.shape = list(value.shape)


def write_constant(model: Model, node: gs.Node, index: int, value: np.ndarray, *,
                   names: NameAllocator | None = None, replaced: list[gs.Tensor] | None = None) -> None:
    """Give input ``index`` of ``node`` the constant ``value``, in the dtype of the
    constant it replaces: in place when nothing else reads the old constant (an
    initializer or a Constant node's output), else as a new constant; a missing optional
    input (a Conv bias) is added.

    What the node stopped reading is removed when it became unused. A caller writing many
    constants passes ``names`` (one allocator for all) and ``replaced``, a list that
    collects what the node stopped reading: it then removes what became unused itself,
    once, with :func:`onnxopt.rewrite.prune_unused`.
    """
    names = names if names is not None else NameAllocator(model)
    if index >= len(node.inputs) or not node.inputs[index].name:
        while len(node.inputs) <= index:
            node.inputs.append(gs.Variable(""))
        node.inputs[index] = gs.Constant(names((node.outputs[0].name if node.outputs else "w") + "_bias"),
                                         np.ascontiguousarray(value))
        return
    old = _write_input(model, node, index, value, names)
    if old is None:
        return
    if replaced is not None:
        replaced.append(old)
        return
    from .rewrite import prune_unused  # rewrite builds on this module's queries

    prune_unused(model, [old])


def _write_input(model: Model, node: gs.Node, index: int, value: np.ndarray,
                 names: NameAllocator) -> gs.Tensor | None:
    """Write ``value`` into input ``index`` of ``node``; returns the tensor the node
    stopped reading (None when the old constant was overwritten in place)."""
    old = node.inputs[index]
    uses = sum(1 for c in old.outputs for t in c.inputs if t is old)
    in_io = any(old is t for g in iter_graphs(model.graph) for t in list(g.inputs) + list(g.outputs))
    before = const_through_shape_ops(old)
    if before is not None:
        value = value.astype(before.dtype)
    value = np.ascontiguousarray(value)
    if uses == 1 and not in_io:
        if isinstance(old, gs.Constant) or (
                old.inputs and old.inputs[0].op == "Constant" and len(old.inputs[0].outputs) == 1):
            overwrite_constant(old, value)
            return None
    node.inputs[index] = gs.Constant(names(old.name or "pruned"), value)
    return old


def iter_nodes(model: Model) -> Iterator[tuple[gs.Graph, gs.Node]]:
    """Every (graph, node) pair of the model, outer graphs first."""
    for g in iter_graphs(model.graph):
        for n in g.nodes:
            yield g, n


def tensor_dtype(tensor: gs.Tensor) -> np.dtype | None:
    """The numpy dtype of a tensor if known."""
    dt = tensor.dtype
    if dt is None:
        return None
    if isinstance(dt, int):
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dt))
    return np.dtype(dt)


def bfs_from(start: list[gs.Node]) -> Iterator[gs.Node]:
    """Nodes reachable downstream of ``start`` (consumers of their outputs), once each."""
    seen = {id(n) for n in start}
    queue = deque(start)
    while queue:
        n = queue.popleft()
        yield n
        for t in n.outputs:
            for c in t.outputs:
                if id(c) not in seen:
                    seen.add(id(c))
                    queue.append(c)
