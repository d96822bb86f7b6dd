"""Writing weights into a model in their cheapest storage, as ordinary ONNX ops that stock
onnxruntime folds once, when it creates the session.

The compact layers of a graph are stored together, one *block* per form (and index
width and dtype): the streams of all its layers are concatenated, expanded by one chain
of ops, and a ``Split`` plus one ``Reshape`` per layer give each weight back. Onnxruntime
materializes the output of every node it folds, so the cost of session creation grows
with the nodes and the bytes of the expansion; one block per form keeps it to a handful
of nodes plus three per layer, and the expansion keeps its intermediates narrow (uint8
where it can, int32 positions, no 8-byte words).

* Packed words are unpacked for all slots at once: ``BitShift(words, left_shifts, LEFT)``
  (the shifts a column, broadcast) moves each slot to the top of the word and
  ``BitShift(., word_bits - w, RIGHT)`` brings it down; ``Reshape`` (and ``Slice``, or
  the block's ``Split``) give the stream in order.
* Sparse blocks: ``CumSum`` of the gaps gives the positions and ``ScatterElements`` writes
  the values into ``ConstantOfShape`` zeros.
* Codebooks: each layer keeps its own. ``dense-idx`` blocks split the index stream by
  layer; ``sparse-idx`` blocks scatter the entries' indices into a uint8 index buffer
  (zeros get index 0, which is 0.0) and split that. Each part is shaped like its weight,
  cast and looked up (``Gather``), so the lookup's output is the weight itself.

Every input of the expansion is a constant: initializers, or Constant nodes in IR < 4
models (whose initializers are graph inputs a user may override, which would stop the
folding). The optimized graph onnxruntime runs is the original one.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph import NameAllocator, release_constant, replace_uses
from ..model import Model, iter_graphs
from .decode import COMPACT, DECODER_OPS, NotDecodable, decoder_cone, evaluate
from .sites import WEIGHT_OPS, WeightSite, find_weights
from .storage_plan import (
    MIN_OPSET_PACKED,
    PackedStream,
    StoragePlan,
    best_gap_width,
    gap_entries,
    model_opset,
    pack,
    plan_storage,
)

__all__ = ["StorageWriter"]

log = logging.getLogger(__name__)


class _ShortNames:
    """Short fresh names (``c0``, ``c1`` ... base 36): at a few kilobytes per model, the
    names of the storage's tensors are a visible part of the file."""

    _DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"

    def __init__(self, model: Model):
        self.taken = NameAllocator(model).taken
        self.counter = 0

    def __call__(self) -> str:
        while True:
            n, s = self.counter, ""
            self.counter += 1
            while True:
                n, r = divmod(n, 36)
                s = self._DIGITS[r] + s
                if n == 0:
                    break
            if "c" + s not in self.taken:
                self.taken.add("c" + s)
                return "c" + s


@dataclass
class _Pending:
    site: WeightSite
    value: np.ndarray
    dense: bool


class StorageWriter:
    """Writes new weight values into a model, each in its cheapest storage.

    ``write(site, value)`` records a layer's new value (``dense=True``: as a plain
    tensor); :meth:`commit` then rebuilds the compact storage of every graph that holds a
    written layer — the written layers and the layers already stored compactly there,
    one block per form — checks that every block gives back exactly its values, rewires
    the weights' readers, and drops the nodes and constants nothing reads any more.
    Nothing in the graph changes before :meth:`commit`.
    """

    def __init__(self, model: Model, memo: dict[int, np.ndarray] | None = None):
        self.model = model
        self.memo = {} if memo is None else memo
        self.pending: dict[int, _Pending] = {}

    def write(self, site: WeightSite, value: np.ndarray, *, dense: bool = False) -> None:
        self.pending[id(site.tensor)] = _Pending(site, np.ascontiguousarray(value), dense)

    # -- commit --------------------------------------------------------------------------

    def commit(self) -> dict[str, int]:
        """Apply the writes; returns how many layers ended in each storage form."""
        if not self.pending:
            return {}
        model = self.model
        opset = model_opset(model)
        existing, _ = find_weights(model, WEIGHT_OPS, self.memo)
        members: dict[int, list[_Pending]] = {}
        graphs: dict[int, gs.Graph] = {}
        for p in self.pending.values():
            members.setdefault(id(p.site.graph), []).append(p)
            graphs[id(p.site.graph)] = p.site.graph
        for s in existing:
            if id(s.tensor) not in self.pending and s.storage in COMPACT and id(s.graph) in graphs:
                members[id(s.graph)].append(_Pending(s, s.value, False))
        self.names = _ShortNames(model)
        self.constant_nodes = model.ir_version < 4
        self.opset = opset
        self.new_nodes: dict[int, list[gs.Node]] = {}
        self.pool: dict[tuple, gs.Tensor] = {}
        counts: Counter = Counter()
        replacements: list[tuple[WeightSite, gs.Tensor]] = []
        dense: list[tuple[WeightSite, np.ndarray]] = []
        for g in iter_graphs(model.graph):  # outer graphs first, deterministic order
            todo = members.get(id(g))
            if not todo:
                continue
            blocks: dict[tuple, list[tuple[WeightSite, StoragePlan]]] = {}
            for p in todo:
                plan = StoragePlan("dense", p.value) if p.dense else plan_storage(p.value, opset=opset)
                counts[plan.kind] += 1
                if plan.kind == "dense":
                    dense.append((p.site, p.value))
                    continue
                key = (plan.kind, plan.width, plan.value.dtype.str)
                blocks.setdefault(key, []).append((p.site, plan))
            for (kind, width, _), layers in blocks.items():
                outs = self._block(g, kind, width, layers)
                replacements.extend(zip((s for s, _ in layers), outs))
        self._verify(replacements, {id(p.site.tensor): p.value for g in members.values() for p in g})
        # From here on the graph changes.
        for key, nodes in self.new_nodes.items():
            g = graphs.get(key) or next(x for x in iter_graphs(model.graph) if id(x) == key)
            g.nodes = nodes + list(g.nodes)
        dead: list[gs.Node] = []
        released: list[gs.Tensor] = []
        for site, out in replacements:
            self._replace(site, out, dead, released)
        for site, value in dense:
            self._write_plain(site, value, dead, released)
        self._sweep(dead, released)
        self.pending.clear()
        return dict(sorted(counts.items()))

    def _verify(self, replacements: list[tuple[WeightSite, gs.Tensor]], values: dict[int, np.ndarray]) -> None:
        memo: dict[int, np.ndarray] = {}
        for site, out in replacements:
            want = values[id(site.tensor)]
            try:
                got = evaluate(out, memo)
            except NotDecodable as exc:
                got = None
                log.error("storage of %s cannot be evaluated: %s", site.name, exc)
            if got is None or got.shape != want.shape or got.dtype != want.dtype or \
                    not np.array_equal(got.view(np.uint8), want.view(np.uint8)):
                for nodes in self.new_nodes.values():
                    for n in nodes:
                        n.inputs.clear()
                        n.outputs.clear()
                raise RuntimeError(f"the storage written for {site.name} does not give back its values")

    def _replace(self, site: WeightSite, out: gs.Tensor, dead: list, released: list) -> None:
        """Make the weight's readers read ``out``, which takes the weight's name."""
        old = site.tensor
        replace_uses(old, out)
        name = old.name
        if isinstance(old, gs.Constant):
            released.append(old)
        else:
            old.name = self.names()
            dead.extend(decoder_cone(old) or list(old.inputs))
        out.name = name

    def _write_plain(self, site: WeightSite, value: np.ndarray, dead: list, released: list) -> None:
        old = site.tensor
        if isinstance(old, gs.Constant):
            old.values = value
            return
        producer = old.inputs[0] if old.inputs else None
        if producer is not None and producer.op == "Constant":
            producer.attrs = {"value": gs.Constant("", value)}
            producer.attr_types = {"value": onnx.AttributeProto.TENSOR}
            return
        if self.constant_nodes:
            out = gs.Variable(self.names())
            node = gs.Node("Constant", inputs=[], outputs=[out], attrs={"value": gs.Constant("", value)})
            site.graph.nodes = [node] + list(site.graph.nodes)
        else:
            out = gs.Constant(old.name, value)
        self._replace(site, out, dead, released)

    def _sweep(self, dead: list[gs.Node], released: list[gs.Tensor]) -> None:
        candidates = {id(n): n for n in dead}
        live_outputs = {id(t) for g in iter_graphs(self.model.graph) for t in g.outputs}
        removed: set[int] = set()
        changed = True
        while changed:
            changed = False
            for key, node in list(candidates.items()):
                if any(t.outputs or id(t) in live_outputs for t in node.outputs):
                    continue
                for x in node.inputs:
                    if isinstance(x, gs.Constant):
                        released.append(x)
                    elif x.inputs and x.inputs[0].op in DECODER_OPS:
                        candidates.setdefault(id(x.inputs[0]), x.inputs[0])
                node.inputs.clear()
                node.outputs.clear()
                removed.add(key)
                del candidates[key]
                changed = True
        if removed:
            for g in iter_graphs(self.model.graph):
                if any(id(n) in removed for n in g.nodes):
                    g.nodes = [n for n in g.nodes if id(n) not in removed]
        for t in released:
            release_constant(self.model, t)

    # -- building blocks -------------------------------------------------------------------

    def _const(self, g: gs.Graph, array: np.ndarray, share: bool = False) -> gs.Tensor:
        array = np.ascontiguousarray(array)
        key = (id(g), array.dtype.str, array.shape, array.tobytes()) if share else None
        if key is not None and key in self.pool:
            return self.pool[key]
        if self.constant_nodes:
            out = self._node(g, "Constant", [], value=gs.Constant("", array))
        else:
            out = gs.Constant(self.names(), array)
        if key is not None:
            self.pool[key] = out
        return out

    def _node(self, g: gs.Graph, op: str, inputs: list, n_out: int = 1, **attrs) -> gs.Tensor | list:
        outs = [gs.Variable(self.names()) for _ in range(n_out)]
        node = gs.Node(op, inputs=list(inputs), outputs=outs, attrs=attrs)
        self.new_nodes.setdefault(id(g), []).append(node)
        return outs[0] if n_out == 1 else outs

    def _words(self, g: gs.Graph, s: PackedStream, shape: list[int]) -> gs.Tensor:
        """A stream's values in their storage type, ``shape``d (a -1 in it takes the
        padding along: the caller slices or splits it off)."""
        if s.direct:
            return self._const(g, s.words.reshape(shape))
        dtype = s.words.dtype
        bits = dtype.itemsize * 8
        left = np.array([bits - s.width * (j + 1) for j in range(s.per_word)], dtype).reshape(-1, 1)
        x = self._node(g, "BitShift", [self._const(g, s.words), self._const(g, left, share=True)],
                       direction="LEFT")
        x = self._node(g, "BitShift", [x, self._const(g, np.array(bits - s.width, dtype), share=True)],
                       direction="RIGHT")
        return self._node(g, "Reshape", [x, self._const(g, np.array(shape, np.int64), share=True)])

    def _unpack(self, g: gs.Graph, s: PackedStream, wide: bool) -> gs.Tensor:
        """A stream's values, 1-D, as int32 (int64 when ``wide``: positions past 2**31)."""
        x = self._words(g, s, [-1])
        if s.length != s.count:
            x = self._node(g, "Slice", [x, self._const(g, np.zeros(1, np.int64), share=True),
                                        self._const(g, np.array([s.count], np.int64))])
        return self._node(g, "Cast", [x], to=onnx.TensorProto.INT64 if wide else onnx.TensorProto.INT32)

    def _split(self, g: gs.Graph, x: gs.Tensor, sizes: list[int], total: int) -> list[gs.Tensor]:
        """``x`` (1-D, ``total`` long) cut into parts of ``sizes``; a remainder (padding)
        becomes one more output that nothing reads."""
        sizes = [int(v) for v in sizes]
        if total > sum(sizes):
            sizes.append(total - sum(sizes))
        if len(sizes) == 1:
            return [x]
        if self.opset >= 13:
            parts = self._node(g, "Split", [x, self._const(g, np.array(sizes, np.int64))], n_out=len(sizes))
        else:
            parts = self._node(g, "Split", [x], n_out=len(sizes), split=sizes)
        return parts

    def _indices(self, g: gs.Graph, s: PackedStream, shape: list[int]) -> gs.Tensor:
        """A codebook-index stream as uint8 (the narrowest type the rest folds), with
        the padding still at the end when ``shape`` has a -1."""
        x = self._words(g, s, shape)
        if s.words.dtype != np.uint8:
            x = self._node(g, "Cast", [x], to=onnx.TensorProto.UINT8)
        return x

    def _lookups(self, g: gs.Graph, buffer: gs.Tensor, length: int,
                 layers: list[tuple[WeightSite, StoragePlan]]) -> list[gs.Tensor]:
        """Each layer's weight from the block's uint8 index ``buffer`` (``length`` long):
        split it by layer, shape each part like its weight, cast, and look the codebook up
        — the Gather output is the weight itself."""
        parts = self._split(g, buffer, [p.value.size for _, p in layers], length)
        outs = []
        for part, (_, p) in zip(parts, layers):
            part = self._node(g, "Reshape", [part, self._const(g, np.array(p.value.shape, np.int64), share=True)])
            idx = self._node(g, "Cast", [part], to=onnx.TensorProto.INT32)
            outs.append(self._node(g, "Gather", [self._const(g, p.codebook), idx]))
        return outs

    def _block(self, g: gs.Graph, kind: str, width: int,
               layers: list[tuple[WeightSite, StoragePlan]]) -> list[gs.Tensor]:
        """Emit one block holding ``layers``; returns each layer's output tensor."""
        sizes = [p.value.size for _, p in layers]
        starts = np.cumsum([0] + sizes)[:-1]
        total = int(sum(sizes))
        dtype = layers[0][1].value.dtype
        if kind == "dense-idx":
            local = np.concatenate([p.lookup for _, p in layers])
            if self.opset < MIN_OPSET_PACKED:
                stream = PackedStream(total, 8, local.astype(np.uint8), True)
            else:
                stream = pack(local, width)
            if len(layers) == 1 and stream.length == total:
                idx = self._node(g, "Cast", [self._words(g, stream, list(layers[0][1].value.shape))],
                                 to=onnx.TensorProto.INT32)
                return [self._node(g, "Gather", [self._const(g, layers[0][1].codebook), idx])]
            return self._lookups(g, self._indices(g, stream, [-1]), stream.length, layers)
        positions = np.concatenate([start + p.nonzero() for start, (_, p) in zip(starts, layers)])
        value_bits = width if kind == "sparse-idx" else dtype.itemsize * 8
        gap_width, _ = best_gap_width(positions, value_bits)
        pos, gaps = gap_entries(positions, gap_width)
        wide = total >= 2**31
        at = self._unpack(g, pack(gaps, gap_width), wide)
        at = self._node(g, "CumSum", [at, self._const(g, np.array(0, np.int64 if wide else np.int32), share=True)])
        size = self._const(g, np.array([total], np.int64), share=True)
        if kind == "sparse-idx":
            # Scatter the entries' codebook indices into a uint8 index buffer (zeros have
            # index 0), then look up as for dense-idx: every full-size intermediate but the
            # last two is one byte per weight.
            stream = pack(np.concatenate([p.lookup for _, p in layers])[pos], width)
            values = self._indices(g, stream, [-1])
            if stream.length != stream.count:
                values = self._node(g, "Slice", [values, self._const(g, np.zeros(1, np.int64), share=True),
                                                 self._const(g, np.array([stream.count], np.int64))])
            zeros = self._node(g, "ConstantOfShape", [size], value=gs.Constant("", np.zeros(1, np.uint8)))
            return self._lookups(g, self._node(g, "ScatterElements", [zeros, at, values]), total, layers)
        values = self._const(g, np.concatenate([p.value.ravel() for _, p in layers])[pos])
        attrs = {} if dtype == np.float32 else {"value": gs.Constant("", np.zeros(1, dtype))}
        flat = self._node(g, "ScatterElements", [self._node(g, "ConstantOfShape", [size], **attrs), at, values])
        return [self._node(g, "Reshape", [part, self._const(g, np.array(p.value.shape, np.int64), share=True)])
                for part, (_, p) in zip(self._split(g, flat, sizes, total), layers)]
