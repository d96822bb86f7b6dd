"""GraphProto <-> gs.Graph: round-trips lose nothing, subgraphs share outer tensors,
new constants are written once."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from models import builders
from models.fetch import light_models
from onnxopt import Model
from onnxopt.graph_extras import extras
from onnxopt.proto_convert import graph_from_proto, graph_to_proto, norm_domain
from tests.helpers import assert_same_outputs, parse
from tests.real_models import REAL_MODEL_NAMES, real_model


def _roundtrip(proto: onnx.ModelProto) -> onnx.ModelProto:
    return Model.from_proto(proto).to_proto()


@pytest.mark.parametrize("name", sorted(builders.BUILDERS))
def test_builder_models_round_trip_unchanged(name):
    proto = builders.build(name)
    assert _roundtrip(proto) == proto


@pytest.mark.parametrize("path", light_models(), ids=lambda p: p.stem)
def test_light_models_round_trip_unchanged(path):
    proto = onnx.load(path)
    assert _roundtrip(proto) == proto


@pytest.mark.parametrize("name", REAL_MODEL_NAMES)
def test_real_models_round_trip_unchanged(name):
    proto = onnx.load(real_model(name))
    assert _roundtrip(proto) == proto


def test_round_trip_keeps_model_fields_domains_functions_and_metadata():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18, "ai.onnx.ml" : 3, "com.vendor" : 1, "local" : 1],
         producer_name: "exporter", producer_version: "2.1", domain: "org.example", model_version: 7,
         doc_string: "a model", metadata_props: ["author" : "team", "license" : "MIT"]>
        g (float[N, 4] x) => (float[N, 4] y, float[N] s)
        <float[4] w = {1.0, 2.0, 3.0, 4.0}>
        {
            a = Mul(x, w)
            y = local.Twice(a)
            s = ReduceSum <keepdims: int = 0, noop_with_empty_axes: int = 0> (a, axes)
            axes = Constant <value_ints: ints = [1]> ()
        }
        <domain: "local", opset_import: ["" : 18]>
        Twice (t) => (u) { u = Add(t, t) }
    """.replace("            axes = Constant <value_ints: ints = [1]> ()\n", "").replace(
        "s = ReduceSum <keepdims: int = 0, noop_with_empty_axes: int = 0> (a, axes)",
        "s = ReduceSum <keepdims: int = 0> (a)"))
    proto = model.to_proto()
    assert proto.producer_name == "exporter" and proto.producer_version == "2.1"
    assert proto.domain == "org.example" and proto.model_version == 7 and proto.doc_string == "a model"
    assert [(p.key, p.value) for p in proto.metadata_props] == [("author", "team"), ("license", "MIT")]
    assert {o.domain: o.version for o in proto.opset_import} == {
        "": 18, "ai.onnx.ml": 3, "com.vendor": 1, "local": 1}
    assert [f.name for f in proto.functions] == ["Twice"]
    assert proto.ir_version == 9
    assert_same_outputs(model, Model.from_proto(proto))


def test_round_trip_keeps_node_doc_strings_value_info_and_empty_list_attributes():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    mid = helper.make_tensor_value_info("mid", onnx.TensorProto.FLOAT, [2, 3])
    n1 = helper.make_node("Relu", ["x"], ["mid"], name="r", doc_string="from layer 3")
    n2 = helper.make_node("Identity", ["mid"], ["y"], name="i")
    n2.attribute.append(helper.make_attribute("custom_empty", [], attr_type=onnx.AttributeProto.INTS))
    n2.domain = "com.vendor"
    graph = helper.make_graph([n1, n2], "g", [x], [y], value_info=[mid])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.vendor", 1)])
    back = _roundtrip(proto)
    assert back == proto
    assert back.graph.node[0].doc_string == "from layer 3"
    assert back.graph.node[1].attribute[0].type == onnx.AttributeProto.INTS


def test_ir3_initializers_listed_as_inputs_stay_inputs():
    path = next(p for p in light_models() if "squeezenet" in p.name)
    proto = onnx.load(path)
    model = Model.load(path)
    back = model.to_proto()
    assert [i.name for i in back.graph.input] == [i.name for i in proto.graph.input]
    constants = [t for t in model.graph.inputs if isinstance(t, gs.Constant)]
    assert len(constants) == len(proto.graph.initializer)


def test_unused_initializers_and_orphan_value_info_survive_a_round_trip():
    proto = builders.dead_branches()
    back = _roundtrip(proto)
    assert "never_used" in {i.name for i in back.graph.initializer} or any(
        i.name.startswith("never_used") for i in back.graph.initializer)
    assert [v.name for v in back.graph.value_info if v.name == "ghost"] == ["ghost"]


def test_subgraph_outer_scope_references_share_one_tensor():
    model = Model.from_proto(builders.control_flow())
    if_node = next(n for n in model.graph.nodes if n.op == "If")
    outer_x_act = next(t for n in model.graph.nodes for t in n.outputs if t.name == "x_act")
    then_mul = if_node.attrs["then_branch"].nodes[0]
    assert then_mul.inputs[0] is outer_x_act
    scale = next(t for t in extras(model.graph).initializers if t.name == "scale")
    assert then_mul.inputs[1] is scale


def test_a_new_constant_read_by_both_if_branches_is_written_once_in_the_parent():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (bool c, float[4] x) => (float[4] y)
        {
            y = If(c) <
                then_branch = t () => (float[4] a) { a = Add(x, x) },
                else_branch = e () => (float[4] b) { b = Sub(x, x) }
            >
        }
    """)
    shared = gs.Constant("shared_w", np.arange(4, dtype=np.float32))
    if_node = model.graph.nodes[0]
    for branch in ("then_branch", "else_branch"):
        if_node.attrs[branch].nodes[0].inputs[1] = shared
    proto = model.to_proto()
    assert [i.name for i in proto.graph.initializer] == ["shared_w"]
    bodies = [a.g for a in proto.graph.node[0].attribute]
    assert all(not b.initializer for b in bodies)
    onnx.checker.check_model(proto)
    back = Model.from_proto(proto)
    out = assert_same_outputs(back, back, {"c": np.array(True), "x": np.ones(4, np.float32)})
    np.testing.assert_array_equal(out["y"], [1, 2, 3, 4])


def test_graph_conversion_alone_round_trips_and_names_the_domains_used():
    proto = builders.control_flow()
    back, domains = graph_to_proto(graph_from_proto(proto.graph, None))
    assert back == proto.graph
    assert domains == {""}
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Relu", ["x"], ["r"], domain="ai.onnx"),
             helper.make_node("Scale", ["r"], ["y"], domain="com.vendor")]
    graph = helper.make_graph(nodes, "g", [x], [y])
    back, domains = graph_to_proto(graph_from_proto(graph, None))
    assert back == graph
    assert domains == {"", "com.vendor"}
    assert norm_domain("ai.onnx") == norm_domain(None) == "" and norm_domain("local") == "local"
