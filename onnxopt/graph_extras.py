"""What the working graphs carry beyond graphsurgeon, and how to walk them.

Passes work on ``gs.Graph`` objects. What a ``GraphProto`` holds and graphsurgeon has
no field for (unused initializers in file order, value_info naming no tensor, metadata,
quantization annotations) rides on each graph as :class:`GraphExtras`; attributes no
pass needs to look inside stay :class:`RawAttribute`. The walking helpers visit every
graph nested in If/Loop/Scan nodes, which every pass must handle, and
:func:`tensor_nbytes` sizes a constant without loading its data. They live here, below
the model and its converters, because both need them; ``onnxopt.model`` re-exports them.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import SparseValues

from .model_files import proto_data_bytes

__all__ = [
    "GraphExtras",
    "RawAttribute",
    "extras",
    "gc_paused",
    "iter_graphs",
    "node_subgraphs",
    "tensor_nbytes",
]


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector for bulk graph work.

    graphsurgeon's tensors and nodes reference each other, so building or walking a large
    graph triggers collection passes that scan every live object again and again
    (importing 100k nodes took twice as long with the collector running). Nothing here
    creates garbage cycles worth collecting mid-way; the collector resumes afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class RawAttribute:
    """An attribute kept as its ``AttributeProto`` because no pass needs to look inside
    (sparse tensors, type protos, lists of tensors, references inside functions)."""

    def __init__(self, proto: onnx.AttributeProto):
        self.proto = proto

    def __repr__(self) -> str:
        return f"RawAttribute({onnx.AttributeProto.AttributeType.Name(self.proto.type)})"


@dataclass
class GraphExtras:
    """Per-graph state that ``gs.Graph`` has no field for.

    ``initializers``: the graph's own initializers in file order, used or not. A pass that
    drops a weight removes it here; constants that passes create are found on save and
    need not be listed. ``orphan_value_info``: value_info entries naming no tensor of the
    graph (kept for a faithful round-trip; ``dead-nodes`` drops them).
    """

    initializers: list
    orphan_value_info: list
    metadata_props: list
    quantization_annotation: list


def extras(graph: gs.Graph) -> GraphExtras:
    """The :class:`GraphExtras` of ``graph`` (created empty for graphs a pass built)."""
    found = vars(graph).get("_onnxopt")
    if found is None:
        found = GraphExtras([], [], [], [])
        graph._onnxopt = found
    return found


def node_subgraphs(node: gs.Node) -> list[gs.Graph]:
    """The graphs held by ``node``'s attributes (If branches, Loop/Scan bodies)."""
    found = []
    for value in node.attrs.values():
        kind = value.__class__
        if kind is gs.Graph or (kind is not list and isinstance(value, gs.Graph)):
            found.append(value)
        elif isinstance(value, list) and value and isinstance(value[0], gs.Graph):
            found.extend(value)
    return found


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """``graph`` and every graph nested in it, outer before inner (depth first, in node
    order). Every pass walks it, often on graphs of many thousand nodes, so it looks at
    the attributes only of the nodes that have any."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        subs: list[gs.Graph] = []
        for node in g.nodes:
            if node.attrs:
                subs.extend(node_subgraphs(node))
        stack.extend(reversed(subs))


def tensor_nbytes(tensor: gs.Constant) -> int:
    """Bytes of a constant's data without loading it."""
    values = tensor._values
    if isinstance(values, np.ndarray):
        return int(values.nbytes)
    if isinstance(values, SparseValues):
        proto = values.tensor
        return int(proto_data_bytes(proto.values) + proto_data_bytes(proto.indices))
    return int(values.nbytes)

