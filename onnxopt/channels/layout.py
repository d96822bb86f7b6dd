"""Where the channels of a tensor are, and what removing some of them rewrites.

A *space* is the set of channels one layer creates with its own weights. A
:class:`Layout` says where a tensor carries channels: along which axis, as a list of
:class:`Seg` ranges of spaces (a Concat makes several segments, a Split or Slice partial
ones, channels nobody may remove are a ``FIXED`` segment). A :class:`Member` is one
constant, attribute or shape entry that must change with a removal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

__all__ = ["FIXED", "Seg", "Layout", "Member", "kept_positions", "sub_layout", "merge_fixed"]

#: Space id of a segment of channels that may not be removed.
FIXED = -1


@dataclass(frozen=True)
class Seg:
    """Channels ``start..stop`` of space ``space`` (``FIXED``: channels kept as they are)."""

    space: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Layout:
    """Where the channels of a tensor are: along ``axis`` (of a tensor of rank ``rank``),
    in the order of ``segs``; each channel spans ``inner`` consecutive positions (a
    channel x spatial block after a Flatten)."""

    axis: int
    rank: int
    segs: tuple[Seg, ...]
    inner: int = 1

    @property
    def channels(self) -> int:
        return sum(s.size for s in self.segs)

    @property
    def width(self) -> int:
        return self.channels * self.inner

    def spaces(self) -> set[int]:
        return {s.space for s in self.segs if s.space != FIXED}

    def moved(self, axis: int, rank: int) -> Layout:
        return Layout(axis, rank, self.segs, self.inner)


@dataclass
class Member:
    """One thing to rewrite when channels of a group go.

    ``kind``: ``"slice"`` (constant input ``index`` of ``node`` is sliced along ``axis``),
    ``"group"`` (a depthwise convolution's ``group`` attribute), ``"shape"`` (entry
    ``info['pos']`` of constant input ``index`` is the channel width times
    ``info['factor']``), ``"reshape"`` (a computed Reshape target replaced by the constant
    ``info['shape']``), ``"split"``, ``"slice_bounds"``. ``role`` says what the sliced
    tensor is: ``out`` (a layer's weight, output axis), ``in`` (a layer's weight, input
    axis), ``tied`` (a depthwise kernel), ``bias``, ``bn_scale``/``bn_bias``/``bn_mean``/
    ``bn_var``, ``param`` (another per-channel constant).
    """

    kind: str
    node: gs.Node
    index: int
    axis: int
    layout: Layout
    role: str = ""
    info: dict = field(default_factory=dict)

    def spaces(self) -> set[int]:
        found = set(self.layout.spaces())
        for lay in self.info.get("outputs", []):
            found |= lay.spaces()
        return found


def kept_positions(lay: Layout, keep: Mapping[int, np.ndarray], root: Callable[[int], int]) -> np.ndarray:
    """Indices (along the tensor's channel axis, inner blocks expanded) of the channels
    that stay when group ``g`` keeps channels ``keep[g]``; ``root`` maps a space to its
    group."""
    parts = []
    off = 0
    for s in lay.segs:
        r = root(s.space) if s.space != FIXED else FIXED
        if r in keep:
            k = keep[r]
            sel = k[(k >= s.start) & (k < s.stop)] - s.start + off
        else:
            sel = np.arange(off, off + s.size)
        parts.append(sel)
        off += s.size
    pos = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if lay.inner > 1:
        pos = (pos[:, None] * lay.inner + np.arange(lay.inner)[None, :]).ravel()
    return pos.astype(np.int64)


def sub_layout(lay: Layout, start: int, stop: int) -> Layout:
    """Channels at positions ``start..stop`` of ``lay`` (inner must be 1)."""
    segs = []
    off = 0
    for s in lay.segs:
        lo, hi = max(start, off), min(stop, off + s.size)
        if lo < hi:
            if s.space == FIXED:
                segs.append(Seg(FIXED, 0, hi - lo))
            else:
                segs.append(Seg(s.space, s.start + lo - off, s.start + hi - off))
        off += s.size
    return Layout(lay.axis, lay.rank, tuple(segs), lay.inner)


def merge_fixed(segs: list[Seg]) -> list[Seg]:
    """``segs`` with neighbouring ``FIXED`` segments joined into one."""
    out: list[Seg] = []
    for s in segs:
        if out and s.space == FIXED and out[-1].space == FIXED:
            out[-1] = Seg(FIXED, 0, out[-1].size + s.size)
        else:
            out.append(s)
    return out
