"""dead-nodes: drop everything that no graph output needs.

Liveness starts at the graph's outputs and walks back through producers; a live node
keeps its inputs alive, and so do the outer-scope tensors its If/Loop/Scan bodies read.
Bodies are pruned first (against their own outputs, which are positional and never
removed), so that a body that stops reading an outer tensor frees it.

Removed: dead nodes (Constant nodes included), initializers nobody reads, value_info
entries naming no tensor, opset imports no node or function uses, and local functions no
node calls. Never removed: graph inputs — including initializers listed as inputs (IR < 4
models list every weight so; a user may feed them) — graph outputs, and subgraph inputs.
A node of any domain is kept when its outputs are used; one whose outputs are all unused
is dropped, since ONNX nodes have no side effects.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxopt.framework import Pass, PassContext, PassResult, register
from onnxopt.graph import disconnect, implicit_inputs
from onnxopt.model import Model, extras, iter_graphs, node_subgraphs, tensor_nbytes

__all__ = ["DeadNodes"]


@register
class DeadNodes(Pass):
    """Remove nodes, initializers, value_info, opset imports and local functions that no
    graph output depends on, inside subgraphs too."""

    name = "dead-nodes"
    summary = "drop nodes/initializers/functions that no graph output needs (subgraphs included)"
    exact = True
    options = {}

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        before_nodes = sum(len(g.nodes) for g in iter_graphs(model.graph))
        _prune(model.graph)
        nodes_removed = before_nodes - sum(len(g.nodes) for g in iter_graphs(model.graph))

        inits_removed = bytes_removed = vi_removed = 0
        for g in iter_graphs(model.graph):
            ext = extras(g)
            keep_ids = {id(t) for t in g.inputs} | {id(t) for t in g.outputs}
            kept = []
            for t in ext.initializers:
                if t.outputs or id(t) in keep_ids:
                    kept.append(t)
                else:
                    inits_removed += 1
                    bytes_removed += tensor_nbytes(t)
            ext.initializers = kept
            vi_removed += len(ext.orphan_value_info)
            ext.orphan_value_info = []

        functions_removed = _drop_unused_functions(model)
        opsets_removed = _drop_unused_opsets(model)
        stats = {
            "nodes_removed": nodes_removed,
            "initializers_removed": inits_removed,
            "bytes_removed": bytes_removed,
            "value_info_removed": vi_removed,
            "functions_removed": functions_removed,
            "opsets_removed": opsets_removed,
        }
        return PassResult(modified=any(stats.values()), stats=stats)


def _prune(graph: gs.Graph) -> None:
    for node in graph.nodes:
        for sub in node_subgraphs(node):
            _prune(sub)
    live_tensors = {id(t) for t in graph.outputs}
    live_nodes: set[int] = set()
    for node in reversed(_ordered(graph)):
        if any(id(t) in live_tensors for t in node.outputs):
            live_nodes.add(id(node))
            live_tensors.update(id(t) for t in node.inputs)
            live_tensors.update(id(t) for t in implicit_inputs(node))
    dead = [n for n in graph.nodes if id(n) not in live_nodes]
    if dead:
        graph.nodes = [n for n in graph.nodes if id(n) in live_nodes]
        for node in dead:
            _disconnect(node)


def _ordered(graph: gs.Graph) -> list[gs.Node]:
    """Nodes in an order where producers precede consumers (the file order if it is
    already so, which valid ONNX requires; sorted otherwise)."""
    produced: set[int] = set()
    defined = {id(t) for t in graph.inputs}
    ok = True
    for node in graph.nodes:
        for t in node.inputs:
            if t.inputs and id(t) not in produced and id(t) not in defined:
                producer = t.inputs[0]
                if any(producer is n for n in graph.nodes):
                    ok = False
                    break
        if not ok:
            break
        produced.update(id(t) for t in node.outputs)
    if ok:
        return list(graph.nodes)
    from onnxopt.graph import toposort

    toposort(graph, recurse=False)
    return list(graph.nodes)


def _disconnect(node: gs.Node) -> None:
    """Unlink a removed node — and everything in its subgraphs — from the tensors it
    touched, so that those tensors no longer count it as a consumer."""
    for sub in node_subgraphs(node):
        for inner in sub.nodes:
            _disconnect(inner)
    disconnect(node)


def _function_key(domain: str | None, name: str) -> tuple[str, str]:
    return (domain or "", name)


def _drop_unused_functions(model: Model) -> int:
    if not model.functions:
        return 0
    by_key = {_function_key(f.domain, f.name): f for f in model.functions}
    called: set[tuple[str, str]] = set()
    stack = []
    for g in iter_graphs(model.graph):
        for node in g.nodes:
            key = _function_key(node.domain, node.op)
            if key in by_key and key not in called:
                called.add(key)
                stack.append(by_key[key])
    while stack:
        f = stack.pop()
        for node in f.node:
            key = _function_key(node.domain, node.op_type)
            if key in by_key and key not in called:
                called.add(key)
                stack.append(by_key[key])
    kept = [f for f in model.functions if _function_key(f.domain, f.name) in called]
    removed = len(model.functions) - len(kept)
    model.functions = kept
    return removed


def _drop_unused_opsets(model: Model) -> int:
    used = {""}
    for g in iter_graphs(model.graph):
        for node in g.nodes:
            used.add("" if node.domain in (None, "ai.onnx") else node.domain)
    for f in model.functions:
        used.add(f.domain or "")
        for node in f.node:
            used.add("" if node.domain in ("", "ai.onnx") else node.domain)
        for op in f.opset_import:
            used.add("" if op.domain in ("", "ai.onnx") else op.domain)
    unused = [d for d in model.opset_imports if d not in used]
    for d in unused:
        del model.opset_imports[d]
    return len(unused)
