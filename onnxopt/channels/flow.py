"""What the channel-dependency walk knows while it goes through a graph.

:class:`ChannelFlow` holds the spaces of channels created so far, the joins between
them (a networkx graph: an edge joins two spaces added position-wise), the layout of
every tensor that carries channels, the members a removal must rewrite, and why a space
may not be pruned. The per-op rules (:mod:`.layer_ops`, :mod:`.per_channel_ops`,
:mod:`.shape_ops`) read and extend it; :mod:`.dependencies` turns it into groups.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import const_through_shape_ops
from ..model import Model
from ..tensorinfo import ShapeIndex
from .example_shapes import example_shapes
from .layout import FIXED, Layout, Member, Seg

__all__ = ["ChannelFlow", "label", "ints_given"]

log = logging.getLogger(__name__)


def label(node: gs.Node) -> str:
    """A node as messages name it: its name, or the tensor it produces."""
    if node.name:
        return f"{node.op} '{node.name}'"
    out = node.outputs[0].name if node.outputs else "?"
    return f"{node.op} -> '{out}'"


def ints_given(node: gs.Node, attr: str, index: int) -> tuple[list[int] | None, bool]:
    """The integers an op takes as attribute ``attr`` or, in later opsets, as input
    ``index`` (axes, sizes, pads), and whether that input is computed: ``(None, True)``
    when its value is unknown, ``(None, False)`` when given neither way."""
    values = node.attrs.get(attr)
    if values is None and len(node.inputs) > index and node.inputs[index].name:
        v = const_through_shape_ops(node.inputs[index])
        if v is None:
            return None, True
        values = np.ravel(v)
    return (None if values is None else [int(a) for a in values]), False


class ChannelFlow:
    """The state of the channel-dependency walk over ``model``'s main graph."""

    def __init__(self, model: Model):
        self.model = model
        self.graph = model.graph
        self.shapes = ShapeIndex(model)
        self._examples: dict | None = None
        self.skipped: Counter = Counter()
        self.layouts: dict[int, Layout] = {}
        self.tensor_of: dict[int, gs.Tensor] = {}
        self.order: list[int] = []
        self.size: dict[int, int] = {}
        self.origin: dict[int, str] = {}
        import networkx as nx  # imported where used: the pass library loads without it

        self.joins = nx.Graph()  # spaces; an edge = two spaces added position-wise
        self.reasons: dict[int, list[str]] = {}
        self.members: list[Member] = []

    # ---- spaces ----------------------------------------------------------------------

    def new_space(self, size: int, origin: str) -> int:
        sid = len(self.size)
        self.size[sid] = size
        self.origin[sid] = origin
        self.joins.add_node(sid)
        return sid

    def union(self, a: int, b: int, where: str) -> None:
        self.joins.add_edge(a, b, where=where)

    def block(self, spaces: Iterable[int], reason: str) -> None:
        for s in spaces:
            if s == FIXED:
                continue
            self.reasons.setdefault(s, [])
            if reason not in self.reasons[s]:
                self.reasons[s].append(reason)
                log.debug("channels of %s not prunable: %s", self.origin[s], reason)

    def block_layout(self, lay: Layout | None, reason: str) -> None:
        if lay is not None:
            self.block(lay.spaces(), reason)

    # ---- tensors ---------------------------------------------------------------------

    def lay(self, t: gs.Tensor) -> Layout | None:
        return self.layouts.get(id(t))

    def set(self, t: gs.Tensor, lay: Layout | None) -> None:
        if lay is None or not lay.segs:
            return
        self.layouts[id(t)] = lay
        if id(t) not in self.tensor_of:
            self.tensor_of[id(t)] = t
            self.order.append(id(t))

    def shape(self, t: gs.Tensor) -> tuple | None:
        """Shape from symbolic inference (dims are ints or names), or None. A shape of
        which nothing but the rank is known counts as unknown: the rules then match on
        the example shapes (:meth:`cshape`), which know the rank too, and more."""
        if isinstance(t, gs.Constant):
            return tuple(int(d) for d in t.shape)
        v = const_through_shape_ops(t)
        if v is not None:
            return tuple(v.shape)
        info = self.shapes.info(t)
        if info is None or info.shape is None or (info.shape and all(d is None for d in info.shape)):
            return None
        return tuple(info.shape)

    def cshape(self, t: gs.Tensor) -> tuple | None:
        """Shape with the inputs' dynamic dims set to example values: where symbolic
        inference loses track (a Reshape to a computed shape), this still gives ranks.
        Its dims are one example, never trusted as general sizes."""
        s = self.shape(t)
        return s if s is not None else self.example_shape(t)

    def example_shape(self, t: gs.Tensor) -> tuple | None:
        if isinstance(t, gs.Constant) or const_through_shape_ops(t) is not None:
            return self.shape(t)
        if self._examples is None:
            self._examples = example_shapes(self.model)
        # Computed on a copy of the model: the tensor's name is the link back to it.
        info = self._examples.get(t.name)
        return None if info is None or info.shape is None else tuple(info.shape)

    def rank(self, t: gs.Tensor) -> int | None:
        lay = self.lay(t)
        if lay is not None:
            return lay.rank
        s = self.cshape(t)
        return None if s is None else len(s)

    def member(self, kind: str, node: gs.Node, index: int, axis: int, lay: Layout, role: str = "",
               **info) -> None:
        self.members.append(Member(kind, node, index, axis, lay, role, info))

    # ---- joining -------------------------------------------------------------------

    def full(self, seg: Seg) -> bool:
        return seg.space != FIXED and seg.start == 0 and seg.stop == self.size[seg.space]

    def join(self, a: Layout, b: Layout, where: str) -> bool:
        """Position-wise: channel i of ``a`` is channel i of ``b``."""
        if a.segs == b.segs and a.inner == b.inner:
            return True
        ok = a.inner == b.inner and len(a.segs) == len(b.segs)
        if ok:
            for sa, sb in zip(a.segs, b.segs):
                if sa == sb:
                    continue
                if sa.size != sb.size or not (self.full(sa) and self.full(sb)):
                    ok = False
                    break
        if not ok:
            self.block(a.spaces() | b.spaces(), f"layout: {where} combines channels laid out differently")
            return False
        for sa, sb in zip(a.segs, b.segs):
            if sa != sb:
                self.union(sa.space, sb.space, where)
        return True
