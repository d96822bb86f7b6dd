"""fp16: float16 weights and compute, I/O types kept, Casts only at boundaries, block
list, clamping, subgraphs, real models; CUDA where onnxruntime-gpu is present."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxopt import Model
from onnxopt.validate import available_providers, compare_outputs, run_model
from tests.helpers import io_signature, real_model, run_pass, with_weights
from tests.passes.test_quantize import RNG


def casts(model: Model) -> list:
    return [n for n in model.graph.nodes if n.op == "Cast"]


MLP = with_weights("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 16] x, float[16, 32] w1, float[32] b1, float[32, 4] w2) => (float[N, 4] y)
    { m = MatMul(x, w1)  a = Add(m, b1)  r = Relu(a)  y = MatMul(r, w2) }
""", w1=RNG.standard_normal((16, 32)).astype(np.float32), b1=np.ones(32, np.float32),
    w2=RNG.standard_normal((32, 4)).astype(np.float32))
X = {"x": RNG.standard_normal((3, 16)).astype(np.float32)}


def test_weights_and_compute_in_float16_with_casts_only_at_the_boundary():
    ran = run_pass("fp16", MLP)
    assert ran.modified and ran.stats["converted"] == 4 and ran.stats["casts"] == 2
    inits = [t for t in ran.model.constants()]
    assert inits and all(np.asarray(t.values).dtype == np.float16 for t in inits)
    assert [c.attrs["to"] for c in casts(ran.model)] == [onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT]
    assert io_signature(ran.model) == io_signature(MLP)  # names and float32 types kept
    got = run_model(ran.model, X)["y"]
    assert got.dtype == np.float32
    assert compare_outputs("y", run_model(MLP, X)["y"], got, exact=False).cosine > 0.9999
    assert ran.model.tensor_bytes() * 2 == MLP.tensor_bytes()


def test_blocked_ops_stay_float32_and_consecutive_fp16_ops_do_not_cast_between():
    model = with_weights("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8] x) => (float[N, 8] y)
        { a = Relu(x)  b = Neg(a)  c = Exp(b)  d = Log(c)  e = Sigmoid(d)  y = Abs(e) }
    """)
    ran = run_pass("fp16", model)
    assert ran.stats["kept_fp32"] == {"Exp is in the block list": 1, "Log is in the block list": 1}
    # in: x->16; Exp/Log together in float32: one cast before, one after; out: 16->32
    assert ran.stats["casts"] == 4 and len(casts(ran.model)) == 4
    got = run_model(ran.model, X | {"x": X["x"][:, :8]})["y"]
    ref = run_model(model, {"x": X["x"][:, :8]})["y"]
    assert np.allclose(got, ref, atol=2e-3)


def test_user_block_list():
    ran = run_pass("fp16", MLP, block=["MatMul"])
    assert ran.stats["kept_fp32"] == {"MatMul is in the block list": 2}
    assert ran.stats["converted"] == 2


def test_values_outside_the_float16_range_are_clamped_and_counted():
    model = with_weights("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x, float[4] mask) => (float[N, 4] y) { s = Add(x, mask)  y = Softmax <axis = -1> (s) }
    """, mask=np.array([0, 0, np.finfo(np.float32).min, 1e-9], np.float32))
    ran = run_pass("fp16", model)
    assert ran.stats["clamped_values"] == 1 and ran.stats["underflow_values"] == 1
    got = run_model(ran.model, {"x": X["x"][:, :4]})["y"]
    assert np.isfinite(got).all() and np.allclose(got[:, 2], 0.0)


def test_batchnorm_statistics_beyond_float16_are_renormalized_not_clamped():
    var = np.array([1e7, 4e7, 1.0], np.float32)
    model = with_weights("""
        <ir_version: 8, opset_import: ["" : 12]>
        g (float[1, 3, 4, 4] x, float[3] s, float[3] b, float[3] m, float[3] v) => (float[1, 3, 4, 4] y)
        { y = BatchNormalization(x, s, b, m, v) }
    """, s=np.ones(3, np.float32), b=np.zeros(3, np.float32), m=np.array([3e3, -2e3, 0.5], np.float32), v=var)
    x = {"x": (RNG.standard_normal((1, 3, 4, 4)) * 3000).astype(np.float32)}
    ran = run_pass("fp16", model)
    assert ran.stats["clamped_values"] == 0
    m = compare_outputs("y", run_model(model, x)["y"], run_model(ran.model, x)["y"], exact=False)
    assert m.cosine > 0.9999


def test_subgraph_bodies_stay_float32_and_read_a_cast_outer_tensor():
    model = with_weights("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x, bool c) => (float[N, 4] y)
        {
            r = Relu(x)
            y = If(c) <
                then_branch = t () => (float[N, 4] a) { a = Neg(r) },
                else_branch = e () => (float[N, 4] b) { b = Abs(r) }
            >
        }
    """)
    ran = run_pass("fp16", model)
    assert ran.stats["kept_fp32"] == {"holds a subgraph": 1}
    feeds = {"x": X["x"][:, :4], "c": np.array(True)}
    assert np.allclose(run_model(ran.model, feeds)["y"], run_model(model, feeds)["y"], atol=1e-3)
    assert io_signature(ran.model) == io_signature(model)


def test_does_not_fire_without_float_computation_and_is_idempotent():
    ints = with_weights("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N] x) => (int64[N] y) { y = Neg(x) }
    """)
    assert not run_pass("fp16", ints).modified
    once = run_pass("fp16", MLP)
    twice = run_pass("fp16", once.model)
    assert not twice.modified and twice.model.to_bytes() == once.model.to_bytes()


@pytest.mark.parametrize("name", ["ppocr-det", "ppocr-rec", "ppocr-cls", "minilm"])
def test_real_models_in_float16(name):
    from models.ocr import ocr_feeds
    from models.transformer import token_feeds

    model = Model.load(real_model(name))
    ran = run_pass("fp16", model)
    assert ran.modified and ran.stats["casts"] <= 2 + 2 * sum(ran.stats["kept_fp32"].values())
    assert io_signature(ran.model) == io_signature(model)
    feeds = token_feeds(1, batch=2, seed=3)[0] if name == "minilm" else ocr_feeds(name, 1, seed=3)[0]
    ref, got = run_model(model, feeds), run_model(ran.model, feeds)
    for key in ref:
        if ref[key].dtype.kind == "f":
            assert compare_outputs(key, ref[key], got[key], exact=False).cosine > 0.999
    assert ran.model.tensor_bytes() < 0.51 * model.tensor_bytes()


@pytest.mark.skipif("cuda" not in available_providers(),
                    reason="onnxruntime-gpu with a CUDA device is not available here")
def test_fp16_validates_on_cuda():
    from onnxopt.validate import validate

    ran = run_pass("fp16", MLP)
    v = validate(MLP, ran.model, X, providers=["cuda"], exact=False, min_cosine=0.999, runs=0)
    assert v.passed, v.failures()
