"""fold-batchnorm: fires (Conv, ConvTranspose, Gemm, MatMul; BN, Mul, Add), does not
fire (one test per guard), idempotent, equivalent, subgraphs, I/O kept, real models."""

from __future__ import annotations

import numpy as np
import pytest

from models import builders
from models.digits import accuracy, digits_mlp, digits_split
from models.fetch import light_models
from onnxopt import Model
from onnxopt.graph import const_value
from onnxopt.model import iter_graphs
from tests.helpers import (
    assert_same_outputs,
    io_signature,
    node_count,
    ops,
    parse,
    real_model,
    run_pass,
    with_weights,
)


def test_folds_conv_batchnorm_and_creates_the_bias():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[1,2,3,3] x) => (float[1,2,3,3] y)
        <float[2,2,1,1] w = {1.0, -2.0, 0.5, 3.0},
         float[2] s = {2.0, 0.5}, float[2] b = {0.1, -0.2}, float[2] m = {1.0, -1.0}, float[2] v = {4.0, 0.25}>
        {
            c = Conv(x, w)
            y = BatchNormalization <epsilon = 0.001> (c, s, b, m, v)
        }
    """)
    ran = run_pass("fold-batchnorm", model)
    assert ran.modified
    assert ran.stats["bn_folded"] == 1 and ran.stats["biases_created"] == 1
    assert ops(ran.model) == ["Conv"]
    conv = ran.model.graph.nodes[0]
    assert len(conv.inputs) == 3 and conv.outputs[0].name == "y"
    a = np.array([2.0, 0.5]) / np.sqrt(np.array([4.0, 0.25]) + 1e-3)
    np.testing.assert_allclose(conv.inputs[2].values, np.array([0.1, -0.2]) - np.array([1.0, -1.0]) * a, rtol=1e-6)
    assert conv.inputs[2].values.dtype == np.float32
    assert {i.name for i in ran.model.to_proto().graph.initializer} == {conv.inputs[1].name, conv.inputs[2].name}
    assert io_signature(ran.model) == io_signature(model)
    assert_same_outputs(model, ran.model)


def _rng():
    return np.random.default_rng(0)


def _bn(c: int) -> dict[str, np.ndarray]:
    """Inference statistics of a BatchNormalization over ``c`` channels: s, b, m, v."""
    r = _rng()
    return {"s": (1 + 0.3 * r.standard_normal(c)).astype(np.float32),
            "b": (0.2 * r.standard_normal(c)).astype(np.float32),
            "m": (0.2 * r.standard_normal(c)).astype(np.float32),
            "v": (0.5 + r.random(c)).astype(np.float32)}


def _lit(a: np.ndarray) -> str:
    """``a`` as an ONNX-text float tensor literal (exact: every float32 value round-trips)."""
    dims = f"[{','.join(str(d) for d in a.shape)}]" if a.ndim else ""
    return f"float{dims} {{{', '.join(repr(float(v)) for v in np.asarray(a).ravel())}}}"


CONV_TRANSPOSE_BN = """
    <ir_version: 9, opset_import: ["" : 18]>
    g (float[N,4,5,5] x, float[4,{cols},3,3] w, {bias_in}float[6] s, float[6] b, float[6] m, float[6] v)
      => (float[N,6,11,11] y)
    {{ c = ConvTranspose<group = {group}, strides = [2, 2]>(x, w{bias})  y = BatchNormalization(c, s, b, m, v) }}
"""


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_folds_into_conv_transpose_whatever_its_groups(group, bias):
    r = _rng()
    cin, cout = 4, 6
    weights = {"w": r.standard_normal((cin, cout // group, 3, 3)).astype(np.float32)} | _bn(cout)
    if bias:
        weights["cb"] = r.standard_normal(cout).astype(np.float32)
    model = with_weights(CONV_TRANSPOSE_BN.format(cols=cout // group, group=group,
                                                  bias_in="float[6] cb, " if bias else "",
                                                  bias=", cb" if bias else ""), **weights)
    ran = run_pass("fold-batchnorm", model)
    assert ran.stats["bn_folded"] == 1 and ran.stats["biases_created"] == (0 if bias else 1)
    assert ops(ran.model) == ["ConvTranspose"]
    assert_same_outputs(model, ran.model, shapes={"x": (2, cin, 5, 5)})


GEMM_AFFINE = """
    <ir_version: 9, opset_import: ["" : 18]>
    g (float[N,3] x, float[{w}] w{c_in}, {params}) => (float[N,5] y)
    {{ g = Gemm<transB = {trans_b}, alpha = 0.5, beta = 2.0>(x, w{c})  {follower} }}
"""


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), ()], ids=["no-C", "C[N]", "C[1,N]", "C-scalar"])
@pytest.mark.parametrize("follower", ["BatchNormalization", "Mul", "Add"])
def test_folds_into_gemm(trans_b, c_shape, follower):
    r = _rng()
    weights = {"w": r.standard_normal((5, 3) if trans_b else (3, 5)).astype(np.float32)}
    c_in = c = ""
    if c_shape is not None:
        weights["c"] = r.standard_normal(c_shape).astype(np.float32)
        c_in, c = f", float[{','.join(map(str, c_shape))}] c" if c_shape else ", float c", ", c"
    if follower == "BatchNormalization":
        weights |= _bn(5)
        params, text = "float[5] s, float[5] b, float[5] m, float[5] v", "y = BatchNormalization(g, s, b, m, v)"
    else:
        weights["k"] = r.standard_normal((1, 5)).astype(np.float32)
        params, text = "float[1,5] k", f"y = {follower}(k, g)"  # constant first: commutes
    model = with_weights(GEMM_AFFINE.format(w="5,3" if trans_b else "3,5", c_in=c_in, params=params,
                                            trans_b=trans_b, c=c, follower=text), **weights)
    ran = run_pass("fold-batchnorm", model)
    assert ran.modified and ops(ran.model) == ["Gemm"]
    assert_same_outputs(model, ran.model, shapes={"x": (4, 3)})


@pytest.mark.parametrize("shift", ["Add", "Sub"])
def test_folds_per_column_mul_into_matmul_and_leaves_its_bias_add(shift):
    r = _rng()
    model = with_weights(f"""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[N,T,3] x, float[3,4] w, float[4] k, float[4] b) => (float[N,T,4] y)
        {{ m = MatMul(x, w)  s = Mul(m, k)  y = {shift}(s, b) }}
    """, w=r.standard_normal((3, 4)).astype(np.float32), k=r.standard_normal(4).astype(np.float32),
        b=r.standard_normal(4).astype(np.float32))
    ran = run_pass("fold-batchnorm", model)
    assert ran.stats["mul_folded"] == 1 and ran.stats["skipped_matmul_has_no_bias"] == 1
    assert ops(ran.model) == ["MatMul", shift]
    assert_same_outputs(model, ran.model, shapes={"x": (2, 5, 3)})


MATMUL_BN = """
    <ir_version: 9, opset_import: ["" : 18]>
    g (float[{x}] x, float[3,4] w, float[4] s, float[4] b, float[4] m, float[4] v) => (float[{y}] y)
    {{ p = MatMul(x, w)  y = BatchNormalization(p, s, b, m, v) }}
"""


def _matmul_bn(x: str, y: str) -> Model:
    return with_weights(MATMUL_BN.format(x=x, y=y), w=_rng().standard_normal((3, 4)).astype(np.float32), **_bn(4))


def test_folds_batchnorm_after_a_2d_matmul_leaving_an_add():
    model = _matmul_bn("N,3", "N,4")
    ran = run_pass("fold-batchnorm", model)
    assert ran.stats["bn_folded"] == 1
    assert ops(ran.model) == ["MatMul", "Add"]
    assert_same_outputs(model, ran.model, shapes={"x": (6, 3)})


def test_batchnorm_after_a_3d_matmul_is_not_per_column():
    model = _matmul_bn("N,4,3", "N,4,4")
    ran = run_pass("fold-batchnorm", model)
    assert not ran.modified and ran.stats["skipped_bn_axis_not_channels"] == 1


def test_folds_a_whole_chain_into_one_conv():
    model = _conv_chain(["BatchNormalization", "Mul", "Add"])
    ran = run_pass("fold-batchnorm", model)
    assert (ran.stats["bn_folded"], ran.stats["mul_folded"], ran.stats["add_folded"]) == (1, 1, 1)
    assert ops(ran.model) == ["Conv", "Relu"]
    assert io_signature(ran.model) == io_signature(model)
    assert_same_outputs(model, ran.model, shapes={"x": (2, 3, 6, 6)})


def _conv_chain(followers: list[str], k_shape=(1, 4, 1, 1), with_bias=True, constant_nodes=False,
                k: np.ndarray | None = None) -> Model:
    """Conv(x, w[, b]) -> each of ``followers`` (BatchNormalization reads s, b, m, v; the
    others read k) -> Relu. ``constant_nodes``: every weight in a Constant node, as Paddle
    exports them."""
    r = _rng()
    weights = {"w": r.standard_normal((4, 3, 3, 3)).astype(np.float32),
               "b": r.standard_normal(4).astype(np.float32)}
    weights |= {f"bn_{n}": v for n, v in _bn(4).items()}
    weights["k"] = (1 + r.standard_normal(k_shape)).astype(np.float32) if k is None else k
    body = [f"t0 = Conv<pads = [1, 1, 1, 1]>(x, w{', b' if with_bias else ''})"]
    for i, op in enumerate(followers):
        args = "bn_s, bn_b, bn_m, bn_v" if op == "BatchNormalization" else "k"
        body.append(f"t{i + 1} = {op}(t{i}, {args})")
    body.append(f"y = Relu(t{len(followers)})")
    if constant_nodes:
        consts = [f"{n} = Constant<value = {_lit(v)}>()" for n, v in weights.items()]
        return parse(f"""
            <ir_version: 9, opset_import: ["" : 18]>
            chain (float[N,3,6,6] x) => (float[N,4,6,6] y)
            {{ {"  ".join(consts + body)} }}
        """)
    decls = ", ".join(f"{_lit(v).split(' ')[0]} {n}" for n, v in weights.items())
    return with_weights(f"""
        <ir_version: 9, opset_import: ["" : 18]>
        chain (float[N,3,6,6] x, {decls}) => (float[N,4,6,6] y)
        {{ {"  ".join(body)} }}
    """, **weights)


def test_constant_node_weights_fold_and_their_nodes_go():
    model = _conv_chain(["BatchNormalization"], with_bias=False, constant_nodes=True)
    ran = run_pass("fold-batchnorm", model)
    assert ran.stats["bn_folded"] == 1 and ran.stats["biases_created"] == 1
    assert ops(ran.model) == ["Constant", "Constant", "Conv", "Relu"]  # b and k were never read by it
    assert ran.stats["nodes_removed"] == 1 + 5  # the BN and the Constant nodes of w and its 4 params
    assert_same_outputs(model, ran.model, shapes={"x": (1, 3, 6, 6)})


def test_is_idempotent():
    model = _conv_chain(["BatchNormalization", "Mul"])
    once = run_pass("fold-batchnorm", model)
    twice = run_pass("fold-batchnorm", once.model)
    assert once.modified and not twice.modified
    assert twice.model.to_bytes() == once.model.to_bytes()


# ---- guards ----------------------------------------------------------------------------


@pytest.mark.parametrize("k_shape, reason", [
    ((1, 1, 6, 1), "operand_not_per_channel"),  # varies along the height
    ((4,), "operand_not_per_channel"),  # right-aligned: the width axis, not the channels
    ((1, 1, 4, 1, 1), "operand_not_per_channel"),  # would add an axis to the output
])
def test_mul_that_is_not_per_channel_stays(k_shape, reason):
    model = _conv_chain(["Mul"], k_shape=k_shape)
    ran = run_pass("fold-batchnorm", model)
    assert not ran.modified and ran.stats[f"skipped_{reason}"] == 1


def test_scalar_mul_folds():
    model = _conv_chain(["Mul"], k_shape=())
    ran = run_pass("fold-batchnorm", model)
    assert ran.stats["mul_folded"] == 1
    assert_same_outputs(model, ran.model, shapes={"x": (1, 3, 6, 6)})


def test_conv_output_with_another_consumer_stays():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[1,2,3,3] x) => (float[1,2,3,3] y, float[1,2,3,3] z)
        <float[2,2,1,1] w = {1.0, -2.0, 0.5, 3.0}, float[1,2,1,1] k = {2.0, 3.0}>
        { c = Conv(x, w)  y = Mul(c, k)  z = Relu(c) }
    """)
    ran = run_pass("fold-batchnorm", model)
    assert not ran.modified and ran.stats["skipped_shared_output"] == 1


def test_conv_output_that_is_a_graph_output_stays():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[1,2,3,3] x) => (float[1,2,3,3] y, float[1,2,3,3] c)
        <float[2,2,1,1] w = {1.0, -2.0, 0.5, 3.0}, float[1,2,1,1] k = {2.0, 3.0}>
        { c = Conv(x, w)  y = Mul(c, k) }
    """)
    ran = run_pass("fold-batchnorm", model)
    assert not ran.modified and ran.stats["skipped_graph_output"] == 1
    assert io_signature(ran.model) == io_signature(model)


def test_weight_that_is_a_graph_input_stays():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[1,2,3,3] x, float[2,2,1,1] w) => (float[1,2,3,3] y)
        <float[1,2,1,1] k = {2.0, 3.0}>
        { c = Conv(x, w)  y = Mul(c, k) }
    """)
    ran = run_pass("fold-batchnorm", model)
    assert not ran.modified and ran.stats["skipped_weight_not_constant"] == 1


@pytest.mark.parametrize("op", ["Mul", "Sub"])
def test_operand_that_is_not_constant_stays(op):
    model = parse(f"""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[1,2,3,3] x, float[1,2,1,1] k) => (float[1,2,3,3] y)
        <float[2,2,1,1] w = {{1.0, -2.0, 0.5, 3.0}}>
        {{ c = Conv(x, w)  y = {op}(c, k) }}
    """)
    ran = run_pass("fold-batchnorm", model)
    assert not ran.modified and ran.stats["skipped_operand_not_constant"] == 1



def test_an_operand_reshaped_from_a_constant_folds_and_its_chain_goes():
    # Paddle writes a per-channel bias as Reshape(vector, [1, C, 1, 1]) next to the Add.
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[1,2,3,3] x) => (float[1,2,3,3] y)
        <float[2,2,1,1] w = {1.0, -2.0, 0.5, 3.0}, float[2] k = {0.25, -1.5}>
        {
            c = Conv(x, w)
            shape = Constant<value = int64[4] {1, 2, 1, 1}>()
            kr = Reshape(k, shape)
            y = Add(c, kr)
        }
    """)
    ran = run_pass("fold-batchnorm", model)
    assert ran.stats["add_folded"] == 1 and ran.stats["biases_created"] == 1
    assert ops(ran.model) == ["Conv"]  # the Reshape and its target went with the Add
    assert io_signature(ran.model) == io_signature(model)
    assert_same_outputs(model, ran.model)


def test_an_operand_reshaped_to_a_computed_shape_stays():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[1,2,3,3] x, int64[4] shape) => (float[1,2,3,3] y)
        <float[2,2,1,1] w = {1.0, -2.0, 0.5, 3.0}, float[2] k = {0.25, -1.5}>
        { c = Conv(x, w)  kr = Reshape(k, shape)  y = Add(c, kr) }
    """)
    ran = run_pass("fold-batchnorm", model)
    assert not ran.modified and ran.stats["skipped_operand_not_constant"] == 1

def test_integer_matmul_stays():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (int32[2,2] x) => (int32[2,2] y)
        <int32[2,2] w = {1, 2, 3, 4}, int32[2] k = {2, 3}>
        { m = MatMul(x, w)  y = Mul(m, k) }
    """)
    ran = run_pass("fold-batchnorm", model)
    assert not ran.modified and ran.stats["skipped_weight_not_float"] == 1


def test_training_mode_batchnorm_stays():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2,2,3,3] x) => (float[2,2,3,3] y, float[2] rm, float[2] rv)
        <float[2,2,1,1] w = {1.0, -2.0, 0.5, 3.0},
         float[2] s = {2.0, 0.5}, float[2] b = {0.1, -0.2}, float[2] m = {1.0, -1.0}, float[2] v = {4.0, 0.25}>
        { c = Conv(x, w)  y, rm, rv = BatchNormalization <training_mode = 1> (c, s, b, m, v) }
    """)
    ran = run_pass("fold-batchnorm", model)
    assert not ran.modified and ran.stats["skipped_bn_training_outputs"] == 1


def test_shared_weight_is_not_changed_under_its_other_user():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[1,2,3,3] x) => (float[1,2,3,3] y, float[1,2,3,3] z)
        <float[2,2,1,1] w = {1.0, -2.0, 0.5, 3.0}, float[1,2,1,1] k = {2.0, 3.0}>
        { c = Conv(x, w)  y = Mul(c, k)  z = Conv(x, w) }
    """)
    ran = run_pass("fold-batchnorm", model)
    assert ran.stats["mul_folded"] == 1
    names = {i.name for i in ran.model.to_proto().graph.initializer}
    assert "w" in names and "k" not in names and len(names) == 2
    assert_same_outputs(model, ran.model)


# ---- Div and Sub ---------------------------------------------------------------------

POSITIVE_K = np.array([0.5, 2.0, 1.25, 4.0], np.float32).reshape(1, 4, 1, 1)


@pytest.mark.parametrize("op", ["Div", "Sub"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_div_and_sub_fold_into_the_conv(op, with_bias):
    model = _conv_chain([op], with_bias=with_bias, k=POSITIVE_K)
    ran = run_pass("fold-batchnorm", model)
    assert ran.modified and ran.stats[f"{op.lower()}_folded"] == 1
    assert ops(ran.model) == ["Conv", "Relu"]
    conv = ran.model.graph.nodes[0]
    k = POSITIVE_K.reshape(-1)
    if op == "Div":
        np.testing.assert_allclose(const_value(conv.inputs[1]), const_value(model.graph.nodes[0].inputs[1])
                                   / k[:, None, None, None], rtol=1e-6)
        assert len(conv.inputs) == (3 if with_bias else 2)  # a pure scale creates no bias
    else:
        assert conv.inputs[1].name == "w"  # a shift leaves the weight alone
        old_b = const_value(model.graph.nodes[0].inputs[2]) if with_bias else 0
        np.testing.assert_allclose(const_value(conv.inputs[2]), old_b - k, rtol=1e-6)
        assert ran.stats["biases_created"] == (0 if with_bias else 1)
    assert io_signature(ran.model) == io_signature(model)
    assert_same_outputs(model, ran.model, shapes={"x": (2, 3, 6, 6)})
    assert not run_pass("fold-batchnorm", ran.model).modified


CONV_SUB = """
    <ir_version: 9, opset_import: ["" : 18]>
    g (float[1,2,3,3] x{w_in}) => (float[1,2,3,3] y)
    <{w_init}float[2] b = {{0.25, -0.5}}, float[1,2,1,1] k = {{{k}}}>
    {{ c = Conv(x, w, b)  y = {follower} }}
"""
W22 = "float[2,2,1,1] w = {1.0, -2.0, 0.5, 3.0}, "


def _conv_sub(follower: str, k: str = "2.0, 3.0", weight_is_input: bool = False) -> Model:
    return parse(CONV_SUB.format(w_in=", float[2,2,1,1] w" if weight_is_input else "",
                                 w_init="" if weight_is_input else W22, k=k, follower=follower))


def test_constant_minus_the_output_negates_the_weight():
    model = _conv_sub("Sub(k, c)")
    ran = run_pass("fold-batchnorm", model)
    assert ran.stats["sub_folded"] == 1 and ops(ran.model) == ["Conv"]
    conv = ran.model.graph.nodes[0]
    np.testing.assert_array_equal(const_value(conv.inputs[1]).reshape(-1), [-1.0, 2.0, -0.5, -3.0])
    np.testing.assert_array_equal(const_value(conv.inputs[2]), [2.0 - 0.25, 3.0 + 0.5])
    assert_same_outputs(model, ran.model)


@pytest.mark.parametrize("follower", ["Div", "Sub"])
def test_div_and_sub_fold_into_gemm_and_grouped_conv_transpose(follower):
    r = _rng()
    gemm = with_weights(f"""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[N,3] x, float[5,3] w, float[5] c, float[1,5] k) => (float[N,5] y)
        {{ g = Gemm<transB = 1, beta = 0.5>(x, w, c)  y = {follower}(g, k) }}
    """, w=r.standard_normal((5, 3)).astype(np.float32), c=r.standard_normal(5).astype(np.float32),
        k=(0.5 + r.random((1, 5))).astype(np.float32))
    convt = with_weights(f"""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[N,4,5,5] x, float[4,3,3,3] w, float[6,1,1] k) => (float[N,6,7,7] y)
        {{ c = ConvTranspose<group = 2>(x, w)  y = {follower}(c, k) }}
    """, w=r.standard_normal((4, 3, 3, 3)).astype(np.float32), k=(0.5 + r.random((6, 1, 1))).astype(np.float32))
    for model, layer, shape in ((gemm, "Gemm", (4, 3)), (convt, "ConvTranspose", (2, 4, 5, 5))):
        ran = run_pass("fold-batchnorm", model)
        assert ran.stats[f"{follower.lower()}_folded"] == 1 and ops(ran.model) == [layer]
        assert_same_outputs(model, ran.model, shapes={"x": shape})


def test_a_bias_shift_needs_only_the_weights_shape():
    # The weight is a graph input (a user may feed it): a shift never touches it.
    model = _conv_sub("Sub(c, k)", weight_is_input=True)
    ran = run_pass("fold-batchnorm", model)
    assert ran.stats["sub_folded"] == 1 and ops(ran.model) == ["Conv"]
    assert ran.model.graph.nodes[0].inputs[1] is ran.model.graph.inputs[1]
    w = np.array([1.0, -2.0, 0.5, 3.0], np.float32).reshape(2, 2, 1, 1)
    feeds = {"x": _rng().standard_normal((1, 2, 3, 3)).astype(np.float32), "w": w}
    assert_same_outputs(model, ran.model, feeds)


@pytest.mark.parametrize("follower, k, weight_is_input, reason", [
    ("Div(k, c)", "2.0, 3.0", False, "divisor_not_constant"),  # k / y is not affine in y
    ("Div(c, k)", "2.0, 0.0", False, "divisor_has_zero"),
    ("Sub(k, c)", "2.0, 3.0", True, "weight_not_constant"),  # -y scales the weight
    ("Div(c, k)", "2.0, 3.0", True, "weight_not_constant"),
])
def test_div_and_sub_guards(follower, k, weight_is_input, reason):
    model = _conv_sub(follower, k=k, weight_is_input=weight_is_input)
    ran = run_pass("fold-batchnorm", model)
    assert not ran.modified and ran.stats[f"skipped_{reason}"] == 1
    assert ran.model.to_bytes() == model.to_bytes()


@pytest.mark.parametrize("op", ["Div", "Sub"])
def test_div_or_sub_that_is_not_per_channel_stays(op):
    model = _conv_chain([op], k=(0.5 + _rng().random((1, 1, 6, 1))).astype(np.float32))
    ran = run_pass("fold-batchnorm", model)
    assert not ran.modified and ran.stats["skipped_operand_not_per_channel"] == 1


def test_ir3_models_get_no_new_initializers():
    # IR < 4: every initializer must also be a graph input, so a folded weight has no home.
    model = parse("""
        <ir_version: 3, opset_import: ["" : 8]>
        g (float[1,2,3,3] x) => (float[1,2,3,3] y)
        { w = Constant<value = float[2,2,1,1] {1.0, -2.0, 0.5, 3.0}>()
          k = Constant<value = float[1,2,1,1] {2.0, 3.0}>()
          c = Conv(x, w)  y = Div(c, k) }
    """)
    ran = run_pass("fold-batchnorm", model)
    assert not ran.modified and ran.stats["skipped_ir3_no_new_initializers"] == 1


# ---- subgraphs -------------------------------------------------------------------------


def test_folds_inside_an_if_branch_with_an_outer_weight():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (bool c, float[1,2,3,3] x) => (float[1,2,3,3] y, float[1,2,3,3] z)
        <float[2,2,1,1] w = {1.0, -2.0, 0.5, 3.0}, float[1,2,1,1] k = {2.0, 3.0}>
        {
            z = Conv(x, w)
            y = If(c) <
                then_branch = t () => (float[1,2,3,3] a) { a0 = Conv(x, w)  a = Mul(a0, k) },
                else_branch = e () => (float[1,2,3,3] b) { b = Neg(x) }
            >
        }
    """)
    ran = run_pass("fold-batchnorm", model)
    assert ran.stats["mul_folded"] == 1
    then_g = next(g for g in iter_graphs(ran.model.graph) if g.name == "t")
    assert [n.op for n in then_g.nodes] == ["Conv"] and then_g.outputs[0] is then_g.nodes[0].outputs[0]
    assert ran.model.graph.nodes[0].inputs[1].name == "w"  # the outer Conv still reads w
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 3)).astype(np.float32)
    for flag in (True, False):
        assert_same_outputs(model, ran.model, {"c": np.array(flag), "x": x})
    assert io_signature(ran.model) == io_signature(model)


def test_div_and_sub_fold_inside_an_if_branch():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (bool c, float[1,2,3,3] x) => (float[1,2,3,3] y)
        <float[2,2,1,1] w = {1.0, -2.0, 0.5, 3.0}, float[1,2,1,1] k = {2.0, 4.0}>
        {
            y = If(c) <
                then_branch = t () => (float[1,2,3,3] a) { a0 = Conv(x, w)  a1 = Div(a0, k)  a = Sub(a1, k) },
                else_branch = e () => (float[1,2,3,3] b) { b0 = Conv(x, w)  b = Sub(k, b0) }
            >
        }
    """)
    ran = run_pass("fold-batchnorm", model)
    assert (ran.stats["div_folded"], ran.stats["sub_folded"]) == (1, 2)
    for name in ("t", "e"):
        body = next(g for g in iter_graphs(ran.model.graph) if g.name == name)
        assert [n.op for n in body.nodes] == ["Conv"] and body.outputs[0] is body.nodes[0].outputs[0]
    assert {i.name for i in ran.model.to_proto().graph.initializer} == set()  # w and k now unread
    x = _rng().standard_normal((1, 2, 3, 3)).astype(np.float32)
    for flag in (True, False):
        assert_same_outputs(model, ran.model, {"c": np.array(flag), "x": x})
    assert io_signature(ran.model) == io_signature(model)


def test_control_flow_builder_is_left_equivalent():
    model = Model.from_proto(builders.control_flow())
    ran = run_pass("fold-batchnorm", model)
    assert not ran.modified
    assert io_signature(ran.model) == io_signature(model)


# ---- real models (tests/conformance holds fold-batchnorm alone on them to the contract) --


@pytest.mark.parametrize("name, expect", [
    ("ppocr-cls", {"bn_folded": 35, "add_folded": 18}), ("ppocr-det", {"bn_folded": 3}), ("ppocr-rec", {"bn_folded": 6})])
def test_real_models_fold_their_batchnorms(name, expect):
    model = Model.load(real_model(name))
    ran = run_pass("fold-batchnorm", model)
    for key, value in expect.items():
        assert ran.stats[key] == value
    assert "BatchNormalization" not in ops(ran.model)
    assert node_count(ran.model) == node_count(model) - ran.stats["nodes_removed"]


def test_cnn_builder_folds_every_batchnorm():
    model = Model.from_proto(builders.cnn())
    ran = run_pass("fold-batchnorm", model)
    assert ran.stats["bn_folded"] == 4 and "BatchNormalization" not in ops(ran.model)
    assert_same_outputs(model, ran.model, shapes={"input": (2, 3, 32, 32)})


@pytest.mark.parametrize("path", light_models(), ids=lambda p: p.stem)
def test_light_models_are_left_alone(path):
    # Their weights are ConstantOfShape outputs (not constants) until folded.
    model = Model.load(path)
    ran = run_pass("fold-batchnorm", model)
    assert not ran.modified
    if "BatchNormalization" in ops(model):
        assert ran.stats["skipped_weight_not_constant"] > 0
    assert ran.model.to_bytes() == model.to_bytes()


def test_digits_classifier_keeps_its_accuracy():
    proto = digits_mlp()
    ran = run_pass("fold-batchnorm", Model.from_proto(proto))
    assert not ran.modified and ran.stats["skipped_matmul_has_no_bias"] == 3
    _, x_test, _, y_test = digits_split()
    assert accuracy(ran.model.to_proto(), x_test, y_test) == accuracy(proto, x_test, y_test)


def test_silero_vad_is_left_alone():
    model = Model.load(real_model("silero-vad"))
    ran = run_pass("fold-batchnorm", model)
    assert not ran.modified  # its Conv layers feed Relu, not an affine node
    assert ran.model.to_bytes() == model.to_bytes()
