"""onnxopt.weights.storage_plan: the cheapest form of a layer, bit packing and gap coding."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.weights.storage_plan import best_gap_width, gap_entries, pack, plan_storage


def _unpack_numpy(stream) -> np.ndarray:
    """The stream's values decoded the way the emitted ops do (slot-major words)."""
    if stream.direct:
        return stream.words.ravel()[: stream.count].astype(np.int64)
    bits = stream.words.dtype.itemsize * 8
    left = np.array([bits - stream.width * (j + 1) for j in range(stream.per_word)], stream.words.dtype)
    rows = (stream.words.reshape(1, -1) << left.reshape(-1, 1)) >> stream.words.dtype.type(bits - stream.width)
    return rows.ravel()[: stream.count].astype(np.int64)


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 20])
@pytest.mark.parametrize("count", [1, 7, 64, 1001])
def test_packed_streams_round_trip(width, count, rng):
    vals = rng.integers(0, 2**width, count)
    stream = pack(vals, width)
    assert np.array_equal(_unpack_numpy(stream), vals)
    assert stream.words.dtype in (np.uint8, np.uint16, np.uint32)  # never 8-byte words
    if width in (1, 2, 4) and count >= 64:  # whole values per byte: no waste but the last byte
        assert stream.words.nbytes <= -(-count * width // 8) + 1


def test_gap_coding_inserts_fillers_for_long_gaps():
    positions = np.array([3, 4, 40, 41])
    pos, gaps = gap_entries(positions, 3)  # gaps of at most 7
    assert pos[0] == 0 and np.array_equal(np.cumsum(gaps), pos)
    assert set(positions) <= set(pos.tolist()) and gaps.max() <= 7
    assert len(pos) == 4 + 1 + 5  # the entry at 0, and 36 = 5*7 + 1 needs five fillers
    width, bits = best_gap_width(positions, 5)
    assert bits == min(len(gap_entries(positions, w)[0]) * (w + 5) for w in range(1, 7))
    assert width >= 1


def test_plan_picks_the_smallest_form_and_gives_the_value_back(rng):
    dense = rng.standard_normal((64, 64)).astype(np.float32)
    sparse = np.where(rng.random((64, 64)) < 0.9, 0, dense).astype(np.float32)
    codes = rng.choice(np.linspace(-1, 1, 16).astype(np.float32), (64, 64))
    sparse_codes = np.where(rng.random((64, 64)) < 0.8, 0, codes).astype(np.float32)
    expected = {"dense": dense, "sparse": sparse, "dense-idx": codes, "sparse-idx": sparse_codes}
    for kind, value in expected.items():
        plan = plan_storage(value, opset=17)
        assert plan.kind == kind, (kind, plan.kind)
        assert plan.cost <= value.nbytes
        if plan.codebook is not None:
            assert np.array_equal(plan.codebook[plan.lookup].reshape(value.shape), value)
            assert plan.width == (4 if kind == "dense-idx" else 5)  # 16 values, +1 for the zero
            if kind == "sparse-idx":
                assert plan.codebook[0] == 0 and not np.signbit(plan.codebook[0])


def test_plan_below_opset_11_uses_one_byte_indices_or_dense(rng):
    codes = rng.choice(np.linspace(-1, 1, 16).astype(np.float32), (64, 64))
    sparse = np.where(rng.random((64, 64)) < 0.9, 0, rng.standard_normal((64, 64))).astype(np.float32)
    assert plan_storage(codes, opset=10).kind == "dense-idx"
    assert plan_storage(sparse, opset=10).kind == "dense"
    assert plan_storage(codes, opset=5).kind == "dense"
