"""Calibration statistics of the quantize family: streaming observers, the four range
methods, quantization parameters, and robustness to inf/nan, mask sentinels and ragged
samples."""

from __future__ import annotations

import numpy as np
import pytest
from onnxopt.passes.quantize.calibrate import (
    METHODS,
    ChannelMeans,
    RangeObserver,
    activation_qparams,
    choose_range,
    weight_scales,
)


def test_streaming_minmax_matches_the_whole_data(rng):
    chunks = [rng.standard_normal(rng.integers(10, 500)) * rng.uniform(0.1, 5) for _ in range(40)]
    obs = RangeObserver()
    for c in chunks:
        obs.update(c.astype(np.float32))
    whole = np.concatenate(chunks).astype(np.float32)
    assert obs.min == pytest.approx(float(whole.min()))
    assert obs.max == pytest.approx(float(whole.max()))
    assert obs.count == whole.size
    assert obs.hist.sum() == whole.size  # re-binning keeps every count
    assert obs.hist.shape == (2048,)  # fixed size whatever the number of samples


def test_histogram_grows_and_keeps_its_mass(rng):
    obs = RangeObserver()
    obs.update(np.linspace(-1, 1, 1000, dtype=np.float32))
    obs.update(np.array([50.0, -80.0], np.float32))
    assert obs.lo <= -80 and obs.hi >= 50
    assert obs.hist.sum() == 1002


def test_percentile_clips_outliers_that_minmax_keeps(rng):
    x = rng.standard_normal(100_000).astype(np.float32)
    x[:5] = 1000.0
    obs = RangeObserver()
    obs.update(x)
    lo_mm, hi_mm = choose_range(obs, "minmax")
    lo_p, hi_p = choose_range(obs, "percentile", percentile=99.9)
    assert hi_mm == pytest.approx(1000.0)
    assert 2.0 < hi_p < 10.0 and -10.0 < lo_p < -2.0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_a_range_inside_minmax_that_holds_zero(method, rng):
    x = np.concatenate([rng.standard_normal(20_000), rng.standard_normal(50) * 30]).astype(np.float32)
    obs = RangeObserver()
    obs.update(x)
    lo, hi = choose_range(obs, method)
    assert lo <= 0 <= hi
    assert obs.min - 1e-6 <= lo and hi <= obs.max + 1e-6
    assert hi - lo > 1.0


@pytest.mark.parametrize("method", METHODS)
def test_non_negative_tensors_keep_zero_as_lower_bound(method, rng):
    obs = RangeObserver()
    obs.update(np.maximum(rng.standard_normal(10_000), 0).astype(np.float32))
    lo, hi = choose_range(obs, method)
    assert lo == 0.0 and hi > 0.5


@pytest.mark.parametrize("method", METHODS)
def test_inf_nan_and_mask_sentinels_are_left_out_and_counted(method, rng):
    """A padded transformer writes -inf or finfo.min where attention is masked: such
    values are not data, and must not crash or stretch the range."""
    x = rng.standard_normal(1000).astype(np.float32)
    x[:10] = -np.inf
    x[10:20] = np.nan
    x[20:30] = np.finfo(np.float32).min
    obs = RangeObserver()
    obs.update(x)
    assert obs.nonfinite == 20 and obs.sentinel == 10
    lo, hi = choose_range(obs, method)
    assert np.isfinite(lo) and np.isfinite(hi) and -10 < lo < 0 < hi < 10


@pytest.mark.parametrize("method", METHODS)
def test_ragged_samples_of_different_shapes(method, rng):
    obs = RangeObserver()
    for length in (3, 17, 64, 5):
        obs.update(rng.standard_normal((1, length, 8)).astype(np.float32))
    lo, hi = choose_range(obs, method)
    assert lo < 0 < hi


def test_an_empty_observer_and_a_constant_tensor():
    obs = RangeObserver()
    obs.update(np.full(4, np.inf, np.float32))
    assert obs.empty and choose_range(obs, "percentile") == (0.0, 0.0)
    p = activation_qparams(0.0, 0.0, np.uint8)
    assert p.scale == 1.0 and p.notes  # representable, and flagged


def test_u8_asymmetric_and_s8_symmetric_parameters():
    p = activation_qparams(-1.0, 3.0, np.uint8)
    assert p.scale == pytest.approx(4 / 255) and p.zero_point == 64
    relu = activation_qparams(0.0, 6.0, np.uint8)
    assert relu.zero_point == 0  # Relu outputs: exact zero point, so onnxruntime drops the Relu
    s = activation_qparams(-1.0, 3.0, np.int8)
    assert s.zero_point == 0 and s.scale == pytest.approx(3 / 127)


def test_weight_scales_per_channel_and_per_tensor(rng):
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w[2] = 0.0
    per_channel = weight_scales(w, 0)
    assert per_channel.shape == (4,) and per_channel[2] == 1.0  # all-zero channel
    assert per_channel[0] == pytest.approx(np.abs(w[0]).max() / 127)
    assert weight_scales(w, None).shape == ()
    assert weight_scales(w, 0, reduce_range=True)[0] == pytest.approx(np.abs(w[0]).max() / 63)


def test_channel_means_stream_over_ragged_samples(rng):
    m = ChannelMeans(axis=-1)
    a = rng.standard_normal((1, 5, 4))
    b = rng.standard_normal((1, 9, 4))
    m.update(a)
    m.update(b)
    expected = np.concatenate([a.reshape(-1, 4), b.reshape(-1, 4)]).mean(0)
    np.testing.assert_allclose(m.mean(), expected)
