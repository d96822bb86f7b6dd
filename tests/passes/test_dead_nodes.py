"""dead-nodes: fires, does not fire, idempotent, equivalent, subgraphs, I/O kept."""

from __future__ import annotations

import onnx
import pytest

from models import builders
from models.fetch import light_models
from onnxopt import Model
from tests.helpers import assert_same_outputs, io_signature, node_count, parse, run_pass
from tests.real_models import REAL_MODEL_NAMES, real_model


def test_removes_a_dead_chain_and_its_weight():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y)
        <float[2] w = {1.0, 2.0}, float[2] dead_w = {3.0, 4.0}>
        {
            y = Add(x, w)
            d1 = Mul(x, dead_w)
            d2 = Relu(d1)
        }
    """)
    ran = run_pass("dead-nodes", model)
    assert ran.modified
    assert [n.op for n in ran.model.graph.nodes] == ["Add"]
    assert ran.stats["nodes_removed"] == 2 and ran.stats["initializers_removed"] == 1
    assert ran.stats["bytes_removed"] == 8
    assert_same_outputs(model, ran.model)


def test_does_not_fire_on_a_clean_graph():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y) <float[2] w = {1.0, 2.0}> { y = Add(x, w) }
    """)
    ran = run_pass("dead-nodes", model)
    assert not ran.modified
    assert all(v == 0 for v in ran.stats.values())


def test_is_idempotent():
    model = Model.from_proto(builders.dead_branches())
    once = run_pass("dead-nodes", model)
    twice = run_pass("dead-nodes", once.model)
    assert once.modified and not twice.modified
    assert twice.model.to_bytes() == once.model.to_bytes()


def test_keeps_unused_graph_inputs_and_every_output():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x, float[2] unused) => (float[2] y, float[2] x_again)
        { y = Relu(x)  x_again = Identity(x) }
    """)
    ran = run_pass("dead-nodes", model)
    assert not ran.modified
    assert io_signature(ran.model) == io_signature(model)


def test_keeps_a_used_node_of_an_unknown_domain_and_drops_an_unused_one():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18, "com.vendor" : 1]>
        g (float[2] x) => (float[2] y)
        {
            v = com.vendor.Magic(x)
            y = Relu(v)
            w = com.vendor.Magic(x)
        }
    """)
    ran = run_pass("dead-nodes", model)
    assert [n.op for n in ran.model.graph.nodes] == ["Magic", "Relu"]
    assert "com.vendor" in ran.model.opset_imports


def test_drops_unused_functions_opsets_and_orphan_value_info():
    model = Model.from_proto(builders.dead_branches())
    ran = run_pass("dead-nodes", model)
    proto = ran.model.to_proto()
    assert ran.stats["functions_removed"] == 1 and not proto.functions
    assert ran.stats["opsets_removed"] == 2
    assert {o.domain for o in proto.opset_import} == {""}
    assert ran.stats["value_info_removed"] == 1
    assert "ghost" not in {v.name for v in proto.graph.value_info}
    assert_same_outputs(model, ran.model)


def test_keeps_functions_that_are_called():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18, "local" : 1]>
        g (float[2] x) => (float[2] y) { y = local.Twice(x) }
        <domain: "local", opset_import: ["" : 18]>
        Twice (t) => (u) { u = Add(t, t) }
    """)
    ran = run_pass("dead-nodes", model)
    assert not ran.modified
    assert [f.name for f in ran.model.functions] == ["Twice"]


def test_prunes_inside_if_and_loop_bodies_and_keeps_outer_references():
    model = Model.from_proto(builders.control_flow())
    ran = run_pass("dead-nodes", model)
    assert ran.stats["nodes_removed"] == 3  # one dead node in main, then-branch and loop body
    names = {n.name for g in _graphs(ran.model) for n in g.nodes}
    assert not {"main_dead", "then_dead", "body_dead"} & names
    proto = ran.model.to_proto()
    assert {i.name for i in proto.graph.initializer} == {"scale", "bias", "decay", "trip", "zero"}
    assert io_signature(ran.model) == io_signature(model)
    assert_same_outputs(model, ran.model)
    assert_same_outputs(model, ran.model, {"x": -abs(_x())})  # the else branch too


def test_outer_tensor_used_only_by_a_dead_body_node_is_freed():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (bool c, float[2] x) => (float[2] y)
        <float[2] only_dead = {5.0, 6.0}>
        {
            y = If(c) <
                then_branch = t () => (float[2] a) { a = Relu(x)  d = Add(x, only_dead) },
                else_branch = e () => (float[2] b) { b = Neg(x) }
            >
        }
    """)
    ran = run_pass("dead-nodes", model)
    assert ran.stats["nodes_removed"] == 1 and ran.stats["initializers_removed"] == 1
    assert_same_outputs(model, ran.model, {"c": _np().array(True), "x": _x()[0, :2]})


@pytest.mark.parametrize("path", light_models(), ids=lambda p: p.stem)
def test_ir3_light_models_keep_every_input(path):
    model = Model.load(path)
    ran = run_pass("dead-nodes", model)
    assert io_signature(ran.model) == io_signature(model)
    proto = ran.model.to_proto()
    inputs = {i.name for i in proto.graph.input}
    initializers = {i.name for i in proto.graph.initializer}
    assert initializers and initializers <= inputs  # IR 3: every weight is also an input
    assert len(initializers) == len(onnx.load(path).graph.initializer)


@pytest.mark.parametrize("name", REAL_MODEL_NAMES)
def test_real_models_never_gain_nodes(name):
    # tests/conformance holds dead-nodes alone on the real models to the contract.
    model = Model.load(real_model(name))
    ran = run_pass("dead-nodes", model)
    assert node_count(ran.model) <= node_count(model)


def _graphs(model):
    from onnxopt.model import iter_graphs

    return list(iter_graphs(model.graph))


def _np():
    import numpy as np

    return np


def _x():
    return _np().random.default_rng(1).standard_normal((1, 8)).astype("float32")


def test_checker_accepts_every_result():
    for proto in (builders.control_flow(), builders.dead_branches()):
        ran = run_pass("dead-nodes", Model.from_proto(proto))
        onnx.checker.check_model(ran.model.to_proto(), full_check=True)



def test_removed_nodes_are_unlinked_by_identity_not_equality():
    """graphsurgeon's ``clear`` unlinks the first *equal* reader; two nodes of two bodies
    with the same op, name and tensors compare equal, so it unlinked the wrong one and
    dead-nodes later failed on the other (found by the differential fuzzer, seed 104295)."""
    import numpy as np
    import onnx_graphsurgeon as gs

    from onnxopt.graph import disconnect

    x = gs.Variable("x", np.float32, (3,))
    late = gs.Node("Tanh", "twin", inputs=[x], outputs=[gs.Variable("t", np.float32, (3,))])
    early = gs.Node("Tanh", "twin", inputs=[x], outputs=[gs.Variable("t", np.float32, (3,))])
    assert early == late and early is not late and x.outputs[0] is late
    disconnect(early)
    assert len(x.outputs) == 1 and x.outputs[0] is late and not early.inputs and not early.outputs
    disconnect(late)
    assert not x.outputs


def test_default_on_a_graph_with_twin_dead_if_bodies_keeps_its_outputs():
    from tests.fuzz.differential import check_graph
    from tests.fuzz.graphs import random_graph

    kind, detail, _ = check_graph(random_graph(104295))
    assert kind == "ok", detail
