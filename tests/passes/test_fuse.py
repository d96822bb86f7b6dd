"""fuse: each named rewrite fires, declines with its reason, keeps the graph's I/O, is
idempotent and equivalent on onnxruntime, works inside subgraphs and on the real models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from models import builders
from models.digits import accuracy, digits_mlp, digits_split
from onnxopt import Model
from onnxopt.errors import PipelineError
from onnxopt.framework import get_pass
from onnxopt.graph import const_value
from tests.helpers import assert_same_outputs, io_signature, node_count, ops, parse, real_model, run_pass

F32 = np.float32


def _x(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(F32)


def _check(model: Model, ran, feeds: dict) -> None:
    assert io_signature(ran.model) == io_signature(model)
    assert_same_outputs(model, ran.model, feeds)
    again = run_pass("fuse", ran.model)
    assert not again.modified


# ---- conv-add --------------------------------------------------------------------------

CONV = """
    <ir_version: 9, opset_import: ["" : 18]>
    g (float[N,2,5,5] x) => (float[N,3,5,5] y)
    <float[3,2,3,3] w = {{{w}}}, float[{shape}] c = {{{c}}}{extra}>
    {{ v = Conv<pads = [1, 1, 1, 1]>({inputs})  y = Add(v, c) }}
"""


def _conv(shape="1,3,1,1", c="0.5, -1.0, 2.0", bias=False) -> Model:
    w = ", ".join(str(v) for v in np.round(np.linspace(-1, 1, 54), 3))
    extra = ", float[3] b = {0.1, 0.2, 0.3}" if bias else ""
    return parse(CONV.format(w=w, shape=shape, c=c, extra=extra, inputs="x, w, b" if bias else "x, w"))


def test_conv_add_becomes_the_bias():
    model = _conv()
    ran = run_pass("fuse", model)
    assert ran.stats["fused_conv_add"] == 1 and ops(ran.model) == ["Conv"]
    conv = ran.model.graph.nodes[0]
    assert const_value(conv.inputs[2]).tolist() == [0.5, -1.0, 2.0]
    assert conv.outputs[0].name == "y"
    assert not {"c"} & {i.name for i in ran.model.to_proto().graph.initializer}
    _check(model, ran, {"x": _x(2, 2, 5, 5)})


def test_conv_add_adds_to_an_existing_bias_and_broadcasts_a_scalar():
    model = _conv(shape="1", c="0.25", bias=True)
    ran = run_pass("fuse", model)
    assert ran.stats["fused_conv_add"] == 1
    assert np.allclose(const_value(ran.model.graph.nodes[0].inputs[2]), [0.35, 0.45, 0.55])
    _check(model, ran, {"x": _x(1, 2, 5, 5)})


def test_conv_add_declines_a_constant_that_is_not_per_channel():
    model = _conv(shape="1,3,1,5", c=", ".join(["1.0"] * 15))
    ran = run_pass("fuse", model)
    assert not ran.modified and ran.stats["kept_conv_add_not_per_channel"] == 1


def test_conv_add_declines_a_shared_conv_output():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[N,1,4,4] x) => (float[N,1,4,4] y, float[N,1,4,4] v)
        <float[1,1,1,1] w = {2.0}, float[1] c = {1.0}>
        { v = Conv(x, w)  y = Add(v, c) }
    """)
    ran = run_pass("fuse", model)
    assert not ran.modified and ran.stats["kept_conv_add_conv_output_shared"] == 1


def test_conv_transpose_add():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[N,2,3,3] x) => (float[N,4,6,6] y)
        <float[2,2,2,2] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0},
         float[4,1,1] c = {1.0, 2.0, 3.0, 4.0}>
        { v = ConvTranspose<strides = [2, 2], group = 2>(x, w)  y = Add(c, v) }
    """)
    ran = run_pass("fuse", model)
    assert ran.stats["fused_conv_add"] == 1 and ops(ran.model) == ["ConvTranspose"]
    _check(model, ran, {"x": _x(2, 2, 3, 3)})


# ---- gemm-add and matmul-add ----------------------------------------------------------


def test_gemm_add_merges_into_c():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[N,3] x) => (float[N,2] y)
        <float[3,2] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}, float[2] b = {0.5, 0.5}, float[1,2] c = {1.0, -1.0}>
        { v = Gemm<beta = 2.0>(x, w, b)  y = Add(v, c) }
    """)
    ran = run_pass("fuse", model)
    assert ran.stats["fused_gemm_add"] == 1 and ops(ran.model) == ["Gemm"]
    gemm = ran.model.graph.nodes[0]
    assert gemm.attrs["beta"] == 1.0 and const_value(gemm.inputs[2]).tolist() == [[2.0, 0.0]]
    _check(model, ran, {"x": _x(4, 3)})


def test_bias_folds_go_through_the_shared_affine_fold(monkeypatch):
    """conv-add and gemm-add are onnxopt.affine's fold with scale 1: the same match and
    rewrite as fold-batchnorm's, so both passes leave the same bias."""
    from onnxopt.affine import AffineFolder

    calls = []
    real_apply = AffineFolder.apply
    monkeypatch.setattr(AffineFolder, "apply", lambda self, fold: calls.append(
        (fold.layer.op, fold.kind)) or real_apply(self, fold))
    conv, gemm = _conv(bias=True), parse(GEMM.format(c="float[1,2] c = {1.0, -1.0}", rows="N"))
    for model, feeds in ((conv, {"x": _x(2, 2, 5, 5)}), (gemm, {"x": _x(4, 3)})):
        fused = run_pass("fuse", model)
        folded = run_pass("fold-batchnorm", model)
        assert ops(fused.model) == ops(folded.model) == [model.graph.nodes[0].op]
        assert np.array_equal(const_value(fused.model.graph.nodes[0].inputs[2]),
                              const_value(folded.model.graph.nodes[0].inputs[2]))
        _check(model, fused, feeds)
    assert calls == [("Conv", "add"), ("Conv", "add"), ("Gemm", "add"), ("Gemm", "add")]


GEMM = """
    <ir_version: 9, opset_import: ["" : 18]>
    g (float[{rows},3] x) => (float[{rows},2] y)
    <float[3,2] w = {{1.0, 2.0, 3.0, 4.0, 5.0, 6.0}}, {c}>
    {{ v = Gemm(x, w)  y = Add(v, c) }}
"""


def test_gemm_add_reads_a_constant_as_c_when_there_is_none():
    model = parse(GEMM.format(c="float[2] c = {0.5, -1.0}", rows="N"))
    ran = run_pass("fuse", model)
    assert ran.stats["fused_gemm_add"] == 1 and ops(ran.model) == ["Gemm"]
    assert ran.model.graph.nodes[0].inputs[2].name == "c"  # no copy
    _check(model, ran, {"x": _x(3, 3)})


def test_gemm_add_takes_a_constant_that_varies_along_known_rows_only():
    rows = "float[4,2] c = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}"
    known = parse(GEMM.format(c=rows, rows="4"))
    ran = run_pass("fuse", known)
    assert ran.stats["fused_gemm_add"] == 1 and ops(ran.model) == ["Gemm"]
    _check(known, ran, {"x": _x(4, 3)})
    dynamic = parse(GEMM.format(c=rows, rows="N"))
    ran = run_pass("fuse", dynamic)
    assert not ran.modified and ran.stats["kept_gemm_add_broadcast_changes_shape"] == 1


MATMUL = """
    <ir_version: 9, opset_import: ["" : 18]>
    g (float[{xs}] x) => (float[{ys}] y)
    <float[3,2] w = {{1.0, 2.0, 3.0, 4.0, 5.0, 6.0}}, float[2] b = {{0.5, -0.5}}>
    {{ v = MatMul(x, w)  y = Add(v, b) {tail} }}
"""


def test_matmul_add_2d_becomes_gemm():
    model = parse(MATMUL.format(xs="N,3", ys="N,2", tail=""))
    ran = run_pass("fuse", model)
    assert ran.stats["fused_matmul_add"] == 1 and ops(ran.model) == ["Gemm"]
    assert ran.model.graph.nodes[0].outputs[0].name == "y"
    _check(model, ran, {"x": _x(5, 3)})


def test_matmul_add_3d_stays_and_gets_no_reshape():
    model = parse(MATMUL.format(xs="N,4,3", ys="N,4,2", tail=""))
    ran = run_pass("fuse", model)
    assert not ran.modified and ran.stats["kept_matmul_add_not_2d"] == 1
    assert ops(ran.model) == ["MatMul", "Add"]


def test_matmul_add_in_front_of_gelu_is_left_to_onnxruntime():
    tail = ("s = Constant<value = float {1.41421}>()  d = Div(y0, s)  e = Erf(d)  "
            "one = Constant<value = float {1.0}>()  p = Add(e, one)  y = Mul(y0, p)")
    model = parse(MATMUL.format(xs="N,3", ys="N,2", tail=tail).replace("y = Add(v, b)", "y0 = Add(v, b)"))
    ran = run_pass("fuse", model)
    assert ran.stats["kept_matmul_add_bias_gelu"] == 1 and "MatMul" in ops(ran.model)


def test_digits_classifier_becomes_gemms_and_keeps_its_accuracy():
    model = Model.from_proto(digits_mlp())
    ran = run_pass("fuse", model)
    assert ops(ran.model) == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    _, x_test, _, y_test = digits_split()
    assert accuracy(ran.model, x_test, y_test) == accuracy(model, x_test, y_test) > 0.9
    _check(model, ran, {"input": x_test[:32]})


# ---- transpose-transpose and reshape-reshape -----------------------------------------


def test_transposes_compose():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2,3,4] x) => (float[4,2,3] y)
        { a = Transpose<perm = [1, 0, 2]>(x)  y = Transpose<perm = [2, 1, 0]>(a) }
    """)
    ran = run_pass("fuse", model)
    assert ran.stats["fused_transpose_transpose"] == 1 and ops(ran.model) == ["Transpose"]
    assert ran.model.graph.nodes[0].attrs["perm"] == [2, 0, 1]
    _check(model, ran, {"x": _x(2, 3, 4)})


def test_transposes_that_cancel_disappear_and_the_output_keeps_its_name():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[N,3,4] x) => (float[N,3,4] y)
        { r = Relu(x)  a = Transpose<perm = [0, 2, 1]>(r)  y = Transpose<perm = [0, 2, 1]>(a) }
    """)
    ran = run_pass("fuse", model)
    assert ops(ran.model) == ["Relu"] and ran.model.graph.nodes[0].outputs[0].name == "y"
    _check(model, ran, {"x": _x(2, 3, 4)})


def test_reshape_of_a_reshape_reads_the_data():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2,3,4] x) => (float[4,6] y)
        { s1 = Constant<value = int64[2] {6, 4}>()  a = Reshape(x, s1)
          s2 = Constant<value = int64[2] {4, -1}>()  y = Reshape(a, s2) }
    """)
    ran = run_pass("fuse", model)
    assert ran.stats["fused_reshape_reshape"] == 1 and ran.stats["nodes_removed"] == 2
    assert ops(ran.model) == ["Constant", "Reshape"]  # the inner Reshape and its target are gone
    _check(model, ran, {"x": _x(2, 3, 4)})


def test_reshape_with_copy_dims_is_kept():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2,3,4] x) => (float y)
        { f = Flatten<axis = 2>(x)  s2 = Constant<value = int64[2] {0, -1}>()  y = Reshape(f, s2) }
    """)
    ran = run_pass("fuse", model)
    assert not ran.modified and ran.stats["kept_reshape_reshape_target_copies_dims"] == 1


# ---- hardswish ---------------------------------------------------------------------------

HSWISH = """
    <ir_version: 9, opset_import: ["" : {opset}]>
    g (float[N,4] x) => (float[N,4] y)
    <float three = {{3.0}}, float zero = {{0.0}}, float six = {{6.0}}>
    {{ a = Add(x, three)  c = Clip(a, zero, six)  {tail} }}
"""


@pytest.mark.parametrize("opset,tail,expected", [
    (13, "m = Mul(x, c)  y = Div(m, six)", ["HardSigmoid", "Mul"]),
    (13, "d = Div(c, six)  y = Mul(x, d)", ["HardSigmoid", "Mul"]),
    (14, "m = Mul(c, x)  y = Div(m, six)", ["HardSwish"]),
])
def test_hardswish(opset, tail, expected):
    model = parse(HSWISH.format(opset=opset, tail=tail))
    ran = run_pass("fuse", model)
    assert ran.stats["fused_hardswish"] == 1 and ops(ran.model) == expected
    assert not ran.model.to_proto().graph.initializer
    x = np.linspace(-5, 5, 40, dtype=F32).reshape(10, 4)  # both kinks of the curve
    _check(model, ran, {"x": x})


def test_hardswish_declines_a_shared_intermediate():
    model = parse(HSWISH.format(opset=13, tail="m = Mul(x, c)  y = Div(m, six)").replace(
        "=> (float[N,4] y)", "=> (float[N,4] y, float[N,4] c)"))
    ran = run_pass("fuse", model)
    assert not ran.modified and ran.stats["kept_hardswish_intermediate_shared"] == 1


def test_hardswish_needs_the_right_constants():
    model = parse(HSWISH.format(opset=13, tail="m = Mul(x, c)  y = Div(m, three)"))
    ran = run_pass("fuse", model)
    assert not ran.modified


# ---- options, subgraphs, IR 3, real models -------------------------------------------


def test_skip_option_and_its_errors():
    model = parse(HSWISH.format(opset=13, tail="m = Mul(x, c)  y = Div(m, six)"))
    assert not run_pass("fuse", model, skip="hardswish").modified
    with pytest.raises(PipelineError, match="unknown rewrite"):
        get_pass("fuse")(skip="fold-everything")


def test_fuses_inside_if_branches():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (bool b, float[2,3] x) => (float[2,2] y)
        <float[3,2] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}, float[2] c = {0.5, -0.5}>
        { y = If(b) <then_branch = t () => (float[2,2] p) { v = MatMul(x, w)  p = Add(v, c) },
                     else_branch = e () => (float[2,2] q) { u = MatMul(x, w)  q = Sub(u, c) }> }
    """)
    ran = run_pass("fuse", model)
    assert ran.stats["fused_matmul_add"] == 1
    assert [n.op for n in ran.model.graph.nodes[0].attrs["then_branch"].nodes] == ["Gemm"]
    for cond in (True, False):
        assert_same_outputs(model, ran.model, {"b": np.array(cond), "x": _x(2, 3)})


def test_no_fusion_across_a_branch_boundary():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (bool b, float[1,1,2,2] x) => (float[1,1,2,2] y)
        <float[1,1,1,1] w = {2.0}, float[1] c = {1.0}>
        { v = Conv(x, w)
          y = If(b) <then_branch = t () => (float[1,1,2,2] p) { p = Add(v, c) },
                     else_branch = e () => (float[1,1,2,2] q) { q = Neg(v) }> }
    """)
    ran = run_pass("fuse", model)
    assert not ran.modified  # the Conv runs on both paths; its bias belongs to one branch only
    for cond in (True, False):
        assert_same_outputs(model, ran.model, {"b": np.array(cond), "x": _x(1, 1, 2, 2)})


def test_ir3_models_get_no_new_initializers():
    nodes = [helper.make_node("Conv", ["x", "w"], ["v"]), helper.make_node("Add", ["v", "c"], ["y"])]
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 1, 1], [2.0]),
             helper.make_tensor("c", TensorProto.FLOAT, [1, 1, 1, 1], [1.0])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])]
        + [helper.make_tensor_value_info(i.name, TensorProto.FLOAT, list(i.dims)) for i in inits],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    proto.ir_version = 3
    model = Model.from_proto(proto)
    ran = run_pass("fuse", model)
    assert not ran.modified  # w and c are graph inputs: not constant, and no new initializer may appear
    assert io_signature(ran.model) == io_signature(model)


def test_builders_are_equivalent():
    for name, shape in (("cnn", (2, 3, 32, 32)), ("mlp", (3, 64)), ("control_flow", (2, 8))):
        model = Model.from_proto(builders.build(name))
        ran = run_pass("fuse", model)
        assert io_signature(ran.model) == io_signature(model)
        assert_same_outputs(model, ran.model, shapes={next(iter(io_signature(model)))[0]: shape})
        if name == "mlp":
            assert ran.stats["fused_matmul_add"] == 3


@pytest.mark.parametrize("name,hardswish", [("ppocr-det", 24), ("ppocr-rec", 28), ("ppocr-cls", 18)])
def test_real_models_fuse_their_hardswish_once_folded(name, hardswish):
    # tests/conformance holds fuse alone on the real models to the contract.
    model = Model.load(real_model(name))
    folded = run_pass("fold-constants", model).model  # Paddle's operands are Constant nodes
    ran = run_pass("fuse", folded)
    assert ran.stats["fused_hardswish"] == hardswish
    assert node_count(ran.model) < node_count(folded)
    onnx.checker.check_model(ran.model.to_proto(), full_check=True)


def test_custom_domain_nodes_are_not_fused():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18, "com.vendor" : 1]>
        g (float[N,3] x) => (float[N,2] y)
        <float[3,2] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}, float[2] b = {0.5, -0.5}>
        { v = com.vendor.MatMul(x, w)  y = Add(v, b) }
    """)
    ran = run_pass("fuse", model)
    assert not ran.modified and ops(ran.model) == ["MatMul", "Add"]
    assert ran.model.graph.nodes[0].domain == "com.vendor"
