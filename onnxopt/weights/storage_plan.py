"""Planning a layer's compact storage and packing its streams: pure numpy, nothing in
the graph changes.

Storage forms, chosen per layer (whichever is smallest):

``dense``
    a plain tensor (initializer, or Constant node): what exporters write.
``sparse``
    the non-zero values as floats and their positions as gaps in few bits.
``dense-idx``
    one codebook index per weight, in few bits, and a small float codebook.
``sparse-idx``
    the positions of the non-zeros as gaps, and one codebook index per non-zero.
    Codebook entry 0 is exactly 0.0 whenever the layer has zeros, so zeros stay exact and
    outside the clusters (and the gap fillers have a value).

Streams of ``w``-bit values are packed into words of 8 or 32 bits, slot-major, so that
the writer can unpack all slots with two broadcast ``BitShift`` ops; a stream of exactly
8/16/32-bit values is stored as uint8/16/32 and only cast. Positions are gaps between
consecutive stored entries (the paper's relative index); a gap that does not fit the
chosen width gets filler entries of value 0, and the first entry is at position 0, so
the positions are the ``CumSum`` of the gaps. The gap width is chosen to minimise the
bits. Below opset 11 (no ``BitShift``/``CumSum``/``ScatterElements``) a layer is stored
as ``dense-idx`` with one uint8 index per weight, or dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..model import Model
from .decode import FLOAT_DTYPES

__all__ = [
    "MIN_OPSET_PACKED",
    "PackedStream",
    "StoragePlan",
    "best_gap_width",
    "gap_entries",
    "model_opset",
    "pack",
    "plan_storage",
]

MIN_OPSET_PACKED = 11  # BitShift, CumSum, ScatterElements
_MIN_OPSET = 6  # Cast with a `to` attribute, Gather, Reshape with a shape input
_LAYER_BYTES = 40  # a layer's own structure in a block: its Reshape, shape and names
#: Word sizes for packed streams: BitShift takes uint8/32/64, and 64-bit words would make
#: onnxruntime fold 8-byte intermediates for few bytes saved.
_WORD_BITS = (8, 32)


@dataclass
class StoragePlan:
    """How one layer is stored: its form and exact value; for the indexed forms the
    codebook and each element's codebook index; ``cost``, the estimated bytes the layer
    adds to its block."""

    kind: str
    value: np.ndarray
    codebook: np.ndarray | None = None
    lookup: np.ndarray | None = None
    cost: int = 0

    @property
    def width(self) -> int:
        """Bits of a codebook index (0 for the float forms)."""
        if self.codebook is None:
            return 0
        return max(1, math.ceil(math.log2(self.codebook.size))) if self.codebook.size > 1 else 1

    def nonzero(self) -> np.ndarray:
        """Flat positions of the elements that are not +0.0 (bit pattern), i.e. stored."""
        flat = np.ascontiguousarray(self.value).ravel()
        return np.flatnonzero(flat.view(np.dtype(f"u{flat.dtype.itemsize}")))


def _packed_bytes(count: int, width: int) -> int:
    """Bytes of ``count`` values of ``width`` bits in the best container (see pack)."""
    best = None
    for bits in (8, 16, 32):
        if width <= bits:
            best = count * bits // 8
            break
    for bits in _WORD_BITS:
        if width < bits:
            size = -(-count // (bits // width)) * bits // 8
            best = size if best is None else min(best, size)
    return int(best)


def best_gap_width(positions: np.ndarray, value_bits: int) -> tuple[int, int]:
    """(gap width, total bits) minimising the stored bits of the entries at sorted
    ``positions`` (plus position 0 and the fillers)."""
    if positions.size == 0:
        return 1, value_bits
    pos = positions if positions[0] == 0 else np.concatenate([[0], positions])
    gaps = np.diff(pos, prepend=0)
    best = (1, None)
    for w in range(1, min(max(int(gaps.max()).bit_length(), 1), 40) + 1):
        limit = (1 << w) - 1
        entries = pos.size + int(np.maximum(-(-gaps // limit) - 1, 0).sum())
        bits = entries * (w + value_bits)
        if best[1] is None or bits < best[1]:
            best = (w, bits)
    return best[0], int(best[1])


def gap_entries(positions: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Entry positions (``positions`` plus position 0 and fillers) and their gaps."""
    limit = (1 << width) - 1
    pos = positions.astype(np.int64)
    if pos.size == 0 or pos[0] != 0:
        pos = np.concatenate([[0], pos]).astype(np.int64)
    gaps = np.diff(pos, prepend=0)
    fillers = np.maximum(-(-gaps // limit) - 1, 0)
    if not fillers.any():
        return pos, gaps
    reps = fillers + 1
    entry_gap = np.repeat(np.full(pos.size, limit, np.int64), reps)
    entry_gap[np.cumsum(reps) - 1] = gaps - fillers * limit
    return np.cumsum(entry_gap), entry_gap


def plan_storage(value: np.ndarray, *, opset: int, max_codebook: int = 256) -> StoragePlan:
    """The cheapest storage of ``value`` among the forms the opset allows.

    Indexed forms are considered when the tensor takes at most ``max_codebook`` distinct
    values (after weight sharing, or any weight that happens to), sparse forms when it
    has zeros. Values are compared bit for bit (``-0.0`` is a value, not a zero), so the
    storage gives back exactly ``value``.
    """
    value = np.ascontiguousarray(value)
    flat = value.ravel()
    dense = StoragePlan("dense", value, cost=int(value.nbytes))
    if opset < _MIN_OPSET or flat.size == 0 or value.dtype not in FLOAT_DTYPES:
        return dense
    packed = opset >= MIN_OPSET_PACKED
    pattern = flat.view(np.dtype(f"u{value.dtype.itemsize}"))
    zero = pattern == 0
    has_zeros = bool(zero.any())
    nonzero = np.flatnonzero(~zero)
    plans = [dense]
    uniq = np.unique(pattern[~zero])
    offset = 1 if has_zeros else 0
    if 0 < uniq.size + offset <= max_codebook:
        values = uniq.view(value.dtype)
        perm = np.argsort(values, kind="stable")  # a codebook in value order reads better
        rank = np.empty_like(perm)
        rank[perm] = np.arange(perm.size)
        codebook = np.concatenate([np.zeros(offset, value.dtype), values[perm]]).astype(value.dtype)
        lookup = np.zeros(flat.size, np.int64)
        lookup[nonzero] = rank[np.searchsorted(uniq, pattern[nonzero])] + offset
        idx = StoragePlan("dense-idx", value, codebook, lookup)
        if packed:
            idx.cost = _packed_bytes(flat.size, idx.width) + codebook.nbytes + _LAYER_BYTES
            plans.append(idx)
            if has_zeros:
                _, bits = best_gap_width(nonzero, idx.width)
                plans.append(StoragePlan("sparse-idx", value, codebook, lookup,
                                  cost=-(-bits // 8) + codebook.nbytes + _LAYER_BYTES))
        elif idx.width <= 8:  # one uint8 index per weight, its own Cast-Gather-Reshape
            idx.cost = flat.size + codebook.nbytes + 3 * _LAYER_BYTES
            plans.append(idx)
    if packed and has_zeros:
        _, bits = best_gap_width(nonzero, value.dtype.itemsize * 8)
        plans.append(StoragePlan("sparse", value, cost=-(-bits // 8) + _LAYER_BYTES))
    return min(plans, key=lambda p: p.cost)  # the first of equals: dense wins ties


@dataclass
class PackedStream:
    """``count`` unsigned values of ``width`` bits stored in ``words``.

    ``direct`` streams are the values themselves (uint8/16/32). Packed streams hold
    ``per_word`` values per word, slot-major: value ``k`` is in word ``k % n_words``, slot
    ``k // n_words`` (bits ``[width*slot, width*(slot+1))``), so that unpacking the words
    row ``[1, n_words]`` against the shift column ``[per_word, 1]`` gives the values in
    order, each row a long contiguous run (fast to broadcast).
    """

    count: int
    width: int
    words: np.ndarray
    direct: bool

    @property
    def per_word(self) -> int:
        return 1 if self.direct else self.words.dtype.itemsize * 8 // self.width

    @property
    def length(self) -> int:
        """Values the unpacking gives (padding included)."""
        return self.count if self.direct else self.words.size * self.per_word

    def cost(self) -> int:
        shifts = 0 if self.direct else (self.per_word + 1) * self.words.dtype.itemsize
        return int(self.words.nbytes) + shifts


def pack(values: np.ndarray, width: int) -> PackedStream:
    """The smallest stream holding ``values`` (non-negative, below ``2**width``): the
    values themselves in the narrowest unsigned type, or packed into 8- or 32-bit words."""
    values = np.asarray(values, dtype=np.uint64).ravel()
    n = values.size
    candidates = []
    for dtype in (np.uint8, np.uint16, np.uint32):
        if width <= np.dtype(dtype).itemsize * 8:
            candidates.append(PackedStream(n, width, values.astype(dtype), True))
            break
    for bits in _WORD_BITS:
        if width >= bits:
            continue
        per = bits // width
        words = max(-(-n // per), 1)
        padded = np.zeros(words * per, np.uint64)
        padded[:n] = values
        slots = padded.reshape(per, words)
        packed = np.zeros(words, np.uint64)
        for j in range(per):
            packed |= slots[j] << np.uint64(width * j)
        dtype = np.dtype(f"u{bits // 8}")
        candidates.append(PackedStream(n, width, packed.astype(dtype).reshape(1, words), False))
    return min(candidates, key=lambda s: s.cost())


def model_opset(model: Model) -> int:
    """The model's version of the standard ONNX domain (it decides which forms are
    available)."""
    return int(model.opset_imports.get("", model.graph.opset or 1))
