"""fold-constants: fires, each guard holds, idempotent, equivalent, subgraphs, I/O kept,
and the peers' failures (inflated files, frozen dynamic shapes, trusted declarations,
custom domains, IR 3 inputs) do not happen here."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import builders
from models.digits import accuracy, digits_split
from models.fetch import light_models
from onnxopt import Model, PassManager
from onnxopt.errors import PipelineError
from onnxopt.framework import get_pass, parse_pipeline
from onnxopt.graph import const_value
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

F32 = np.float32


def _initializers(model: Model) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.to_proto().graph.initializer}


def test_folds_a_constant_chain_into_one_initializer():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y)
        <float[2] a = {1.0, 2.0}, float[2] b = {3.0, 4.0}>
        { s = Add(a, b)  t = Mul(s, a)  y = Add(x, t) }
    """)
    ran = run_pass("fold-constants", model)
    assert ran.modified
    assert ops(ran.model) == ["Add"]
    assert ran.stats["folded"] == 2 and ran.stats["constants_created"] == 1
    assert ran.stats["bytes_created"] == 8 and ran.stats["initializers_released"] == 2
    inits = _initializers(ran.model)
    assert list(inits) == ["t"] and inits["t"].tolist() == [4.0, 12.0]
    assert io_signature(ran.model) == io_signature(model)
    assert_same_outputs(model, ran.model)


def test_does_not_fire_without_constant_inputs():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y) <float[2] w = {1.0, 2.0}> { r = Relu(x)  y = Add(r, w) }
    """)
    ran = run_pass("fold-constants", model)
    assert not ran.modified
    assert ran.stats["folded"] == 0 and ran.stats["nodes_removed"] == 0
    assert ran.model.to_bytes() == model.to_bytes()


def test_constant_nodes_become_initializers():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y)
        { w = Constant<value = float[2] {1.0, 2.0}>()  y = Mul(x, w) }
    """)
    ran = run_pass("fold-constants", model)
    assert ops(ran.model) == ["Mul"] and ran.stats["constant_nodes"] == 1
    assert _initializers(ran.model)["w"].tolist() == [1.0, 2.0]
    assert_same_outputs(model, ran.model)
    kept = run_pass("fold-constants", model, constant_nodes=False)
    assert not kept.modified and ops(kept.model) == ["Constant", "Mul"]


def test_is_idempotent_on_the_builders():
    for name in ("cnn", "mlp", "control_flow", "dead_branches"):
        model = Model.from_proto(builders.build(name))
        once = run_pass("fold-constants", model)
        twice = run_pass("fold-constants", once.model)
        assert not twice.modified, name
        assert twice.model.to_bytes() == once.model.to_bytes()
        assert_same_outputs(model, once.model, shapes={"input": (2, 3, 32, 32)} if name == "cnn" else
                            {"input": (2, 3, 16, 16)} if name == "dead_branches" else None)


# ---- shapes ---------------------------------------------------------------------------

SHAPE_CHAIN = """
    <ir_version: 9, opset_import: ["" : 13]>
    g (float[N,3,H,W] x) => (float[N,?] y)
    {
        zero = Constant<value = int64[1] {0}>()
        one = Constant<value = int64[1] {1}>()
        minus = Constant<value = int64[1] {-1}>()
        s = Shape(x)
        n = Gather<axis = 0>(s, zero)
        c = Gather<axis = 0>(s, one)
        target = Concat<axis = 0>(n, c, minus)
        y = Reshape(x, target)
    }
"""


def test_shape_chain_becomes_a_copy_target_and_dynamic_dims_stay_dynamic():
    model = parse(SHAPE_CHAIN)
    ran = run_pass("fold-constants", model)
    assert ops(ran.model) == ["Reshape"]
    assert ran.stats["shape_folded"] == 1  # the channel count: static
    assert ran.stats["reshape_targets"] == 1
    target = ran.model.graph.nodes[0].inputs[1]
    assert const_value(target).tolist() == [0, 3, -1]  # 0: copy the batch, still dynamic
    assert io_signature(ran.model) == io_signature(model)
    rng = np.random.default_rng(0)
    for shape in [(1, 3, 4, 5), (3, 3, 2, 7)]:
        assert_same_outputs(model, ran.model, {"x": rng.standard_normal(shape).astype(F32)})


def test_shape_of_a_dynamic_tensor_is_not_frozen():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[N,3] x) => (int64[2] s, int64[1] n) { s = Shape(x)  n = Shape<start = 0, end = 1>(x) }
    """)
    ran = run_pass("fold-constants", model)
    assert not ran.modified and ops(ran.model) == ["Shape", "Shape"]
    assert_same_outputs(model, ran.model, {"x": np.zeros((5, 3), F32)})


def test_static_dimensions_fold_with_shape_start_end():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[N,3,8] x) => (float[N,24] y)
        { tail = Shape<start = 1>(x)  p = ReduceProd<keepdims = 1>(tail)
          zero = Constant<value = int64[1] {0}>()  t = Concat<axis = 0>(zero, p)  y = Reshape(x, t) }
    """)
    ran = run_pass("fold-constants", model)
    assert ops(ran.model) == ["Reshape"]
    assert const_value(ran.model.graph.nodes[0].inputs[1]).tolist() == [0, 24]
    assert_same_outputs(model, ran.model, {"x": np.ones((2, 3, 8), F32)})


def test_declared_shapes_are_never_trusted():
    # The exporter declares r as [2, 4]; the graph computes [N, 4]. Folding Shape(r) from
    # the declaration would freeze N = 2 and break every other batch size.
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[N,4] x) => (float[N,4] y)
        <float[2,4] r>
        { r = Relu(x)  s = Shape(r)  y = Reshape(x, s) }
    """)
    ran = run_pass("fold-constants", model)
    assert ran.stats["shape_folded"] == 0 and ran.stats["reshape_targets"] == 0
    assert ops(ran.model) == ["Relu", "Shape", "Reshape"]
    assert_same_outputs(model, ran.model, {"x": np.ones((2, 4), F32)})


def test_dimensions_spelled_minus_one_or_question_mark_are_dynamic():
    proto = onnx.parser.parse_model("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[N,4] x) => (int64[2] s) { s = Shape(x) }
    """)
    proto.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    model = Model.from_proto(proto)
    ran = run_pass("fold-constants", model)
    assert not ran.modified


def test_shape_values_do_not_become_an_if_condition():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[4] x) => (float[4] y)
        {
            n = Size(x)
            four = Constant<value = int64 {4}>()
            c = Equal(n, four)
            y = If(c) <then_branch = t () => (float[4] a) { a = Relu(x) },
                       else_branch = e () => (float[4] b) { b = Neg(x) }>
        }
    """)
    ran = run_pass("fold-constants", model)
    assert ran.stats["skipped_if_condition"] == 1
    assert "Size" in ops(ran.model) and "Equal" in ops(ran.model)
    assert_same_outputs(model, ran.model)


RANGE_IN_A_BRANCH = """
    <ir_version: 9, opset_import: ["" : 18]>
    g (float[N,3] x, bool c) => (float[M] y)
    {
        s2 = Shape<start = 1>(x)
        y = If(c) <then_branch = t () => (float[M] a) {
                      zero = Constant<value = int64 {0}>()
                      one = Constant<value = int64 {1}>()
                      ai = Range(zero, s2, one)
                      a = Cast<to = 1>(ai)
                   },
                   else_branch = e () => (float[M] b) { b = ReduceSum<keepdims = 0>(x) }>
    }
"""
RANGE_FEEDS = {"x": np.ones((2, 3), np.float32), "c": np.array(True)}


def test_a_one_element_vector_feeding_range_stays_computed():
    """Range takes scalars; onnxruntime accepts a one-element vector computed from a shape,
    but refuses to load one stored where the Range is (here, inside the branch that reads
    it): the vector must keep coming from x's shape."""
    model = parse(RANGE_IN_A_BRANCH)
    ran = run_pass("fold-constants", model)
    assert ran.stats["skipped_range_operand_not_scalar"] == 1
    assert "Shape" in ops(ran.model)
    assert_same_outputs(model, ran.model, RANGE_FEEDS)


def test_default_keeps_a_range_in_a_branch_loadable():
    model = parse(RANGE_IN_A_BRANCH)
    out = Model.from_proto(model.to_proto())
    PassManager("default").run(out)
    assert "Shape" in ops(out)
    assert_same_outputs(model, out, RANGE_FEEDS)


# ---- size cap -------------------------------------------------------------------------


def test_size_limit_keeps_a_generated_tensor_unfolded():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[1000,1000] x) => (float[1000,1000] y)
        { shape = Constant<value = int64[2] {1000, 1000}>()
          big = ConstantOfShape<value = float[1] {1.0}>(shape)
          y = Add(x, big) }
    """)
    ran = run_pass("fold-constants", model)
    assert ran.stats["skipped_size_limit"] == 1 and ran.stats["folded"] == 0
    assert "ConstantOfShape" in ops(ran.model)
    assert len(ran.model.to_bytes()) < 4096  # not 4 MB of ones
    assert_same_outputs(model, ran.model)
    bigger = run_pass("fold-constants", model, size_limit=8 << 20, grow_limit=8 << 20)
    assert bigger.stats["folded"] == 1 and ops(bigger.model) == ["Add"]


def test_a_huge_result_is_refused_before_it_is_computed():
    # 40 GB of zeros: evaluating it first would exhaust memory.
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[100000,100000] x) => (float[100000,100000] y)
        { shape = Constant<value = int64[2] {100000, 100000}>()
          big = ConstantOfShape(shape)  y = Add(x, big) }
    """)
    ran = run_pass("fold-constants", model)
    assert ran.stats["skipped_size_limit"] == 1 and "ConstantOfShape" in ops(ran.model)


def test_a_result_no_larger_than_what_it_replaces_folds_above_the_limit():
    model = with_weights("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[N, 600] x, float[600, 600] w) => (float[N, 600] y)
        { wt = Transpose(w)  y = MatMul(x, wt) }
    """, w=(np.arange(360000, dtype=F32) / 1e5).reshape(600, 600))
    ran = run_pass("fold-constants", model)
    assert ran.stats["folded"] == 1 and ops(ran.model) == ["MatMul"]
    assert ran.model.summary().tensor_bytes == model.summary().tensor_bytes  # 1.44 MB in, 1.44 MB out
    assert_same_outputs(model, ran.model, {"x": np.ones((2, 600), F32)})



def _gates_model(shared: bool) -> Model:
    """An LSTM-style weight cut into three slices and joined again in another order (each
    slice above ``grow_limit``), then used by a MatMul; ``shared``: the weight is also read
    by a Mul, so the joined copy would be written beside it."""
    w = numpy_helper.from_array((np.arange(512 * 32, dtype=F32) / 1000).reshape(512, 32), "w")
    nodes, inits = [], [w]
    for k, (a, b) in enumerate([(0, 128), (384, 512), (128, 384)]):
        inits += [numpy_helper.from_array(np.array([a], np.int64), f"s{k}"),
                  numpy_helper.from_array(np.array([b], np.int64), f"e{k}")]
        nodes.append(helper.make_node("Slice", ["w", f"s{k}", f"e{k}"], [f"p{k}"]))
    nodes += [helper.make_node("Concat", ["p0", "p1", "p2"], ["wc"], axis=0),
              helper.make_node("MatMul", ["x", "wc"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 512])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])]
    if shared:
        nodes.append(helper.make_node("Mul", ["v", "w"], ["z"]))
        inputs.append(helper.make_tensor_value_info("v", TensorProto.FLOAT, [512, 32]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [512, 32]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_slices_joined_back_into_one_tensor_replace_the_weight():
    model = _gates_model(shared=False)
    ran = run_pass("fold-constants", model)
    assert ran.stats["folded"] == 4 and ops(ran.model) == ["MatMul"]
    assert ran.model.summary().tensor_bytes <= model.summary().tensor_bytes  # the weight, reordered
    assert len(ran.model.to_bytes()) <= len(model.to_bytes())
    assert_same_outputs(model, ran.model, {"x": np.linspace(-1, 1, 1024, dtype=F32).reshape(2, 512)})
    assert not run_pass("fold-constants", ran.model).modified


def test_slices_of_a_weight_read_elsewhere_are_not_copied():
    model = _gates_model(shared=True)
    ran = run_pass("fold-constants", model)
    assert ran.stats["folded"] == 0 and ran.stats["skipped_size_limit"] == 4  # the Concat goes with them
    assert ops(ran.model).count("Slice") == 3 and "Concat" in ops(ran.model)
    assert ran.model.summary().tensor_bytes <= model.summary().tensor_bytes
    feeds = {"x": np.ones((2, 512), F32), "v": np.full((512, 32), 2.0, F32)}
    assert_same_outputs(model, ran.model, feeds)
    loose = run_pass("fold-constants", model, grow_limit=1 << 20)
    assert loose.stats["folded"] == 4 and ops(loose.model) == ["MatMul", "Mul"]


# ---- what is never folded -------------------------------------------------------------


@pytest.mark.parametrize("op", ["RandomUniformLike", "RandomNormalLike", "Bernoulli"])
def test_random_ops_are_never_folded(op):
    model = parse(f"""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y)
        <float[2] p = {{0.5, 0.5}}>
        {{ r = {op}(p)  y = Add(x, r) }}
    """)
    ran = run_pass("fold-constants", model)
    assert ran.stats["skipped_nondeterministic"] == 1 and op in ops(ran.model)


def test_custom_domain_nodes_are_not_evaluated_and_do_not_crash():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18, "com.vendor" : 1]>
        g (float[2] x) => (float[2] y)
        <float[2] w = {1.0, 2.0}>
        { v = com.vendor.Magic(w)  y = Add(x, v) }
    """)
    ran = run_pass("fold-constants", model)
    assert ran.stats["skipped_custom_domain"] == 1 and not ran.modified
    assert "com.vendor" in ran.model.opset_imports


def test_dequantize_linear_of_a_weight_is_kept():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y)
        <int8[2] q = {10, -20}, float s = {0.5}, int8 z = {0}>
        { w = DequantizeLinear(q, s, z)  y = Mul(x, w) }
    """)
    ran = run_pass("fold-constants", model)
    assert ran.stats["skipped_quantization"] == 1 and "DequantizeLinear" in ops(ran.model)


def test_initializers_that_are_graph_inputs_are_not_constant():
    # IR 3: w is an initializer and a graph input, so a user may feed another value.
    model = parse("""
        <ir_version: 3, opset_import: ["" : 8]>
        g (float[2] x, float[2] w) => (float[2] y)
        <float[2] w = {1.0, 2.0}>
        { nw = Neg(w)  y = Add(x, nw) }
    """)
    ran = run_pass("fold-constants", model)
    assert not ran.modified and ops(ran.model) == ["Neg", "Add"]
    assert io_signature(ran.model) == io_signature(model)
    assert_same_outputs(model, ran.model, {"x": np.ones(2, F32)})


def test_ir3_models_get_constant_nodes_not_new_initializers():
    model = parse("""
        <ir_version: 3, opset_import: ["" : 8]>
        g (float[2] x) => (float[2] y)
        {
            a = Constant <value = float[2] {1.0, 2.0}> ()
            b = Constant <value = float[2] {3.0, 4.0}> ()
            ab = Mul(a, b)
            y = Add(x, ab)
        }
    """)
    ran = run_pass("fold-constants", model)
    out = ran.model.to_proto()
    assert not out.graph.initializer  # IR 3: an initializer would have to be a graph input
    assert [n.op_type for n in out.graph.node] == ["Constant", "Add"]
    assert io_signature(ran.model) == io_signature(model)
    onnx.checker.check_model(out, full_check=True)
    assert_same_outputs(model, ran.model)


def test_a_folded_graph_output_keeps_its_name():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y, float[2] z)
        <float[2] a = {1.0, 2.0}, float[2] b = {3.0, 4.0}>
        { y = Add(x, a)  z = Mul(a, b) }
    """)
    ran = run_pass("fold-constants", model)
    assert ran.stats["folded"] == 1
    assert ops(ran.model) == ["Add", "Constant"]
    assert ran.model.graph.nodes[1].outputs[0].name == "z"
    assert io_signature(ran.model) == io_signature(model)
    assert_same_outputs(model, ran.model)


# ---- subgraphs ------------------------------------------------------------------------


def test_folds_inside_if_branches_with_outer_scope_constants():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (bool c, float[2] x) => (float[2] y)
        <float[2] k = {1.0, 2.0}>
        {
            k2 = Mul(k, k)
            y = If(c) <then_branch = t () => (float[2] a) { kk = Add(k2, k)  a = Add(x, kk) },
                       else_branch = e () => (float[2] b) { b = Sub(x, k) }>
        }
    """)
    ran = run_pass("fold-constants", model)
    assert ran.stats["folded"] == 2
    then_branch = ran.model.graph.nodes[-1].attrs["then_branch"]
    assert [n.op for n in then_branch.nodes] == ["Add"]
    assert const_value(then_branch.nodes[0].inputs[1]).tolist() == [2.0, 6.0]
    for cond in (True, False):
        assert_same_outputs(model, ran.model, {"c": np.array(cond), "x": np.ones(2, F32)})


def test_folds_inside_loop_bodies_but_not_their_shapes():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y)
        <int64 trip = {3}, float[2] k = {1.0, 2.0}>
        {
            y = Loop(trip, , x) <body = b (int64 i, bool cin, float[2] acc) => (bool cout, float[2] nxt)
                {
                    cout = Identity(cin)
                    half = Constant<value = float[2] {0.5, 0.5}>()
                    kh = Mul(k, half)
                    n = Size(acc)
                    nf = Cast<to = 1>(n)
                    step = Mul(kh, nf)
                    nxt = Add(acc, step)
                }>
        }
    """)
    ran = run_pass("fold-constants", model)
    body = ran.model.graph.nodes[0].attrs["body"]
    body_ops = [n.op for n in body.nodes]
    assert "Size" in body_ops  # a body's declared shapes need not hold on every iteration
    assert ran.stats["folded"] == 1 and "Constant" not in body_ops
    assert_same_outputs(model, ran.model, {"x": np.ones(2, F32)})


def test_builders_control_flow_keeps_outer_references_working():
    model = Model.from_proto(builders.control_flow())
    ran = run_pass("fold-constants", model)
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(F32)
    assert_same_outputs(model, ran.model, {"x": x})
    assert_same_outputs(model, ran.model, {"x": -abs(x)})
    assert io_signature(ran.model) == io_signature(model)


# ---- options ----------------------------------------------------------------------------


def test_bad_options_are_clear_errors():
    with pytest.raises(PipelineError, match="size_limit"):
        get_pass("fold-constants")(size_limit=-1)
    with pytest.raises(PipelineError, match="size_limit"):
        parse_pipeline("fold-constants(size_limit=lots)")
    (step,) = parse_pipeline("fold-constants(size_limit=2MiB)")
    assert step.pass_.opts.size_limit == 2 << 20


# ---- real models (tests/conformance holds fold-constants alone on them to the contract) --

PPOCR_SHAPES = {"ppocr-det": [(1, 3, 64, 96), (2, 3, 96, 64)],
                "ppocr-rec": [(1, 3, 48, 96), (2, 3, 48, 160)],
                "ppocr-cls": [(1, 3, 48, 96), (3, 3, 48, 192)]}


@pytest.mark.parametrize("name", sorted(PPOCR_SHAPES))
def test_ppocr_models_fold_and_stay_equivalent_at_every_size(name):
    model = Model.load(real_model(name))
    ran = run_pass("fold-constants", model)
    assert ran.modified and node_count(ran.model) < node_count(model) * 0.6
    assert "Constant" not in ops(ran.model)  # Paddle's weights: Constant nodes, now initializers
    if name != "ppocr-det":
        assert ran.stats["reshape_targets"] == 1  # Reshape(x, Concat(Shape(x)[0:k], ...)) -> copy dims
    rng = np.random.default_rng(0)
    for shape in PPOCR_SHAPES[name]:  # dynamic dimensions stayed dynamic
        assert_same_outputs(model, ran.model, {"x": rng.random(shape, dtype=F32)}, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("path", light_models(), ids=lambda p: p.stem)
def test_light_models_are_not_inflated(path):
    # Their weights come from ConstantOfShape over initializers that are also graph inputs:
    # not constant, so nothing is materialized (a peer turns 4 KB into 232-548 MB here).
    model = Model.load(path)
    ran = run_pass("fold-constants", model)
    assert not ran.modified
    assert len(ran.model.to_bytes()) == len(model.to_bytes())
    assert io_signature(ran.model) == io_signature(model)


def test_digits_classifier_keeps_its_accuracy():
    from models.digits import digits_mlp

    model = Model.from_proto(digits_mlp())
    ran = run_pass("fold-constants", model)
    _, x_test, _, y_test = digits_split()
    assert accuracy(ran.model, x_test, y_test) == accuracy(model, x_test, y_test) > 0.9
    assert_same_outputs(model, ran.model, {"input": x_test[:16]})


def test_a_sparse_constant_node_is_left_alone():
    # Built with onnx.helper: the ONNX text format has no sparse tensor literal.
    values = helper.make_tensor("v", TensorProto.FLOAT, [2], [1.0, 2.0])
    indices = helper.make_tensor("i", TensorProto.INT64, [2], [0, 3])
    sparse = helper.make_sparse_tensor(values, indices, [4])
    nodes = [helper.make_node("Constant", [], ["s"], sparse_value=sparse),
             helper.make_node("Neg", ["s"], ["n"]), helper.make_node("Add", ["x", "n"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    ran = run_pass("fold-constants", model)
    assert not ran.modified and ops(ran.model) == ["Constant", "Neg", "Add"]
    assert_same_outputs(model, ran.model, {"x": np.ones(4, F32)})


def test_compact_weight_storage_is_left_compact_and_materialize_still_expands_it():
    """fold-constants after prune-magnitude/share-weights must not write the dense weights
    back (that would undo the compression); keep_compact=false and materialize do."""
    from models.digits import digits_mlp, digits_split
    from onnxopt import Model, PassManager

    x_test = digits_split()[1][:32]
    original = Model.from_proto(digits_mlp())
    small = original.copy()
    PassManager("prune-magnitude(sparsity=0.8),share-weights(bits=4)").run(small)
    compact_bytes = len(small.to_bytes())

    kept = run_pass("fold-constants", small)
    assert kept.stats["skipped_compact_storage"] > 0
    assert len(kept.model.to_bytes()) < 1.05 * compact_bytes  # Constant nodes became initializers
    assert_same_outputs(small, kept.model, {"input": x_test})

    expanded = run_pass("fold-constants", small, keep_compact=False, grow_limit=1 << 30)
    assert len(expanded.model.to_bytes()) > 2 * compact_bytes
    assert_same_outputs(small, expanded.model, {"input": x_test})


def test_a_scalar_gather_of_a_symbolic_dimension_stays_symbolic():
    """Shape(x)[0] with x's first dimension dynamic: not foldable, and no crash (a scalar
    index picks one element of the partial shape)."""
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[N, 4] x) => (float[N, 4] y)
        <int64 zero = {0}, int64[1] four = {4}, int64[1] axes = {0}>
        {
            s = Shape(x)
            n = Gather <axis: int = 0> (s, zero)
            n1 = Unsqueeze(n, axes)
            shape = Concat <axis: int = 0> (n1, four)
            y = Reshape(x, shape)
        }
    """)
    ran = run_pass("fold-constants", model)
    assert_same_outputs(model, ran.model, shapes={"x": (3, 4)})
