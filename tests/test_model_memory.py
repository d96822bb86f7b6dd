"""A weight is held once: large tensors are held apart from the parsed proto on load,
shared by copies, streamed into saves — and what is written is exactly what protobuf
writes for the complete proto."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import Model, PassManager
from onnxopt.model_files import (
    HELD_APART_MIN_BYTES,
    InlineValues,
    all_tensor_protos,
    held_marker,
    spliced_chunks,
)
from tests.helpers import ROOT, assert_same_outputs

BIG = (HELD_APART_MIN_BYTES // 4) * 2  # float32 elements of a tensor held apart


def _model_with_every_kind_of_tensor() -> onnx.ModelProto:
    """Large and small initializers of several types, a large Constant node, an If whose
    branches hold a large constant and read an outer weight, doc strings on tensors."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((BIG // 64, 64)).astype(np.float32), "w")
    w.doc_string = "the weight"
    h = numpy_helper.from_array(rng.standard_normal((BIG // 64, 64)).astype(np.float16), "h")
    small = numpy_helper.from_array(np.arange(4, dtype=np.int64), "small")
    c = numpy_helper.from_array(rng.standard_normal((64, BIG // 64)).astype(np.float32), "c")
    branch_w = numpy_helper.from_array(np.full((BIG // 64, 64), 0.5, np.float32), "bw")

    def branch(name, scale):
        k = helper.make_node("Constant", [], [f"{name}_k"], value=numpy_helper.from_array(
            np.full((BIG // 64, 64), scale, np.float32), f"{name}_k"))
        return helper.make_graph(
            [k, helper.make_node("Add", [f"{name}_k", "w"], [f"{name}_s"]),
             helper.make_node("Mul", [f"{name}_s", "bw"], [f"{name}_y"])], name, [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [BIG // 64, 64])])

    nodes = [
        helper.make_node("Constant", [], ["c_out"], value=c),
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("MatMul", ["xw", "c_out"], ["y"]),
        helper.make_node("Cast", ["h"], ["h32"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["h32"], ["hs"], keepdims=0),
        helper.make_node("Greater", ["hs", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["z"], then_branch=branch("then", 1.0), else_branch=branch("else", 2.0)),
        helper.make_node("Shape", ["small"], ["s"]),
    ]
    graph = helper.make_graph(
        nodes, "every", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, BIG // 64])],
        [helper.make_tensor_value_info(n, t, None) for n, t in
         (("y", TensorProto.FLOAT), ("z", TensorProto.FLOAT), ("s", TensorProto.INT64))],
        [w, h, small, branch_w, numpy_helper.from_array(np.array(0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture()
def every(tmp_path):
    proto = _model_with_every_kind_of_tensor()
    path = tmp_path / "every.onnx"
    onnx.save(proto, path)
    return path, proto


def test_large_tensors_are_held_apart_and_give_their_values(every):
    path, proto = every
    model = Model.load(path)
    held = {c.name: c for c in model.constants() if isinstance(c._values, InlineValues)}
    assert {"w", "h", "bw"} <= set(held)  # initializers, also those a subgraph reads
    assert "small" not in held
    assert sum(isinstance(c._values, InlineValues) for c in model.constants()) == 6  # + 3 Constant nodes
    assert held["w"]._values.tensor.raw_data == proto.graph.initializer[0].raw_data  # the complete proto
    for init in proto.graph.initializer:
        if init.name in held:
            want = numpy_helper.to_array(init)
            got = held[init.name].values
            assert got.dtype == want.dtype and np.array_equal(got, want) and got.flags.writeable


def test_save_and_to_bytes_write_what_protobuf_writes(every, tmp_path):
    path, _ = every
    want = onnx.load(path).SerializeToString(deterministic=True)
    model = Model.load(path)
    assert model.to_bytes() == want
    assert model.to_proto().SerializeToString(deterministic=True) == want
    model.save(tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == want


def test_rewritten_weights_are_written_as_from_array_writes_them(every, tmp_path):
    path, _ = every
    model = Model.load(path)
    w = next(c for c in model.constants() if c.name == "w")
    w.values = (w.values * 3).astype(np.float32)  # a numpy value now, large
    model.save(tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == model.to_proto().SerializeToString(deterministic=True)
    again = Model.load(tmp_path / "out.onnx")
    np.testing.assert_array_equal(next(c for c in again.constants() if c.name == "w").values, w.values)


def test_copies_share_held_bytes_and_stay_independent(every):
    path, _ = every
    model = Model.load(path)
    copy = model.copy()
    mine = {c.name: c for c in model.constants()}
    theirs = {c.name: c for c in copy.constants()}
    assert theirs["w"]._values is mine["w"]._values  # shared, not copied
    assert theirs["w"] is not mine["w"]
    before = theirs["w"].values.copy()
    mine["w"].values[...] = 0  # decoded into a new array: the held bytes do not change
    np.testing.assert_array_equal(theirs["w"].values, before)
    np.testing.assert_array_equal(Model.load(path).to_bytes(), copy.to_bytes())


def test_a_copy_of_rewritten_weights_is_a_snapshot(every):
    path, _ = every
    model = Model.load(path)
    w = next(c for c in model.constants() if c.name == "w")
    w.values = np.ones_like(w.values)
    copy = model.copy()
    w.values[...] = 7
    assert np.all(next(c for c in copy.constants() if c.name == "w").values == 1)


def test_loading_a_proto_leaves_it_unchanged(every):
    _, proto = every
    before = proto.SerializeToString(deterministic=True)
    model = Model.load(proto)
    model.copy()
    PassManager("default").run(model)
    assert proto.SerializeToString(deterministic=True) == before


def test_external_data_from_held_weights(every, tmp_path):
    path, proto = every
    model = Model.load(path)
    out = tmp_path / "ext" / "m.onnx"
    out.parent.mkdir()
    model.save(out, external_data=True)
    assert (out.parent / "m.onnx.data").stat().st_size >= BIG * 4
    back = onnx.load(out)  # reads the data back in, marking where it came from
    for t in all_tensor_protos(back):
        t.ClearField("data_location")
    assert back.SerializeToString(deterministic=True) == proto.SerializeToString(deterministic=True)


def test_the_optimized_model_runs_as_the_original(every):
    path, _ = every
    original = Model.load(path)
    model = Model.load(path)
    PassManager("default").run(model)
    assert_same_outputs(original, model)


def test_splicing_finds_markers_only_where_they_stand():
    assert spliced_chunks(b"\x08\x01", []) == ([b"\x08\x01"], 2)
    tensor = TensorProto(name="t", data_type=TensorProto.FLOAT, dims=[2], doc_string="d")
    tensor.raw_data = held_marker(0)
    data = onnx.ModelProto(graph=onnx.GraphProto(initializer=[tensor])).SerializeToString()
    chunks, total = spliced_chunks(data, [b"\x00\x00\x80?\x00\x00\x00@"])
    joined = b"".join(chunks)
    assert total == len(joined)
    back = onnx.ModelProto()
    back.ParseFromString(joined)
    got = back.graph.initializer[0]
    assert got.raw_data == b"\x00\x00\x80?\x00\x00\x00@" and got.doc_string == "d" and got.name == "t"


def _peak_above_baseline(script: str) -> float:
    code = textwrap.dedent('''
        import sys
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        from onnxopt import Model, PassManager
        PassManager("default")
        base = hwm()
    ''') + textwrap.dedent(script) + "\nprint((hwm() - base) / size)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_copying_optimizing_and_saving_hold_each_weight_once(tmp_path):
    """A 48 MB model goes through load, copy, the default preset and save with its
    weights in memory about once (the parse briefly holds them twice)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((1024, 1024)).astype(np.float32), f"w{i}")
             for i in range(12)]
    nodes, x = [], "x"
    for i in range(12):
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]))
        x = f"h{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 1024])], inits)
    src = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    ratio = _peak_above_baseline(f'''
        size = {src.stat().st_size}
        model = Model.load({str(src)!r})
        reference = model.copy()
        PassManager("default").run(model)
        model.save({str(tmp_path / "out.onnx")!r})
    ''')
    assert ratio < 2.4  # 6.1 before weights were held apart
