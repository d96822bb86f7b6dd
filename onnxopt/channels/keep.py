"""The rewrite that keeps a subset of each group's channels.

Every member of a group changes with it: weights are sliced on their output or input
axis, BatchNorm and per-channel constants lose entries, a depthwise convolution's
``group`` attribute, Split sizes, Slice bounds and Reshape/Resize/Expand shape entries
follow the new width. Everything is decided before the graph is touched, so a request
that cannot be honoured changes nothing. Declared shapes are updated, and the model's
channel map records which original channels each layer kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import NameAllocator, const_through_shape_ops, write_constant
from ..model import Model
from ..rewrite import prune_unused
from .channel_map import LAYER_OPS, channel_maps, set_channel_maps
from .dependencies import ChannelGroups
from .flow import label
from .layout import Layout, Member, kept_positions

__all__ = ["KeepStats", "keep_channels"]


@dataclass
class KeepStats:
    """What :func:`keep_channels` changed."""

    channels_removed: int = 0
    groups_pruned: int = 0
    params_before: int = 0
    params_after: int = 0
    tensors_rewritten: int = 0


def keep_channels(model: Model, groups: ChannelGroups, keep: Mapping[int, Iterable[int]], *,
                  overrides: Mapping[tuple[int, int], np.ndarray] | None = None) -> KeepStats:
    """Keep only channels ``keep[group_id]`` (indices into the group) of each listed
    group; rewrite every member. ``overrides`` gives new full-size values for constant
    inputs ``(id(node), input_index)`` before slicing (neuron merging adds outgoing
    weights so). Everything is computed before the graph is touched; a group that is not
    prunable raises ``ValueError`` without changing anything."""
    overrides = dict(overrides or {})
    kept = _checked(groups, keep)
    stats = KeepStats()
    if not kept and not overrides:
        return stats
    plan = _Plan(groups, kept)
    for m in groups.members:
        if any(plan.touched(lay) for lay in [m.layout, *m.info.get("outputs", [])]):
            plan.add(m)
    plan.cut_weights(overrides, stats)
    plan.apply(model, stats)
    _update_declared_shapes(groups, kept)
    _record_channel_maps(model, groups, kept)
    stats.groups_pruned = len(kept)
    stats.channels_removed = sum(groups.by_id[g].size - len(k) for g, k in kept.items())
    return stats


def _checked(groups: ChannelGroups, keep: Mapping[int, Iterable[int]]) -> dict[int, np.ndarray]:
    """The channels each group keeps, for the groups that lose some."""
    kept: dict[int, np.ndarray] = {}
    for gid, idx in keep.items():
        g = groups.by_id.get(gid)
        if g is None or not g.prunable:
            raise ValueError(f"group {gid} is not prunable")
        arr = np.unique(np.asarray(list(idx), dtype=np.int64))
        if arr.size == 0 or arr[0] < 0 or arr[-1] >= g.size:
            raise ValueError(f"group {gid}: keep indices out of range (size {g.size})")
        if arr.size < g.size:
            kept[gid] = arr
    return kept


class _Plan:
    """Every change of the rewrite, decided before the graph is touched: new values of
    constant inputs (by ``(id(node), index)``), attributes, constant Reshape targets."""

    def __init__(self, groups: ChannelGroups, kept: dict[int, np.ndarray]):
        self.groups = groups
        self.kept = kept
        self.nodes: dict[int, gs.Node] = {}
        self.slices: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
        self.inputs: dict[tuple[int, int], np.ndarray] = {}
        self.attrs: list[tuple[gs.Node, str, object]] = []
        self.reshape_targets: list[tuple[gs.Node, np.ndarray]] = []

    def positions(self, lay: Layout) -> np.ndarray:
        return kept_positions(lay, self.kept, self.groups.root)

    def count(self, lay: Layout) -> int:
        return int(self.positions(lay).size)

    def touched(self, lay: Layout) -> bool:
        return _touched(self.groups, self.kept, lay)

    def _value(self, node: gs.Node, index: int) -> np.ndarray:
        """Input ``index`` of ``node`` as decided so far (a copy of the current value at first)."""
        value = self.inputs.get((id(node), index))
        if value is None:
            value = np.array(const_through_shape_ops(node.inputs[index]), copy=True)
        return value

    def _set_entry(self, node: gs.Node, index: int, pos: int, entry: int) -> None:
        value = self._value(node, index)
        flat = value.reshape(-1)
        flat[pos] = entry
        self.inputs[(id(node), index)] = flat.reshape(value.shape)

    # ---- decide --------------------------------------------------------------------

    def add(self, m: Member) -> None:
        """Decide what member ``m`` of a touched group becomes."""
        self.nodes[id(m.node)] = m.node
        if m.kind == "slice":
            self.slices.setdefault((id(m.node), m.index), []).append((m.axis, self.positions(m.layout)))
        elif m.kind == "group":
            self.attrs.append((m.node, "group", self.count(m.layout)))
        elif m.kind == "shape":
            self._set_entry(m.node, m.index, m.info["pos"], self.count(m.layout) * m.info["factor"])
        elif m.kind == "reshape":
            self.reshape_targets.append((m.node, np.asarray(m.info["shape"], dtype=np.int64)))
        elif m.kind == "split":
            self._split(m)
        elif m.kind == "slice_bounds":
            pos = self.positions(m.layout)
            new_start = int(np.sum(pos < m.info["start"]))
            new_stop = int(np.sum(pos < m.info["stop"]))
            if new_stop <= new_start:
                raise ValueError(f"{label(m.node)}: a slice would lose every channel")
            self._set_entry(m.node, 1, m.info["k"], new_start)
            self._set_entry(m.node, 2, m.info["k"], new_stop)

    def _split(self, m: Member) -> None:
        sizes = [self.count(lay) for lay in m.info["outputs"]]
        if any(s == 0 for s in sizes):
            raise ValueError(f"{label(m.node)}: a split output would lose every channel")
        if m.info["from_input"]:
            self.inputs[(id(m.node), m.index)] = np.asarray(sizes, dtype=np.int64)
        elif "split" in m.node.attrs:
            self.attrs.append((m.node, "split", sizes))
        else:
            self.attrs.append((m.node, "__split__", sizes))

    def cut_weights(self, overrides: Mapping[tuple[int, int], np.ndarray], stats: KeepStats) -> None:
        """Slice every constant that loses channels (from its override, if given)."""
        for key in overrides:
            self.slices.setdefault(key, [])
        for key, cuts in self.slices.items():
            node = self.nodes.get(key[0])
            if node is None:
                node = next(m.node for m in self.groups.members if id(m.node) == key[0])
                self.nodes[key[0]] = node
            base = overrides.get(key)
            value = np.asarray(base if base is not None else const_through_shape_ops(node.inputs[key[1]]))
            before = value.size
            for axis, pos in cuts:
                value = np.take(value, pos, axis=axis)
            if any(d == 0 for d in value.shape):
                raise ValueError(f"{label(node)}: a weight would lose every channel")
            stats.params_before += before
            stats.params_after += value.size
            self.inputs[key] = value

    # ---- mutate --------------------------------------------------------------------

    def apply(self, model: Model, stats: KeepStats) -> None:
        """Write what was decided, then remove what nothing reads any more."""
        names = NameAllocator(model)
        replaced: list[gs.Tensor] = []
        for (nid, index), value in self.inputs.items():
            write_constant(model, self.nodes[nid], index, value, names=names, replaced=replaced)
            stats.tensors_rewritten += 1
        for node, target in self.reshape_targets:
            old = node.inputs[1]
            node.inputs[1] = gs.Constant(names(old.name + "_pruned"), target)
            replaced.append(old)
        for node, attr, value in self.attrs:
            if attr == "__split__":
                _set_split_sizes(model, node, value, names)
            else:
                node.attrs[attr] = value
        prune_unused(model, replaced)


def _set_split_sizes(model: Model, node: gs.Node, sizes: list[int], names: NameAllocator) -> None:
    """Give a Split that split evenly explicit sizes (an input from opset 13 on)."""
    node.attrs.pop("num_outputs", None)
    if model.opset_imports.get("", 13) >= 13:
        t = gs.Constant(names(node.outputs[0].name + "_split"), np.asarray(sizes, dtype=np.int64))
        while len(node.inputs) < 2:
            node.inputs.append(gs.Variable(""))
        node.inputs[1] = t
    else:
        node.attrs["split"] = sizes


def _update_declared_shapes(groups: ChannelGroups, kept: dict[int, np.ndarray]) -> None:
    """Declared shapes of the tensors that carry pruned channels."""
    for t, lay in groups.tensors:
        if not _touched(groups, kept, lay) or not isinstance(t, gs.Variable) or t.shape is None:
            continue
        shape = list(t.shape)
        if len(shape) == lay.rank and isinstance(shape[lay.axis], (int, np.integer)):
            shape[lay.axis] = int(kept_positions(lay, kept, groups.root).size)
            t.shape = shape


def _record_channel_maps(model: Model, groups: ChannelGroups, kept: dict[int, np.ndarray]) -> None:
    """Which original channels survive, per layer output (composed with an earlier map)."""
    maps = channel_maps(model)
    for t, lay in groups.tensors:
        if not _touched(groups, kept, lay) or not t.inputs:
            continue
        producer = t.inputs[0]
        if producer.op not in LAYER_OPS and not (producer.op in ("Add", "BatchNormalization") and any(
                i.inputs and i.inputs[0].op in LAYER_OPS for i in producer.inputs)):
            continue
        pos = kept_positions(lay, kept, groups.root)
        previous = maps.get(t.name)
        maps[t.name] = [int(previous[p]) for p in pos] if previous is not None else [int(p) for p in pos]
    set_channel_maps(model, maps)


def _touched(groups: ChannelGroups, kept: dict[int, np.ndarray], lay: Layout) -> bool:
    return any(groups.root(s) in kept for s in lay.spaces())
