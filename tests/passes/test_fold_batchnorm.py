"""fold-batchnorm: fires (Conv, ConvTranspose, Gemm, MatMul; BN, Mul, Add), does not
fire (one test per guard), idempotent, equivalent, subgraphs, I/O kept, real models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import builders
from models.digits import accuracy, digits_mlp, digits_split
from models.fetch import light_models
from onnxopt import Model
from onnxopt.model import iter_graphs
from tests.helpers import assert_same_outputs, io_signature, node_count, ops, parse, real_model, run_pass

F = TensorProto.FLOAT


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


def _bn_inits(c: int, prefix: str = "bn") -> list[onnx.TensorProto]:
    r = _rng()
    return [numpy_helper.from_array((1 + 0.3 * r.standard_normal(c)).astype(np.float32), f"{prefix}_s"),
            numpy_helper.from_array((0.2 * r.standard_normal(c)).astype(np.float32), f"{prefix}_b"),
            numpy_helper.from_array((0.2 * r.standard_normal(c)).astype(np.float32), f"{prefix}_m"),
            numpy_helper.from_array((0.5 + r.random(c)).astype(np.float32), f"{prefix}_v")]


def _model(nodes, inputs, outputs, inits, opset: int = 18) -> Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(proto)
    return Model.from_proto(proto)


def _vi(name, shape, elem=F):
    return helper.make_tensor_value_info(name, elem, shape)


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_folds_into_conv_transpose_whatever_its_groups(group, bias):
    r = _rng()
    cin, cout = 4, 6
    w = r.standard_normal((cin, cout // group, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")] + _bn_inits(cout)
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(r.standard_normal(cout).astype(np.float32), "b"))
        inputs.append("b")
    nodes = [helper.make_node("ConvTranspose", inputs, ["c"], group=group, strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["y"])]
    model = _model(nodes, [_vi("x", ["N", cin, 5, 5])], [_vi("y", ["N", cout, 11, 11])], inits)
    ran = run_pass("fold-batchnorm", model)
    assert ran.stats["bn_folded"] == 1 and ran.stats["biases_created"] == (0 if bias else 1)
    assert ops(ran.model) == ["ConvTranspose"]
    assert_same_outputs(model, ran.model, shapes={"x": (2, cin, 5, 5)})


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), ()], ids=["no-C", "C[N]", "C[1,N]", "C-scalar"])
@pytest.mark.parametrize("follower", ["BatchNormalization", "Mul", "Add"])
def test_folds_into_gemm(trans_b, c_shape, follower):
    r = _rng()
    w = r.standard_normal((5, 3) if trans_b else (3, 5)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    gemm_in = ["x", "w"]
    if c_shape is not None:
        inits.append(numpy_helper.from_array(r.standard_normal(c_shape).astype(np.float32), "c"))
        gemm_in.append("c")
    nodes = [helper.make_node("Gemm", gemm_in, ["g"], transB=trans_b, alpha=0.5, beta=2.0)]
    if follower == "BatchNormalization":
        inits += _bn_inits(5)
        nodes.append(helper.make_node(follower, ["g", "bn_s", "bn_b", "bn_m", "bn_v"], ["y"]))
    else:
        inits.append(numpy_helper.from_array(r.standard_normal((1, 5)).astype(np.float32), "k"))
        nodes.append(helper.make_node(follower, ["k", "g"], ["y"]))  # constant first: commutes
    model = _model(nodes, [_vi("x", ["N", 3])], [_vi("y", ["N", 5])], inits)
    ran = run_pass("fold-batchnorm", model)
    assert ran.modified and ops(ran.model) == ["Gemm"]
    assert_same_outputs(model, ran.model, shapes={"x": (4, 3)})


def test_folds_per_column_mul_into_matmul_and_leaves_its_bias_add():
    r = _rng()
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Mul", ["m", "k"], ["s"]),
         helper.make_node("Add", ["s", "b"], ["y"])],
        [_vi("x", ["N", "T", 3])], [_vi("y", ["N", "T", 4])],
        [numpy_helper.from_array(r.standard_normal((3, 4)).astype(np.float32), "w"),
         numpy_helper.from_array(r.standard_normal(4).astype(np.float32), "k"),
         numpy_helper.from_array(r.standard_normal(4).astype(np.float32), "b")])
    ran = run_pass("fold-batchnorm", model)
    assert ran.stats["mul_folded"] == 1 and ran.stats["skipped_matmul_has_no_bias"] == 1
    assert ops(ran.model) == ["MatMul", "Add"]
    assert_same_outputs(model, ran.model, shapes={"x": (2, 5, 3)})


def test_folds_batchnorm_after_a_2d_matmul_leaving_an_add():
    r = _rng()
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["m"]),
         helper.make_node("BatchNormalization", ["m", "bn_s", "bn_b", "bn_m", "bn_v"], ["y"])],
        [_vi("x", ["N", 3])], [_vi("y", ["N", 4])],
        [numpy_helper.from_array(r.standard_normal((3, 4)).astype(np.float32), "w")] + _bn_inits(4))
    ran = run_pass("fold-batchnorm", model)
    assert ran.stats["bn_folded"] == 1
    assert ops(ran.model) == ["MatMul", "Add"]
    assert_same_outputs(model, ran.model, shapes={"x": (6, 3)})


def test_batchnorm_after_a_3d_matmul_is_not_per_column():
    r = _rng()
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["m"]),
         helper.make_node("BatchNormalization", ["m", "bn_s", "bn_b", "bn_m", "bn_v"], ["y"])],
        [_vi("x", ["N", 4, 3])], [_vi("y", ["N", 4, 4])],
        [numpy_helper.from_array(r.standard_normal((3, 4)).astype(np.float32), "w")] + _bn_inits(4))
    ran = run_pass("fold-batchnorm", model)
    assert not ran.modified and ran.stats["skipped_bn_axis_not_channels"] == 1


def test_folds_a_whole_chain_into_one_conv():
    model = Model.from_proto(_conv_chain(["BatchNormalization", "Mul", "Add"]))
    ran = run_pass("fold-batchnorm", model)
    assert (ran.stats["bn_folded"], ran.stats["mul_folded"], ran.stats["add_folded"]) == (1, 1, 1)
    assert ops(ran.model) == ["Conv", "Relu"]
    assert io_signature(ran.model) == io_signature(model)
    assert_same_outputs(model, ran.model, shapes={"x": (2, 3, 6, 6)})


def _conv_chain(followers: list[str], k_shape=(1, 4, 1, 1), with_bias=True, constant_nodes=False) -> onnx.ModelProto:
    r = _rng()
    inits = [numpy_helper.from_array(r.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(r.standard_normal(4).astype(np.float32), "b")] + _bn_inits(4)
    inits.append(numpy_helper.from_array((1 + r.standard_normal(k_shape)).astype(np.float32), "k"))
    nodes = [helper.make_node("Conv", ["x", "w", "b"] if with_bias else ["x", "w"], ["t0"], pads=[1, 1, 1, 1])]
    for i, op in enumerate(followers):
        ins = [f"t{i}", "bn_s", "bn_b", "bn_m", "bn_v"] if op == "BatchNormalization" else [f"t{i}", "k"]
        nodes.append(helper.make_node(op, ins, [f"t{i + 1}"]))
    nodes.append(helper.make_node("Relu", [f"t{len(followers)}"], ["y"]))
    if constant_nodes:  # Paddle style: every weight a Constant node
        nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in inits] + nodes
        inits = []
    graph = helper.make_graph(nodes, "chain", [_vi("x", ["N", 3, 6, 6])], [_vi("y", ["N", 4, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_constant_node_weights_fold_and_their_nodes_go():
    model = Model.from_proto(_conv_chain(["BatchNormalization"], with_bias=False, constant_nodes=True))
    ran = run_pass("fold-batchnorm", model)
    assert ran.stats["bn_folded"] == 1 and ran.stats["biases_created"] == 1
    assert ops(ran.model) == ["Constant", "Constant", "Conv", "Relu"]  # b and k were never read by it
    assert ran.stats["nodes_removed"] == 1 + 5  # the BN and the Constant nodes of w and its 4 params
    assert_same_outputs(model, ran.model, shapes={"x": (1, 3, 6, 6)})


def test_is_idempotent():
    model = Model.from_proto(_conv_chain(["BatchNormalization", "Mul"]))
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
    model = Model.from_proto(_conv_chain(["Mul"], k_shape=k_shape))
    ran = run_pass("fold-batchnorm", model)
    assert not ran.modified and ran.stats[f"skipped_{reason}"] == 1


def test_scalar_mul_folds():
    model = Model.from_proto(_conv_chain(["Mul"], k_shape=()))
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


def test_operand_that_is_not_constant_stays():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[1,2,3,3] x, float[1,2,1,1] k) => (float[1,2,3,3] y)
        <float[2,2,1,1] w = {1.0, -2.0, 0.5, 3.0}>
        { c = Conv(x, w)  y = Mul(c, k) }
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


def test_control_flow_builder_is_left_equivalent():
    model = Model.from_proto(builders.control_flow())
    ran = run_pass("fold-batchnorm", model)
    assert not ran.modified
    assert io_signature(ran.model) == io_signature(model)


# ---- real models -------------------------------------------------------------------------


@pytest.mark.parametrize("name, expect", [
    ("ppocr-cls", {"bn_folded": 35}), ("ppocr-det", {"bn_folded": 3}), ("ppocr-rec", {"bn_folded": 6})])
def test_real_models_fold_their_batchnorms(name, expect):
    model = Model.load(real_model(name))
    ran = run_pass("fold-batchnorm", model)
    for key, value in expect.items():
        assert ran.stats[key] == value
    assert "BatchNormalization" not in ops(ran.model)
    assert node_count(ran.model) == node_count(model) - ran.stats["nodes_removed"]
    assert io_signature(ran.model) == io_signature(model)
    shapes = {"x": (1, 3, 48, 192)} if name != "ppocr-det" else {"x": (1, 3, 96, 128)}
    assert_same_outputs(model, ran.model, shapes=shapes, rtol=1e-3, atol=1e-4)
    assert not run_pass("fold-batchnorm", ran.model).modified


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


def test_silero_vad_is_left_equivalent():
    from tests.helpers import silero_feeds

    model = Model.load(real_model("silero-vad"))
    ran = run_pass("fold-batchnorm", model)
    assert not ran.modified  # its Conv layers feed Relu, not an affine node
    assert ran.model.to_bytes() == model.to_bytes()
    assert_same_outputs(model, ran.model, silero_feeds(16000))
