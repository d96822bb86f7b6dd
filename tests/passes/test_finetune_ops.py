"""finetune's torch interpreter: each op family against onnxruntime on small graphs (the
modes real exports use: asymmetric pads, ceil_mode, every Resize coordinate mode, LSTM,
If, opset-11 Softmax, negative Slice steps, Q/DQ), gradients reach every trained
tensor, and what the op table cannot express is refused naming the node."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import torch  # noqa: E402
from onnxopt.passes.finetune.module import GraphModule, Unsupported  # noqa: E402
from onnxopt.passes.finetune.params import plan_training  # noqa: E402

from onnxopt.validate import run_model  # noqa: E402
from tests.helpers import parse  # noqa: E402


def _w(*shape, seed=0):
    return ", ".join(f"{v:.4f}" for v in np.random.default_rng(seed).standard_normal(int(np.prod(shape))))


def _same_as_ort(model, feeds, cosine=0.99999):
    ref = run_model(model, feeds)
    module = GraphModule(model, plan_training(model))
    with torch.no_grad():
        got = module({k: torch.from_numpy(v) for k, v in feeds.items()})
    for (name, r), g in zip(ref.items(), got):
        g = g.numpy()
        assert g.shape == r.shape, f"{name}: {g.shape} vs {r.shape}"
        if r.dtype.kind == "f":
            a, b = r.ravel().astype(np.float64), g.ravel().astype(np.float64)
            c = a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)
            assert c >= cosine and np.allclose(a, b, rtol=1e-4, atol=1e-4), f"{name}: cosine {c}"
        else:
            assert np.array_equal(r, g.astype(r.dtype)), name
    return module


CASES = {
    "conv-asymmetric-pads-groups": (f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 9, 7] x) => (float[1, 6, 5, 4] y)
        <float[6, 2, 3, 2] w = {{{_w(6, 2, 3, 2)}}}, float[6] b = {{{_w(6, seed=1)}}}>
        {{ y = Conv <group = 2, strides = [2, 2], pads = [1, 0, 0, 1]> (x, w, b) }}""", (1, 4, 9, 7)),
    "conv-same-upper": (f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 2, 8, 8] x) => (float[1, 3, 4, 4] y)
        <float[3, 2, 3, 3] w = {{{_w(3, 2, 3, 3)}}}>
        {{ y = Conv <auto_pad = "SAME_UPPER", strides = [2, 2]> (x, w) }}""", (1, 2, 8, 8)),
    "conv-transpose-output-padding": (f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 3, 5, 5] x) => (float[1, 2, 10, 11] y)
        <float[3, 2, 2, 3] w = {{{_w(3, 2, 2, 3)}}}, float[2] b = {{0.5, -0.5}}>
        {{ y = ConvTranspose <strides = [2, 2], pads = [0, 1, 0, 0], output_padding = [0, 1]> (x, w, b) }}""",
                                      (1, 3, 5, 5)),
    "pools-ceil-and-pads": ("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 2, 7, 7] x) => (float[1, 2, 4, 4] m, float[1, 2, 4, 4] a, float[1, 2, 1, 1] ga)
        {
            m = MaxPool <kernel_shape = [3, 3], strides = [2, 2], ceil_mode = 1, pads = [1, 1, 0, 0]> (x)
            a = AveragePool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (x)
            ga = GlobalAveragePool(x)
        }""", (1, 2, 7, 7)),
    "resize-nearest-and-linear": ("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[1, 2, 3, 5] x) => (float[1, 2, 6, 10] n, float[1, 2, 6, 10] l, float[1, 2, 7, 9] c)
        <float[4] s = {1.0, 1.0, 2.0, 2.0}, float[0] roi = {}, int64[4] sz = {1, 2, 7, 9}>
        {
            n = Resize <mode = "nearest", coordinate_transformation_mode = "asymmetric", nearest_mode = "floor"> (x, roi, s)
            l = Resize <mode = "linear", coordinate_transformation_mode = "half_pixel"> (x, roi, s)
            c = Resize <mode = "linear", coordinate_transformation_mode = "align_corners"> (x, roi, , sz)
        }""", (1, 2, 3, 5)),
    "softmax-opset11-and-norms": (f"""
        <ir_version: 7, opset_import: ["" : 11]>
        g (float[2, 3, 4] x) => (float[2, 3, 4] s, float[2, 3, 4] bn, float[2, 3, 4] ls)
        <float[3] sc = {{1.0, 2.0, 0.5}}, float[3] bi = {{0.1, 0.2, 0.3}}, float[3] mu = {{0.0, 0.5, -0.5}},
         float[3] var = {{1.0, 2.0, 0.5}}, float[4] w = {{{_w(4)}}}>
        {{
            s = Softmax <axis = 1> (x)
            bn = BatchNormalization(x, sc, bi, mu, var)
            ls = LogSoftmax <axis = 2> (x)
        }}""", (2, 3, 4)),
    "layernorm-gelu-matmul": (f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 5, 8] x) => (float[2, 5, 4] y)
        <float[8] gamma = {{{_w(8)}}}, float[8] beta = {{{_w(8, seed=2)}}}, float[8, 4] w = {{{_w(8, 4, seed=3)}}},
         float[4] b = {{0.1, 0.2, 0.3, 0.4}}>
        {{
            n = LayerNormalization <axis = -1, epsilon = 0.00001> (x, gamma, beta)
            e = Erf(n)
            m = MatMul(e, w)
            y = Add(m, b)
        }}""", (2, 5, 8)),
    "shapes-slices-gathers": ("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 6, 5] x) => (float[2, 3, 5] s, float[2, 5] gx, float[5, 2, 6] t, int64[3] sh, float[2, 30] r)
        <int64[1] st = {-1}, int64[1] en = {-7}, int64[1] ax = {1}, int64[1] sp = {-2}, int64 i = {-1},
         int64[2] shape = {0, -1}>
        {
            s = Slice(x, st, en, ax, sp)
            gx = Gather <axis = 1> (x, i)
            t = Transpose <perm = [2, 0, 1]> (x)
            sh = Shape(x)
            r = Reshape(x, shape)
        }""", (2, 6, 5)),
    "pad-modes-and-clip": ("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 2, 4, 4] x) => (float[1, 2, 6, 7] c, float[1, 2, 6, 6] r, float[1, 2, 4, 4] k)
        <int64[8] p1 = {0, 0, 1, 2, 0, 0, 1, 1}, int64[8] p2 = {0, 0, 1, 1, 0, 0, 1, 1}, float lo = {-0.5}, float hi = {0.5}>
        {
            c = Pad <mode = "constant"> (x, p1)
            r = Pad <mode = "reflect"> (x, p2)
            k = Clip(x, lo, hi)
        }""", (1, 2, 4, 4)),
    "qdq-pair": ("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 8] x) => (float[2, 8] y)
        <float s = {0.05}, uint8 z = {128}>
        { q = QuantizeLinear(x, s, z)  y = DequantizeLinear(q, s, z) }""", (2, 8)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ops_match_onnxruntime(case):
    text, shape = CASES[case]
    model = parse(text)
    feeds = {model.graph.inputs[0].name: np.random.default_rng(7).standard_normal(shape).astype(np.float32)}
    _same_as_ort(model, feeds)


def test_lstm_and_if_match_onnxruntime():
    h, i = 4, 3
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[5, 2, 3] x, bool c) => (float[5, 2, 2, 4] y, float[2, 2, 4] yh)
        <float[2, 16, 3] w = {{{_w(2, 4 * h, i)}}}, float[2, 16, 4] r = {{{_w(2, 4 * h, h, seed=1)}}},
         float[2, 32] b = {{{_w(2, 8 * h, seed=2)}}}>
        {{
            xx = If (c) <then_branch = g1 () => (float[5, 2, 3] o1) {{ o1 = Identity(x) }},
                          else_branch = g2 () => (float[5, 2, 3] o2) {{ o2 = Neg(x) }}>
            y, yh = LSTM <direction = "bidirectional", hidden_size = 4> (xx, w, r, b)
        }}""")
    x = np.random.default_rng(3).standard_normal((5, 2, 3)).astype(np.float32)
    for cond in (True, False):
        _same_as_ort(model, {"x": x, "c": np.array(cond)})


def test_gradients_reach_every_trained_tensor():
    model = parse(CASES["layernorm-gelu-matmul"][0])
    plan = plan_training(model)
    assert {s.tensor.name for s in plan.sites} == {"gamma", "beta", "w", "b"}
    module = GraphModule(model, plan)
    y = module({"x": torch.randn(2, 5, 8)})[0]
    y.square().sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in module.leaf_params)


def test_an_op_outside_the_table_is_refused_by_name():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17, "custom.domain" : 1]>
        g (float[2, 3] x) => (float[2, 3] y)
        { t = Relu(x)  y = custom.domain.Mystery(t) }""")
    with pytest.raises(Unsupported, match="custom.domain.Mystery"):
        GraphModule(model, plan_training(model))
