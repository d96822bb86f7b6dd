"""Model: loading from every source, faithful round-trips, safe and atomic saving."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper

from models import builders
from models.fetch import light_models
from onnxopt import Model
from onnxopt.errors import ModelLoadError, ModelSaveError, UnsafePathError
from onnxopt.model import ExternalValues, extras
from tests.helpers import assert_same_outputs, parse, real_model


def _roundtrip(proto: onnx.ModelProto) -> onnx.ModelProto:
    return Model.from_proto(proto).to_proto()


def test_load_from_path_bytes_and_proto_agree(tmp_path):
    proto = builders.cnn()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    a = Model.load(path).to_bytes()
    b = Model.load(path.read_bytes()).to_bytes()
    c = Model.load(proto).to_bytes()
    assert a == b == c
    assert onnx.load_from_string(a) == proto


@pytest.mark.parametrize("name", sorted(builders.BUILDERS))
def test_builder_models_round_trip_unchanged(name):
    proto = builders.build(name)
    assert _roundtrip(proto) == proto


@pytest.mark.parametrize("path", light_models(), ids=lambda p: p.stem)
def test_light_models_round_trip_unchanged(path):
    proto = onnx.load(path)
    assert _roundtrip(proto) == proto


@pytest.mark.parametrize("name", ["ppocr-det", "ppocr-rec", "ppocr-cls"])
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


def test_save_is_deterministic_and_reloads(tmp_path):
    model = Model.from_proto(builders.cnn())
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    model.save(a)
    Model.from_proto(builders.cnn()).save(b)
    assert a.read_bytes() == b.read_bytes()
    assert onnx.load(a) == builders.cnn()


def test_save_leaves_no_temporary_files_and_ordinary_permissions(tmp_path):
    Model.from_proto(builders.mlp()).save(tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    (tmp_path / "plain").write_bytes(b"")
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model = Model.from_proto(builders.mlp())
    target = tmp_path / "m.onnx"

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(ModelSaveError, match="No space left"):
        model.save(target)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_to_overwrite_the_input(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(builders.mlp(), path)
    before = path.read_bytes()
    with pytest.raises(ModelSaveError, match="input model"):
        Model.load(path).save(path)
    assert path.read_bytes() == before


def _external_model(folder, location="weights.bin", size=(64, 64)):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(size).astype(np.float32)
    init = numpy_helper.from_array(w, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, size[0]])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, size[1]])], [init])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "ext.onnx"
    onnx.save(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=0)
    return path, w


def test_external_data_stays_lazy_until_read(tmp_path):
    path, w = _external_model(tmp_path)
    model = Model.load(path)
    const = extras(model.graph).initializers[0]
    assert isinstance(const._values, ExternalValues)
    assert model.has_external_data()
    np.testing.assert_array_equal(const.values, w)


def test_external_data_is_copied_on_save_and_model_runs(tmp_path):
    path, _ = _external_model(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    model = Model.load(path)
    model.save(out / "m.onnx", external_data=True)
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert_same_outputs(Model.load(path), Model.load(out / "m.onnx"))
    # Inlining on request gives a single self-contained file.
    model.save(out / "inline.onnx", external_data=False)
    reloaded = Model.load(out / "inline.onnx")
    assert not reloaded.has_external_data()


def test_save_switches_to_external_data_above_the_threshold(tmp_path, monkeypatch):
    import onnxopt.model as model_module

    monkeypatch.setattr(model_module, "EXTERNAL_DATA_THRESHOLD", 1000)
    model = Model.from_proto(builders.cnn())
    model.save(tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").exists()
    assert Model.load(tmp_path / "m.onnx").has_external_data()
    assert_same_outputs(Model.from_proto(builders.cnn()), Model.load(tmp_path / "m.onnx"))


@pytest.mark.parametrize("location", ["/etc/passwd", "../outside.bin", "sub/../../outside.bin"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, location):
    folder = tmp_path / "model"
    folder.mkdir()
    path, _ = _external_model(folder)
    proto = onnx.load(path, load_external_data=False)
    proto.graph.initializer[0].external_data[0].value = location
    (tmp_path / "outside.bin").write_bytes(b"\0" * 64 * 64 * 4)
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(UnsafePathError):
        Model.load(path)


def test_external_data_symlink_pointing_out_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    path, _ = _external_model(folder)
    (tmp_path / "secret.bin").write_bytes((folder / "weights.bin").read_bytes())
    (folder / "weights.bin").unlink()
    (folder / "weights.bin").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(UnsafePathError, match="leaves"):
        Model.load(path)


def test_external_data_past_end_of_file_is_refused(tmp_path):
    path, _ = _external_model(tmp_path)
    data = tmp_path / "weights.bin"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="past the end"):
        Model.load(path)


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"this is not a protobuf at all \xff\xfe", "not an ONNX model"),
])
def test_garbage_is_not_a_model(tmp_path, content, match):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=match):
        Model.load(path)


def test_truncated_model_is_refused(tmp_path):
    data = builders.cnn().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        Model.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        Model.load(tmp_path / "nope.onnx")


def test_summary_counts_subgraphs_and_constant_nodes():
    model = Model.from_proto(builders.control_flow())
    s = model.summary()
    assert s.nodes == 6 and s.nodes_total == 14 and s.subgraphs == 3
    assert s.initializers == 6
    assert s.parameters == 8 + 8 + 1 + 1 + 8 + 1


def test_copy_is_independent():
    model = Model.from_proto(builders.mlp())
    snapshot = model.copy()
    model.graph.nodes.pop()
    assert len(snapshot.graph.nodes) == len(model.graph.nodes) + 1


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
