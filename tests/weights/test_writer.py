"""onnxopt.weights.writer: blocks that decode exactly and that onnxruntime folds, negative
zeros and float16, IR 3 models, and a writer that writes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.weights.storage_plan import plan_storage
from onnxopt.weights.writer import StorageWriter
from tests.helpers import parse, with_weights
from tests.passes import compress_helpers as compress
from tests.weights.helpers import mlp, write


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_blocks_decode_exactly_and_onnxruntime_folds_them(opset, rng):
    w0 = rng.standard_normal((32, 48)).astype(np.float32)
    w1 = rng.standard_normal((48, 16)).astype(np.float32)
    model = mlp(w0, w1, opset)
    pruned0 = np.where(np.abs(w0) < 1.0, 0, w0).astype(np.float32)
    shared1 = np.round(w1 * 2) / 2  # a few distinct values: an indexed form
    out = write(model, {"w0": pruned0, "w1": shared1})
    assert {k: v for k, v in compress.storages(out).items()} == {"w0": "sparse", "w1": "dense-idx"}
    got = compress.weights(out)
    assert np.array_equal(got["w0"], pruned0) and np.array_equal(got["w1"], shared1)
    # onnxruntime computes the weights once, when the session is created.
    assert not set(compress.optimized_ops(out)) & {"ScatterElements", "Gather", "BitShift", "CumSum", "ConstantOfShape", "Split"}
    feeds = {"x": rng.standard_normal((3, 32)).astype(np.float32)}
    compress.assert_identical_outputs(out, with_weights(model, w0=pruned0, w1=shared1), feeds)
    assert out.to_bytes() == write(model, {"w0": pruned0, "w1": shared1}).to_bytes()  # deterministic


def test_layers_of_one_form_share_one_block(rng):
    w0 = np.where(rng.random((32, 48)) < 0.8, 0, rng.standard_normal((32, 48))).astype(np.float32)
    w1 = np.where(rng.random((48, 16)) < 0.8, 0, rng.standard_normal((48, 16))).astype(np.float32)
    out = write(mlp(w0, w1), {"w0": w0, "w1": w1})
    ops = [n.op for n in out.graph.nodes]
    assert ops.count("ScatterElements") == 1 and ops.count("Split") == 1 and ops.count("CumSum") == 1
    assert np.array_equal(compress.weights(out)["w1"], w1)
    # Rewriting one layer rebuilds the block: nothing of the old one is left behind.
    again = write(out, {"w0": np.where(np.abs(w0) < 1.5, 0, w0).astype(np.float32)})
    assert [n.op for n in again.graph.nodes].count("ScatterElements") == 1
    assert np.array_equal(compress.weights(again)["w1"], w1)
    assert len(again.to_bytes()) < len(out.to_bytes())


def test_negative_zero_and_float16_round_trip(rng):
    w0 = np.where(rng.random((32, 48)) < 0.7, 0, np.round(rng.standard_normal((32, 48)))).astype(np.float32)
    w0[0, :5] = -0.0
    w1 = rng.standard_normal((48, 16)).astype(np.float32)
    out = write(mlp(w0, w1), {"w0": w0})
    assert np.array_equal(compress.weights(out)["w0"].view(np.uint32), w0.view(np.uint32))
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
        {{ w = Constant <value = float[32, 16] {compress.values(w)}> ()  y = MatMul(x, w) }}
    """)
    out = write(model, {"w": w})
    proto = out.to_proto()
    assert not proto.graph.initializer and "ScatterElements" in [n.op_type for n in proto.graph.node]
    assert np.array_equal(compress.weights(out)["w"], w)
    feeds = {"x": rng.standard_normal((2, 32)).astype(np.float32)}
    compress.assert_identical_outputs(out, model, feeds)


def test_writer_leaves_no_trace_when_nothing_is_written(rng):
    model = mlp(rng.standard_normal((32, 48)).astype(np.float32), rng.standard_normal((48, 16)).astype(np.float32))
    before = model.to_bytes()
    assert StorageWriter(model).commit() == {}
    assert model.to_bytes() == before and compress.decoder_nodes(model) == 0
