"""cse: fires, does not fire (one test per guard), idempotent, equivalent, subgraphs,
I/O kept, real models."""

from __future__ import annotations

import numpy as np
import pytest

from models import builders
from models.digits import accuracy, digits_mlp, digits_split
from models.fetch import light_models
from onnxopt import Model
from onnxopt.model import iter_graphs
from tests.helpers import (
    REAL_MODEL_NAMES,
    assert_same_outputs,
    io_signature,
    node_count,
    ops,
    parse,
    real_model,
    run_pass,
)


def test_merges_duplicates_and_the_chains_they_make_identical():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2,3] x) => (float[3,2] y)
        {
            a = Relu(x)
            b = Relu(x)
            ta = Transpose <perm = [1, 0]> (a)
            tb = Transpose <perm = [1, 0]> (b)
            y = Add(ta, tb)
        }
    """)
    ran = run_pass("cse", model)
    assert ran.modified and ran.stats["nodes_merged"] == 2
    assert ops(ran.model) == ["Relu", "Transpose", "Add"]
    add = ran.model.graph.nodes[-1]
    assert add.inputs[0] is add.inputs[1]
    assert io_signature(ran.model) == io_signature(model)
    assert_same_outputs(model, ran.model)


def test_merges_constant_nodes_by_value_and_their_users():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y)
        {
            k1 = Constant <value = float[2] {1.0, 2.0}> ()
            k2 = Constant <value = float[2] {1.0, 2.0}> ()
            a = Mul(x, k1)
            b = Mul(x, k2)
            y = Sub(a, b)
        }
    """)
    ran = run_pass("cse", model)
    assert ran.stats["nodes_merged"] == 2
    assert ops(ran.model) == ["Constant", "Mul", "Sub"]
    assert_same_outputs(model, ran.model)


@pytest.mark.parametrize("second", [
    "b = Transpose <perm = [0, 1]> (x)",  # other attribute value
    "b = Sigmoid(x)",  # other op
    "b = Transpose <perm = [1, 0]> (w)",  # other input
], ids=["attribute", "op", "input"])
def test_does_not_merge_different_nodes(second):
    model = parse(f"""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[3,3] x, float[3,3] w) => (float[3,3] y)
        {{
            a = Transpose <perm = [1, 0]> (x)
            {second}
            y = Add(a, b)
        }}
    """)
    ran = run_pass("cse", model)
    assert not ran.modified and ran.stats["nodes_merged"] == 0
    assert len(ran.model.graph.nodes) == 3


def test_int_and_float_attributes_are_not_confused():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[4] x) => (float[4] y)
        {
            a = LeakyRelu <alpha = 1.0> (x)
            b = LeakyRelu <alpha = 0.5> (x)
            y = Add(a, b)
        }
    """)
    assert not run_pass("cse", model).modified


def test_random_ops_are_never_merged():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[4] x) => (float[4] y)
        {
            a = RandomNormalLike <seed = 1.0> (x)
            b = RandomNormalLike <seed = 1.0> (x)
            y = Add(a, b)
        }
    """)
    ran = run_pass("cse", model)
    assert not ran.modified and ran.stats["skipped_non_deterministic"] == 2
    assert ops(ran.model) == ["RandomNormalLike", "RandomNormalLike", "Add"]


def test_dropout_merges_in_inference_mode_only():
    inference = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[4] x) => (float[4] y)
        { a = Dropout(x)  b = Dropout(x)  y = Add(a, b) }
    """)
    ran = run_pass("cse", inference)
    assert ran.stats["nodes_merged"] == 1
    assert_same_outputs(inference, ran.model)
    training = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[4] x) => (float[4] y)
        <float r = {0.5}, bool t = {1}>
        { a = Dropout(x, r, t)  b = Dropout(x, r, t)  y = Add(a, b) }
    """)
    ran = run_pass("cse", training)
    assert not ran.modified and ran.stats["skipped_non_deterministic"] == 2


def test_if_holding_a_random_op_is_not_merged():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (bool c, float[2] x) => (float[2] y)
        {
            a = If(c) <then_branch = t () => (float[2] r) { r = RandomUniformLike(x) },
                       else_branch = e () => (float[2] s) { s = Neg(x) }>
            b = If(c) <then_branch = t2 () => (float[2] r2) { r2 = RandomUniformLike(x) },
                       else_branch = e2 () => (float[2] s2) { s2 = Neg(x) }>
            y = Add(a, b)
        }
    """)
    ran = run_pass("cse", model)
    assert not ran.modified
    assert ops(ran.model) == ["If", "If", "Add"]


def test_custom_domain_ops_are_left_alone():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18, "com.vendor" : 1]>
        g (float[2] x) => (float[2] y)
        { a = com.vendor.Counter(x)  b = com.vendor.Counter(x)  y = Add(a, b) }
    """)
    ran = run_pass("cse", model)
    assert not ran.modified and ran.stats["skipped_custom_domain"] == 2


_DQ = """
    <ir_version: 9, opset_import: ["" : 18]>
    g (float[4] x) => (float[4] y)
    <int8[4] q = {{1, -2, 3, -4}}, float s = {{0.5}}, int8 z = {{0}}>
    {{
        d1 = DequantizeLinear(q, s, z)
        d2 = DequantizeLinear(q, s, z)
        {body}
    }}
"""


def test_dequantize_nodes_feeding_different_consumers_stay_apart():
    model = parse(_DQ.format(body="a = Mul(x, d1)  b = Add(x, d2)  y = Sub(a, b)"))
    ran = run_pass("cse", model)
    assert not ran.modified and ran.stats["skipped_dequantize"] == 1
    assert ops(ran.model).count("DequantizeLinear") == 2


def test_dequantize_nodes_feeding_the_same_consumer_merge():
    model = parse(_DQ.format(body="y0 = Mul(d1, d2)  y = Add(x, y0)"))
    ran = run_pass("cse", model)
    assert ran.stats["nodes_merged"] == 1
    assert_same_outputs(model, ran.model)


def test_a_duplicate_that_is_a_graph_output_keeps_its_name():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y, float[2] b)
        { a = Relu(x)  b = Relu(x)  y = Exp(a) }
    """)
    ran = run_pass("cse", model)
    assert ran.stats["nodes_merged"] == 1
    assert [t.name for t in ran.model.graph.outputs] == ["y", "b"]
    assert ran.model.graph.nodes[1].inputs[0] is ran.model.graph.outputs[1]
    assert io_signature(ran.model) == io_signature(model)
    assert_same_outputs(model, ran.model)


def test_two_graph_outputs_are_never_merged():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] a, float[2] b)
        { a = Relu(x)  b = Relu(x) }
    """)
    ran = run_pass("cse", model)
    assert not ran.modified and ran.stats["skipped_graph_outputs"] == 1
    assert io_signature(ran.model) == io_signature(model)


def test_is_idempotent():
    model = Model.from_proto(builders.dead_branches())
    from onnxopt.framework import PassContext, get_pass

    work = model.copy()
    get_pass("dedup-weights")().run(work, PassContext())
    once = run_pass("cse", work)
    twice = run_pass("cse", once.model)
    assert once.modified and once.stats["nodes_merged"] == 1  # the two convolutions of one tied weight
    assert not twice.modified
    assert twice.model.to_bytes() == once.model.to_bytes()
    assert_same_outputs(model, once.model)


# ---- subgraphs ---------------------------------------------------------------------------

_TWO_IFS = """
    <ir_version: 9, opset_import: ["" : 18]>
    g (bool c, float[2] x) => (float[2] y)
    <float[2] w = {{1.0, 2.0}}>
    {{
        a = If(c) <then_branch = t1 () => (float[2] p1) {{ q1 = Mul(x, w)  p1 = Relu(q1) }},
                   else_branch = e1 () => (float[2] r1) {{ r1 = Neg(x) }}>
        b = If(c) <then_branch = t2 () => (float[2] p2) {{ q2 = Mul(x, w)  p2 = {op}(q2) }},
                   else_branch = e2 () => (float[2] r2) {{ r2 = Neg(x) }}>
        y = Sub(a, b)
    }}
"""


def _if_feeds(flag: bool) -> dict:
    return {"c": np.array(flag), "x": np.array([1.5, -2.0], np.float32)}


def test_if_nodes_with_the_same_bodies_merge_whatever_their_tensor_names():
    model = parse(_TWO_IFS.format(op="Relu"))
    ran = run_pass("cse", model)
    assert ran.stats["nodes_merged"] == 1
    assert ops(ran.model) == ["If", "Sub"]
    for flag in (True, False):
        assert_same_outputs(model, ran.model, _if_feeds(flag))


def test_if_nodes_with_different_bodies_stay():
    model = parse(_TWO_IFS.format(op="Sigmoid"))
    ran = run_pass("cse", model)
    assert not ran.modified
    assert ops(ran.model) == ["If", "If", "Sub"]


def test_bodies_with_their_own_equal_constants_compare_by_content():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (bool c, float[2] x) => (float[2] y)
        {
            a = If(c) <then_branch = t1 () => (float[2] p1) <float[2] k1 = {1.0, 2.0}> { p1 = Add(x, k1) },
                       else_branch = e1 () => (float[2] r1) { r1 = Neg(x) }>
            b = If(c) <then_branch = t2 () => (float[2] p2) <float[2] k2 = {1.0, 2.0}> { p2 = Add(x, k2) },
                       else_branch = e2 () => (float[2] r2) { r2 = Neg(x) }>
            y = Sub(a, b)
        }
    """)
    ran = run_pass("cse", model)
    assert ran.stats["nodes_merged"] == 1
    for flag in (True, False):
        assert_same_outputs(model, ran.model, _if_feeds(flag))


def test_duplicates_inside_a_body_merge_and_outer_reads_keep_working():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (bool c, float[2] x) => (float[2] y, float[2] z)
        {
            z = Relu(x)
            y = If(c) <
                then_branch = t () => (float[2] a) { a1 = Mul(z, x)  a2 = Mul(z, x)  a = Add(a1, a2) },
                else_branch = e () => (float[2] b) { b = Neg(z) }
            >
        }
    """)
    ran = run_pass("cse", model)
    assert ran.stats["nodes_merged"] == 1
    then_g = next(g for g in iter_graphs(ran.model.graph) if g.name == "t")
    assert [n.op for n in then_g.nodes] == ["Mul", "Add"]
    for flag in (True, False):
        assert_same_outputs(model, ran.model, _if_feeds(flag))


def test_outer_merges_reach_the_bodies_that_read_them():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (bool c, float[2] x) => (float[2] y)
        {
            u = Relu(x)
            v = Relu(x)
            a = If(c) <then_branch = t1 () => (float[2] p1) { p1 = Exp(u) }, else_branch = e1 () => (float[2] r1) { r1 = Neg(x) }>
            b = If(c) <then_branch = t2 () => (float[2] p2) { p2 = Exp(v) }, else_branch = e2 () => (float[2] r2) { r2 = Neg(x) }>
            y = Sub(a, b)
        }
    """)
    ran = run_pass("cse", model)
    assert ran.stats["nodes_merged"] == 2  # v into u, then the If that read v into the one reading u
    for flag in (True, False):
        assert_same_outputs(model, ran.model, _if_feeds(flag))


def test_control_flow_builder_stays_equivalent():
    model = Model.from_proto(builders.control_flow())
    ran = run_pass("cse", model)
    assert io_signature(ran.model) == io_signature(model)
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    for sign in (1, -1):
        assert_same_outputs(model, ran.model, {"x": sign * np.abs(x)})


# ---- real models (tests/conformance holds cse alone on them to the contract) -------------


@pytest.mark.parametrize("name", REAL_MODEL_NAMES)
def test_real_models_lose_their_repeated_nodes(name):
    model = Model.load(real_model(name))
    ran = run_pass("cse", model)
    assert ran.stats["nodes_merged"] > 50
    assert node_count(ran.model) == node_count(model) - ran.stats["nodes_merged"]


@pytest.mark.parametrize("path", light_models(), ids=lambda p: p.stem)
def test_light_models_have_nothing_to_merge(path):
    # Every ConstantOfShape reads its own shape initializer, and those are graph inputs a
    # user may feed (IR 3): no two nodes provably compute the same thing.
    model = Model.load(path)
    ran = run_pass("cse", model)
    assert not ran.modified
    assert io_signature(ran.model) == io_signature(model)
    assert ran.model.to_bytes() == model.to_bytes()


def test_digits_classifier_keeps_its_accuracy():
    proto = digits_mlp()
    ran = run_pass("cse", Model.from_proto(proto))
    assert not ran.modified
    _, x_test, _, y_test = digits_split()
    assert accuracy(ran.model.to_proto(), x_test, y_test) == accuracy(proto, x_test, y_test)


def test_silero_vad_if_bodies_are_simplified():
    model = Model.load(real_model("silero-vad"))
    ran = run_pass("cse", model)
    assert ran.stats["nodes_merged"] > 100
    assert len(ran.model.graph.nodes) == len(model.graph.nodes)  # the merges are inside the bodies
