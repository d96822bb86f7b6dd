"""Calibration statistics per shard, merged: min/max exactly, histogram-based ranges within
the stated tolerance, the same quantized model as one pass over the data (minmax)."""

from __future__ import annotations

import numpy as np
import pytest
from onnxopt.passes.quantize.calibrate import RangeObserver, choose_range

from onnxopt import Model, PassManager
from onnxopt.framework import PassContext
from tests.search_helpers import feeds, small_mlp

#: Largest difference of a chosen range end, as a share of the observed range's width.
TOLERANCE = {"minmax": 0.0, "mse": 0.002, "percentile": 0.002, "entropy": 0.25}


def in_turn(fn, items):
    return [fn(item) for item in items]


def _data():
    rng = np.random.default_rng(0)
    data = [rng.standard_normal(4000) * s + m for s, m in zip(rng.uniform(0.5, 3, 32), rng.uniform(-1, 2, 32))]
    return data + [np.abs(rng.standard_normal(3000)) * 4 for _ in range(8)]


@pytest.mark.parametrize("shards", [2, 5])
def test_merged_shards_give_the_single_pass_statistics(shards):
    data = _data()
    one = RangeObserver()
    for d in data:
        one.update(d)
    merged = None
    for part in np.array_split(np.arange(len(data)), shards):
        obs = RangeObserver()
        for i in part:
            obs.update(data[i])
        if merged is None:
            merged = obs
        else:
            merged.merge(obs)
    assert (merged.min, merged.max, merged.count) == (one.min, one.max, one.count)
    assert merged.hist.sum() == one.hist.sum()
    width = one.max - one.min
    for method, tol in TOLERANCE.items():
        a, b = choose_range(one, method), choose_range(merged, method)
        assert max(abs(a[0] - b[0]), abs(a[1] - b[1])) <= tol * width, method


def _quantized(pipeline: str, **ctx) -> bytes:
    model = Model.from_proto(small_mlp())
    PassManager(pipeline).run(model, PassContext(reference=model.copy(), calibration=feeds(16), **ctx))
    return model.to_bytes()


def test_quantize_calibrates_per_shard_as_in_one_pass():
    minmax = "quantize(mode=static,method=minmax)"
    assert _quantized(minmax, map_shards=in_turn, shards=4) == _quantized(minmax)
    percentile = "quantize(mode=static,method=percentile)"
    from onnxopt.autocompress.tasks import cosines, run_outputs

    test = feeds(4, seed=9)
    a = run_outputs(_quantized(percentile, map_shards=in_turn, shards=4), test)
    b = run_outputs(_quantized(percentile), test)
    assert min(cosines(b, a).values()) > 0.999
