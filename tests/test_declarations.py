"""Declared value_info that shape inference contradicts is dropped after a rewrite, and
only that: onnxruntime trusts a declared size once folding shows it a constant shape to
compare it with (fuzz finding 14)."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import onnx
import onnx.parser
import onnx.shape_inference
import pytest

import onnxopt.manager
import onnxopt.shapes
from onnxopt import Model, PassManager, optimize
from onnxopt.declarations import drop_contradicted_declarations
from onnxopt.errors import ValidationFailed
from onnxopt.validate import run_model
from tests.helpers import assert_same_outputs

# ``u`` is declared 2 x 4 but is x's first dimension, which the input leaves free (N). The
# target shape of the Expand is computed from both inputs: onnxruntime cannot fold it (x's
# shape is not static), fold-constants can (only x's static dimension is read). With the
# target a constant equal to u's declared shape, onnxruntime drops the Expand as a no-op,
# and the Reshape then gets x's 1 x 4 instead of 2 x 4.
LYING = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x, float[2, 4] y) => (float[8] z)
<float[2, 4] u, int64[1] t = {8}>
{
    u = Relu(x)
    a = Shape<end = 1>(y)
    b = Shape<start = 1>(x)
    s = Concat<axis = 0>(a, b)
    e = Expand(u, s)
    r = Reshape(e, t)
    z = Neg(r)
}
"""


def _proto(text: str) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto)
    return proto


def _declared(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    return {vi.name: vi.type for vi in proto.graph.value_info}


def _feeds(batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {"x": rng.standard_normal((batch, 4)).astype(np.float32),
            "y": rng.standard_normal((2, 4)).astype(np.float32)}


def test_default_drops_a_declared_size_the_inputs_leave_free_and_its_output_runs(tmp_path, monkeypatch):
    path = tmp_path / "lying.onnx"
    onnx.save(_proto(LYING), path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    out = tmp_path / "out.onnx"
    _, report = optimize(str(path), "default", output=str(out), runs=0)
    assert report.passed
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # the input file is left alone

    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    # the shape was folded all the same: the Expand reads a constant target
    expand = next(n for n in written.graph.node if n.op_type == "Expand")
    assert expand.input[1] in {t.name for t in written.graph.initializer}
    assert not {"Shape", "Concat"} & {n.op_type for n in written.graph.node}
    # u keeps its element type, not the size it lied about
    u = _declared(written)["u"].tensor_type
    assert u.elem_type == onnx.TensorProto.FLOAT and not u.HasField("shape")
    original, result = Model.load(path), Model.load(out)
    for batch in (1, 2):  # x's free dimension broadcast by the Expand, and not
        got = assert_same_outputs(original, result, _feeds(batch))
        assert got["z"].shape == (8,)

    # the premise: kept as declared, the same rewrite gives a model onnxruntime cannot run
    monkeypatch.setattr(onnxopt.manager, "drop_contradicted_declarations", lambda model: 0)
    with pytest.raises(ValidationFailed, match="candidate does not run"):
        optimize(str(path), "default", output=str(tmp_path / "kept.onnx"), runs=0)


def test_verify_each_keeps_the_fold_that_the_declaration_would_have_broken():
    model = Model.from_proto(_proto(LYING))
    result = PassManager("fold-constants", verify_each=True, feeds=_feeds(1)).run(model)
    assert result.records[0].modified and not result.records[0].rolled_back
    assert "Concat" not in [n.op for n in model.graph.nodes]


AGREEING = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x, float[2, 4] y) => (float[N, 4] z)
<float[N, 4] u, float[batch, 4] v, float[?, ?] w, float[1, 4] k, int64[2] s, float[2, 4] e, int64[1] one = {0}>
{
    u = Relu(x)
    v = Sigmoid(u)
    w = Tanh(v)
    k = ReduceSum<keepdims = 1>(y, one)
    a = Shape<end = 1>(y)
    b = Shape<start = 1>(x)
    s = Concat<axis = 0>(a, b)
    e = Expand(k, s)
    m = ReduceSum<keepdims = 1>(e, one)
    z = Add(w, m)
}
"""


def test_declarations_that_agree_with_inference_are_kept_as_they_were(tmp_path):
    """The same symbol, another symbol (declares nothing fixed), unknown dimensions, and
    fixed sizes that inference proves all stay, byte for byte."""
    proto = _proto(AGREEING)
    out = tmp_path / "out.onnx"
    _, report = optimize(proto, "default", output=str(out), runs=0)
    assert report.passed and any(r["modified"] for r in report.passes)
    written = onnx.load(out)
    assert "Concat" not in {n.op_type for n in written.graph.node}  # the graph was rewritten
    declared, kept = _declared(proto), _declared(written)
    for name in ("u", "v", "w", "k", "e"):
        assert kept[name] == declared[name], name
    assert_same_outputs(Model.from_proto(proto), Model.load(out), _feeds(3))


CONTRADICTED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x, bool c) => (float[3, 3] z, int64[2, ?] nz)
<float[N, 5] sized, float[N] ranked, int64[N, 4] typed, float[1, 4] batch, int64[2, 3] data_dependent>
{
    sized = Relu(x)
    ranked = Sigmoid(x)
    typed = Tanh(x)
    batch = Neg(x)
    nz = NonZero(x)
    data_dependent = Identity(nz)
    z = If(c) <
        then_branch = g1 () => (float[3, 3] o1) <float[7, 7] inner> { inner = Constant<value = float[3, 3] {1,2,3,4,5,6,7,8,9}>() o1 = Abs(inner) },
        else_branch = g2 () => (float[3, 3] o2) { o2 = Constant<value = float[3, 3] {9,8,7,6,5,4,3,2,1}>() }
    >
}
"""


def _types(model: Model) -> dict[str, onnx.TypeProto]:
    proto = model.to_proto()
    found = {vi.name: vi.type for vi in proto.graph.value_info}
    for node in proto.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                found.update({vi.name: vi.type for vi in a.g.value_info})
    return found


def test_each_kind_of_contradiction_goes_and_nothing_else(caplog):
    proto = onnx.parser.parse_model(CONTRADICTED)
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 4  # a lying graph output: the contract
    model = Model.from_proto(proto)
    caplog.set_level("INFO", logger="onnxopt.declarations")
    assert drop_contradicted_declarations(model) == 5
    types = _types(model)
    # another fixed size (x's second dimension is 4, declared 5), or another rank: the shape goes
    for name in ("sized", "ranked", "inner"):
        assert types[name].tensor_type.elem_type == onnx.TensorProto.FLOAT, name
        assert not types[name].tensor_type.HasField("shape"), name
    assert "typed" not in types  # a wrong element type: nothing of it is left
    # a fixed size for a dimension the input leaves free (N) goes too ...
    assert not types["batch"].tensor_type.HasField("shape")
    # ... but not one inference cannot size (NonZero's count)
    assert [d.dim_value for d in types["data_dependent"].tensor_type.shape.dim] == [2, 3]
    out = model.to_proto().graph.output[0].type.tensor_type
    assert [d.dim_value for d in out.shape.dim] == [4, 3]
    assert "free dimension 'N'" in caplog.text and "element type int64, inferred float32" in caplog.text
    assert drop_contradicted_declarations(model) == 0  # what is left agrees


def test_a_pass_that_changes_nothing_leaves_the_declarations_alone():
    proto = _proto(LYING)
    model = Model.from_proto(proto)
    assert not PassManager("dead-nodes").run(model).modified
    assert model.to_proto() == proto


def test_the_check_adds_no_inference_for_the_pass_after_it(monkeypatch):
    """The inference the check runs after a change is the one the next pass gets."""
    calls = []
    infer = onnxopt.shapes._infer_shapes
    monkeypatch.setattr(onnxopt.shapes, "_infer_shapes", lambda model: calls.append(model) or infer(model))
    model = Model.from_proto(_proto(LYING))
    result = PassManager("fold-constants,eliminate-noops").run(model)
    assert result.records[0].modified and not result.records[1].modified
    # fold-constants infers once, the check after it once, and eliminate-noops reuses that
    assert len(calls) == 2
    calls.clear()
    monkeypatch.setattr(onnxopt.manager, "drop_contradicted_declarations", lambda model: 0)
    PassManager("fold-constants,eliminate-noops").run(Model.from_proto(_proto(LYING)))
    assert len(calls) == 2  # without the check, eliminate-noops infers itself


def _attention_case() -> onnx.ModelProto:
    """The expanded fp16 Attention node test as fuzz case 100047 had it: the declarations
    ONNX infers, then V's first dimension made dynamic (``d0``)."""
    from onnx.backend.test.case.node import function_testcase_helper

    node = onnx.helper.make_node("Attention", ["Q", "K", "V"], ["Y"])
    shapes = {"Q": [2, 3, 4, 8], "K": [2, 3, 6, 8], "V": [2, 3, 6, 8]}
    inputs = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT16, s) for n, s in shapes.items()]
    opsets = [onnx.helper.make_opsetid("", 23)]
    [(nodes, _)], _ = function_testcase_helper(node, [vi.type for vi in inputs], "test_attention_4d_fp16", opsets)
    graph = onnx.helper.make_graph(nodes, "test_attention_4d_fp16_expanded", inputs, [
        onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT16, [2, 3, 4, 8])])
    proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=11)
    proto = onnx.shape_inference.infer_shapes(proto)
    proto.graph.input[2].type.tensor_type.shape.dim[0].dim_param = "d0"
    onnx.checker.check_model(proto)
    return proto


def test_fuzz_case_100047_attention_with_a_free_batch_is_optimized_and_validated(tmp_path):
    path, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(_attention_case(), path)
    before = path.read_bytes()
    argv = [sys.executable, "-m", "onnxopt.cli", "optimize", str(path), "-o", str(out), "--runs", "0", "-q"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert path.read_bytes() == before
    original, result = Model.load(path), Model.load(out)
    rng = np.random.default_rng(0)
    feeds = {"Q": rng.standard_normal((2, 3, 4, 8)).astype(np.float16),
             "K": rng.standard_normal((2, 3, 6, 8)).astype(np.float16),
             "V": rng.standard_normal((1, 3, 6, 8)).astype(np.float16)}  # d0 = 1, broadcast
    np.testing.assert_allclose(run_model(result, feeds)["Y"].astype(np.float32),
                               run_model(original, feeds)["Y"].astype(np.float32), rtol=1e-3, atol=1e-3)
