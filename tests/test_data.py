"""Feeds and calibration data: generation, loading, checking, streaming."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from models import builders
from onnxopt import Model
from onnxopt.data import (
    DEFAULT_DIM,
    check_feeds,
    load_feeds,
    open_calibration,
    parse_shape,
    random_feeds,
    resolve_shapes,
)
from onnxopt.errors import CalibrationError, FeedError, UsageError
from onnxopt.validate import validate
from tests.helpers import parse


@pytest.fixture
def cnn() -> Model:
    return Model.from_proto(builders.cnn())


def test_dynamic_dims_get_documented_defaults_and_notes(cnn):
    shapes, notes = resolve_shapes(cnn)
    assert shapes == {"input": (1, 3, 32, 32)}
    assert notes == ["input[0] (N) defaulted to 1"]


def test_shape_override_fixes_dims(cnn):
    shapes, notes = resolve_shapes(cnn, {"input": (4, 3, 32, 32)})
    assert shapes == {"input": (4, 3, 32, 32)} and notes == []


@pytest.mark.parametrize("shape,match", [
    ({"nope": (1,)}, "names input 'nope'"),
    ({"input": (1, 3, 32)}, "rank 3 given"),
    ({"input": (1, 3, 64, 64)}, "contradicts the model's fixed dimension 32"),
])
def test_bad_shape_overrides(cnn, shape, match):
    with pytest.raises(UsageError, match=match):
        resolve_shapes(cnn, shape)


def test_parse_shape():
    assert parse_shape("images=1x3x640x640") == ("images", (1, 3, 640, 640))
    assert parse_shape("x = 2,8") == ("x", (2, 8))
    with pytest.raises(UsageError):
        parse_shape("images:1x3")
    with pytest.raises(UsageError):
        parse_shape("images=1xAx3")


def test_generated_feeds_are_deterministic_and_typed():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (int64[B, T] ids, bool[B] mask, float16[B, T, 4] h) => (float[B, T, 8] y)
        <float[100, 8] table = {0.0}>
        { e = Gather(table, ids)  y = Identity(e) }
    """.replace("{0.0}", "{" + ",".join(["0.0"] * 800) + "}"))
    a, notes = random_feeds(model, seed=3)
    b, _ = random_feeds(model, seed=3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["ids"].dtype == np.int64 and a["ids"].min() >= 0 and a["ids"].max() < 100
    assert a["mask"].dtype == np.bool_ and a["h"].dtype == np.float16
    assert a["ids"].shape == (1, DEFAULT_DIM)
    assert len(notes) == 2  # B and T once each; other uses follow the same symbol


ALL_DTYPES = sorted(onnx.helper.get_all_tensor_dtypes())


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_generated_feeds_are_arrays_of_every_dtype_and_rank(rank):
    """A rank-0 input (an If condition fed from outside) is a 0-d array, never a numpy
    scalar: onnxruntime refuses scalars ("Unable to handle object of type numpy.bool")."""
    shape = [2] * rank
    inputs = [helper.make_tensor_value_info(f"x{t}", t, shape) for t in ALL_DTYPES]
    nodes = [helper.make_node("Identity", [f"x{t}"], [f"y{t}"]) for t in ALL_DTYPES]
    outputs = [helper.make_tensor_value_info(f"y{t}", t, shape) for t in ALL_DTYPES]
    proto = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 21)])
    feeds, _ = random_feeds(Model.from_proto(proto))
    for t in ALL_DTYPES:
        arr = feeds[f"x{t}"]
        want = np.dtype(helper.tensor_dtype_to_np_dtype(t))
        assert type(arr) is np.ndarray and arr.dtype == want and arr.shape == (2,) * rank, (t, arr)
    assert feeds[f"x{onnx.TensorProto.INT4}"].astype(np.int8).max() <= 7
    assert feeds[f"x{onnx.TensorProto.UINT2}"].astype(np.int8).max() <= 3
    check_feeds(Model.from_proto(proto), feeds)


def test_rank0_bool_condition_validates_with_generated_feeds():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (bool c, float[3] x) => (float[3] y) {
            y = If(c) <then_branch = t () => (float[3] a) { a = Relu(x) },
                       else_branch = e () => (float[3] b) { b = Neg(x) }>
        }
    """)
    feeds, _ = random_feeds(model)
    assert type(feeds["c"]) is np.ndarray and feeds["c"].shape == () and feeds["c"].dtype == np.bool_
    assert validate(model, model.copy(), runs=0).passed


def test_generated_feeds_too_large_for_memory_are_refused_before_allocating():
    fixed = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2147483648, 4] x) => (float[2147483648, 4] y) { y = Relu(x) }
    """)
    with pytest.raises(FeedError, match=r"would take 32 GiB \(input 'x' is 2147483648x4 float32\)"):
        random_feeds(fixed)
    dynamic = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (uint8[N] u, float[M] v) => (uint8[N] y) { y = Identity(u) }
    """)
    with pytest.raises(FeedError, match="give smaller dimensions with --shape"):
        random_feeds(dynamic, {"u": (2**30,), "v": (1024,)})
    feeds, _ = random_feeds(dynamic, {"u": (2**20,)})
    assert feeds["u"].shape == (2**20,)


def test_load_feeds_npz_and_npy(tmp_path, cnn):
    x = np.zeros((2, 3, 32, 32), np.float32)
    np.savez(tmp_path / "f.npz", input=x)
    np.save(tmp_path / "f.npy", x)
    assert load_feeds(tmp_path / "f.npz", cnn)["input"].shape == (2, 3, 32, 32)
    assert load_feeds(tmp_path / "f.npy", cnn)["input"].shape == (2, 3, 32, 32)


@pytest.mark.parametrize("feeds,match", [
    ({"input": np.zeros((1, 3, 32, 32), np.float64)}, "must be float32, got float64"),
    ({"input": np.zeros((1, 3, 32), np.float32)}, "must have rank 4"),
    ({"input": np.zeros((1, 3, 16, 32), np.float32)}, "has 16 on axis 2, the model wants 32"),
    ({}, "lack input 'input'"),
    ({"input": np.zeros((1, 3, 32, 32), np.float32), "other": np.zeros(1)}, "give 'other'"),
])
def test_feeds_that_do_not_match_are_refused(cnn, feeds, match):
    with pytest.raises(FeedError, match=match):
        check_feeds(cnn, feeds)


def test_calibration_npz_streams_samples_and_adds_the_batch_axis(tmp_path, cnn):
    samples = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    np.savez_compressed(tmp_path / "calib.npz", input=samples)
    cal = open_calibration(tmp_path / "calib.npz", cnn)
    assert len(cal) == 5
    got = [feeds["input"] for feeds in cal]
    assert [g.shape for g in got] == [(1, 3, 32, 32)] * 5
    np.testing.assert_array_equal(np.concatenate(got), samples)
    assert len(list(cal)) == 5  # re-iterable


def test_calibration_folder_allows_ragged_shapes(tmp_path):
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[1, T] x) => (float[1, T] y) { y = Relu(x) }
    """)
    for i, t in enumerate((3, 7, 5)):
        np.savez(tmp_path / f"s{i}.npz", x=np.ones((1, t), np.float32))
    cal = open_calibration(tmp_path, model)
    assert [f["x"].shape[1] for f in cal] == [3, 7, 5]


def test_calibration_mismatch_is_a_clear_error(tmp_path, cnn):
    np.savez(tmp_path / "bad.npz", image=np.zeros((4, 3, 32, 32), np.float32))
    with pytest.raises(CalibrationError, match="give 'image'"):
        open_calibration(tmp_path / "bad.npz", cnn)
    np.savez(tmp_path / "dtype.npz", input=np.zeros((4, 3, 32, 32), np.float64))
    with pytest.raises(CalibrationError, match="must be float32"):
        open_calibration(tmp_path / "dtype.npz", cnn)
    with pytest.raises(CalibrationError, match="no such file"):
        open_calibration(tmp_path / "missing.npz", cnn)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no .npz"):
        open_calibration(tmp_path / "empty", cnn)


def test_calibration_from_python_iterables(cnn):
    feeds = [{"input": np.zeros((1, 3, 32, 32), np.float32)} for _ in range(3)]
    cal = open_calibration(feeds, cnn)
    assert len(cal) == 3 and len(list(cal)) == 3
    assert len(open_calibration(feeds, cnn, limit=2)) == 2


def test_calibration_memory_does_not_grow_with_samples(tmp_path, cnn):
    """Reading one sample at a time: peak traced memory stays near one sample's size."""
    import tracemalloc

    samples = np.zeros((400, 3, 32, 32), np.float32)  # 4.9 MB in all, 12 KB a sample
    np.savez(tmp_path / "big.npz", input=samples)
    cal = open_calibration(tmp_path / "big.npz", cnn)
    tracemalloc.start()
    n = sum(1 for _ in cal)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 400
    assert peak < samples.nbytes / 10
