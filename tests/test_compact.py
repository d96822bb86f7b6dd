"""onnxopt.compact: storage planning, bit-packing, blocks that onnxruntime folds, the
numpy evaluator, weight discovery and the compression report."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxopt import Model
from onnxopt.compact import (
    StorageWriter,
    _best_gap_width,
    _gap_entries,
    _pack,
    compression_report,
    find_weights,
    format_report,
    plan_storage,
    storage_of,
    tensor_value,
)
from onnxopt.errors import PipelineError
from tests.helpers import parse
from tests.passes.compress_helpers import (
    assert_identical_outputs,
    decoder_nodes,
    optimized_ops,
    values,
    weights,
    with_weights,
)


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
    stream = _pack(vals, width)
    assert np.array_equal(_unpack_numpy(stream), vals)
    assert stream.words.dtype in (np.uint8, np.uint16, np.uint32)  # never 8-byte words
    if width in (1, 2, 4) and count >= 64:  # whole values per byte: no waste but the last byte
        assert stream.words.nbytes <= -(-count * width // 8) + 1


def test_gap_coding_inserts_fillers_for_long_gaps():
    positions = np.array([3, 4, 40, 41])
    pos, gaps = _gap_entries(positions, 3)  # gaps of at most 7
    assert pos[0] == 0 and np.array_equal(np.cumsum(gaps), pos)
    assert set(positions) <= set(pos.tolist()) and gaps.max() <= 7
    assert len(pos) == 4 + 1 + 5  # the entry at 0, and 36 = 5*7 + 1 needs five fillers
    width, bits = _best_gap_width(positions, 5)
    assert bits == min(len(_gap_entries(positions, w)[0]) * (w + 5) for w in range(1, 7))
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


def _mlp(w0: np.ndarray, w1: np.ndarray, opset: int = 17, ir: int = 8) -> Model:
    return parse(f"""
        <ir_version: {ir}, opset_import: ["" : {opset}]>
        g (float[N, {w0.shape[0]}] x) => (float[N, {w1.shape[1]}] y)
        <float[{w0.shape[0]}, {w0.shape[1]}] w0 = {values(w0)}, float[{w1.shape[0]}, {w1.shape[1]}] w1 = {values(w1)},
         float[{w0.shape[1]}] b0 = {values(np.full(w0.shape[1], 0.1))}>
        {{ h = MatMul(x, w0)  a = Add(h, b0)  r = Relu(a)  y = MatMul(r, w1) }}
    """)


def _write(model: Model, new: dict[str, np.ndarray]) -> Model:
    out = model.copy()
    sites, _ = find_weights(out)
    writer = StorageWriter(out)
    for s in sites:
        if s.name in new:
            writer.write(s, new[s.name])
    writer.commit()
    onnx.checker.check_model(out.to_proto(), full_check=True)
    return out


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_blocks_decode_exactly_and_onnxruntime_folds_them(opset, rng):
    w0 = rng.standard_normal((32, 48)).astype(np.float32)
    w1 = rng.standard_normal((48, 16)).astype(np.float32)
    model = _mlp(w0, w1, opset)
    pruned0 = np.where(np.abs(w0) < 1.0, 0, w0).astype(np.float32)
    shared1 = np.round(w1 * 2) / 2  # a few distinct values: an indexed form
    out = _write(model, {"w0": pruned0, "w1": shared1})
    assert {k: v for k, v in _storages(out).items()} == {"w0": "sparse", "w1": "dense-idx"}
    got = weights(out)
    assert np.array_equal(got["w0"], pruned0) and np.array_equal(got["w1"], shared1)
    # onnxruntime computes the weights once, when the session is created.
    assert not set(optimized_ops(out)) & {"ScatterElements", "Gather", "BitShift", "CumSum", "ConstantOfShape", "Split"}
    feeds = {"x": rng.standard_normal((3, 32)).astype(np.float32)}
    assert_identical_outputs(out, with_weights(model, {"w0": pruned0, "w1": shared1}), feeds)
    assert out.to_bytes() == _write(model, {"w0": pruned0, "w1": shared1}).to_bytes()  # deterministic


def _storages(model):
    sites, _ = find_weights(model)
    return {s.name: s.storage for s in sites}


def test_layers_of_one_form_share_one_block(rng):
    w0 = np.where(rng.random((32, 48)) < 0.8, 0, rng.standard_normal((32, 48))).astype(np.float32)
    w1 = np.where(rng.random((48, 16)) < 0.8, 0, rng.standard_normal((48, 16))).astype(np.float32)
    out = _write(_mlp(w0, w1), {"w0": w0, "w1": w1})
    ops = [n.op for n in out.graph.nodes]
    assert ops.count("ScatterElements") == 1 and ops.count("Split") == 1 and ops.count("CumSum") == 1
    assert np.array_equal(weights(out)["w1"], w1)
    # Rewriting one layer rebuilds the block: nothing of the old one is left behind.
    again = _write(out, {"w0": np.where(np.abs(w0) < 1.5, 0, w0).astype(np.float32)})
    assert [n.op for n in again.graph.nodes].count("ScatterElements") == 1
    assert np.array_equal(weights(again)["w1"], w1)
    assert len(again.to_bytes()) < len(out.to_bytes())


def test_negative_zero_and_float16_round_trip(rng):
    w0 = np.where(rng.random((32, 48)) < 0.7, 0, np.round(rng.standard_normal((32, 48)))).astype(np.float32)
    w0[0, :5] = -0.0
    w1 = rng.standard_normal((48, 16)).astype(np.float32)
    out = _write(_mlp(w0, w1), {"w0": w0})
    assert np.array_equal(weights(out)["w0"].view(np.uint32), w0.view(np.uint32))
    half = np.where(rng.random((64, 32)) < 0.8, 0, rng.standard_normal((64, 32))).astype(np.float16)
    plan = plan_storage(half, opset=17)
    assert plan.kind == "sparse"


def test_ir3_models_store_constants_as_constant_nodes(rng):
    """IR < 4 initializers must be graph inputs (overridable, so never folded): the
    storage of an IR 3 model is made of Constant nodes."""
    w = np.where(rng.random((32, 16)) < 0.8, 0, rng.standard_normal((32, 16))).astype(np.float32)
    model = parse(f"""
        <ir_version: 3, opset_import: ["" : 11]>
        g (float[N, 32] x) => (float[N, 16] y)
        {{ w = Constant <value = float[32, 16] {values(w)}> ()  y = MatMul(x, w) }}
    """)
    out = _write(model, {"w": w})
    proto = out.to_proto()
    assert not proto.graph.initializer and "ScatterElements" in [n.op_type for n in proto.graph.node]
    assert np.array_equal(weights(out)["w"], w)
    feeds = {"x": rng.standard_normal((2, 32)).astype(np.float32)}
    assert_identical_outputs(out, model, feeds)


def test_evaluator_matches_onnxruntime_on_each_decoder_op():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 18]>
        g () => (float[8] y, int64[6] run2, int64[2, 3] un, float[8] y2)
        <uint8[1, 3] wd = {27, 200, 5}, uint8[2, 1] sl = {4, 0}, uint8 sr = {4},
         int64[2] shp = {-1, 1}, int64[1] st = {-6}, int64[1] en = {1000}, int64[1] ax = {0}, int64[1] one = {1},
         float[4] cb = {0.0, 0.5, -1.5, 2.0}, int64[1] n = {8}, int64[3, 1] at = {1, 4, 6}, int64 zero = {0},
         int64[2] two3 = {2, 3}, int64[3] neg = {-1, 0, 1}>
        {
            l = BitShift <direction = "LEFT"> (wd, sl)
            r = BitShift <direction = "RIGHT"> (l, sr)
            col = Reshape(r, shp)
            part = Slice(col, st, en, ax, one)
            idx = Cast <to = 7> (part)
            flat = Squeeze(idx, one)
            run = CumSum <exclusive = 1, reverse = 1> (flat, zero)
            a, b = Split <num_outputs = 2> (run)
            joined = Concat <axis = 0> (b, a)
            run2 = Add(joined, joined)
            pick3 = Gather(cb, neg)
            three = Identity(pick3)
            un = Reshape(run2, two3)
            z = ConstantOfShape(n)
            y = ScatterND(z, at, three)
            at1 = Squeeze(at, one)
            y2 = ScatterElements(z, at1, three)
        }
    """)
    from onnxopt.validate import make_session

    sess = make_session(model)
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {})))
    for t in model.graph.outputs:
        got = tensor_value(t)
        assert got is not None, t.name
        assert got.dtype == ref[t.name].dtype and np.array_equal(got, ref[t.name]), (t.name, got, ref[t.name])
    assert storage_of(model.graph.outputs[0]) == "sparse-idx"  # a scatter of codebook values
    assert storage_of(model.graph.outputs[1]) == "computed"


def test_find_weights_skips_what_it_must_not_touch(rng):
    w = rng.standard_normal((8, 8)).astype(np.float32)
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8] x, float[8, 8] fed) => (float[N, 8] y, float[8, 8] w_out)
        <float[8, 8] w_data = {values(w)}, float[8, 8] w_out = {values(w)}, float[8, 8] w_ok = {values(w)}>
        {{
            a = MatMul(x, w_data)
            b = Add(a, w_data)
            c = MatMul(b, w_out)
            d = MatMul(c, fed)
            y = MatMul(d, w_ok)
        }}
    """)
    sites, skipped = find_weights(model)
    assert [s.name for s in sites] == ["w_ok"]
    assert sites[0].axis == 0 and sites[0].ops == ["MatMul"]
    assert skipped == {"also read as data by another node": 1, "graph output": 1}


def test_report_counts_blocks_once_and_measures_the_file(rng):
    w0 = np.where(rng.random((32, 48)) < 0.8, 0, rng.standard_normal((32, 48))).astype(np.float32)
    w1 = np.where(rng.random((48, 16)) < 0.8, 0, rng.standard_normal((48, 16))).astype(np.float32)
    model = _mlp(rng.standard_normal((32, 48)).astype(np.float32), rng.standard_normal((48, 16)).astype(np.float32))
    out = _write(model, {"w0": w0, "w1": w1})
    report = compression_report(out, model)
    rows = {r["layer"]: r for r in report["layers"]}
    total = report["total"]
    assert rows["w0"]["storage"] == "sparse" and rows["w0"]["nonzeros"] == np.count_nonzero(w0)
    assert abs(sum(r["bytes"] for r in rows.values()) - total["bytes"]) <= 2  # shares of one block
    assert total["dense_bytes"] == (w0.size + w1.size) * 4
    assert total["file_bytes"] == len(out.to_bytes())
    assert total["original_file_bytes"] == len(model.to_bytes())
    assert total["file_ratio"] == pytest.approx(len(model.to_bytes()) / len(out.to_bytes()), rel=1e-3)
    assert total["file_gzip_bytes"] < total["file_bytes"]
    text = format_report(report)
    assert "w0" in text and "total" in text and "smaller" in text
    plain = compression_report(model)
    assert {r["storage"] for r in plain["layers"]} == {"dense"} and "original_file_bytes" not in plain["total"]


def test_writer_leaves_no_trace_when_nothing_is_written(rng):
    model = _mlp(rng.standard_normal((32, 48)).astype(np.float32), rng.standard_normal((48, 16)).astype(np.float32))
    before = model.to_bytes()
    assert StorageWriter(model).commit() == {}
    assert model.to_bytes() == before and decoder_nodes(model) == 0


def test_selection_errors_name_the_problem():
    from onnxopt.compact import check_selection, check_targets

    with pytest.raises(PipelineError, match="ops must be among"):
        check_selection("p", ["Relu"], [])
    with pytest.raises(PipelineError, match="bad name pattern"):
        check_selection("p", ["Conv"], ["("])
    with pytest.raises(PipelineError, match="not PATTERN=VALUE"):
        check_targets("p", ["fc0"], float, 0, 1)
    with pytest.raises(PipelineError, match="must be in"):
        check_targets("p", ["fc0=1.5"], float, 0, 1)
