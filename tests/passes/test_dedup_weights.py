"""dedup-weights: fires, does not fire (one test per guard), idempotent, equivalent,
subgraph scope, I/O kept, real models."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import builders
from models.digits import digits_mlp
from models.fetch import light_models
from onnxopt import Model
from onnxopt.errors import PipelineError
from onnxopt.fingerprint import content_bytes, fingerprint, signature
from onnxopt.framework import get_pass
from onnxopt.model import ExternalValues, extras, iter_graphs
from tests.helpers import assert_same_outputs, io_signature, node_count, parse, run_pass, with_weights
from tests.real_models import REAL_MODEL_NAMES, real_model


def _initializer_names(model: Model) -> list[str]:
    return [i.name for i in model.to_proto().graph.initializer]


def _inputs_read(model: Model, graph=None) -> list[list[str]]:
    graph = graph or model.graph
    return [[t.name for t in n.inputs] for n in graph.nodes]


def test_merges_identical_initializers_and_constant_nodes():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y, float[2] z, float[2] u)
        <float[2] a = {1.0, 2.0}, float[2] b = {1.0, 2.0}>
        {
            c = Constant <value = float[2] {1.0, 2.0}> ()
            y = Add(x, a)
            z = Mul(x, b)
            u = Sub(x, c)
        }
    """)
    ran = run_pass("dedup-weights", model)
    assert ran.modified
    assert ran.stats["merged"] == 2
    assert ran.stats["initializers_merged"] == 1 and ran.stats["constant_nodes_removed"] == 1
    assert ran.stats["bytes_saved"] == 16
    assert _initializer_names(ran.model) == ["a"]
    assert [n.op for n in ran.model.graph.nodes] == ["Add", "Mul", "Sub"]
    assert all(inputs[1] == "a" for inputs in _inputs_read(ran.model))
    assert io_signature(ran.model) == io_signature(model)
    assert_same_outputs(model, ran.model)


def test_constant_nodes_of_every_value_attribute_merge_by_value():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[3] x, int64[3] i) => (float[3] y, int64[3] j)
        {
            f1 = Constant <value_float = 3.0> ()
            f2 = Constant <value = float {3.0}> ()
            i1 = Constant <value_ints = [1, 2, 3]> ()
            i2 = Constant <value = int64[3] {1, 2, 3}> ()
            y0 = Mul(x, f1)
            y = Add(y0, f2)
            j0 = Mul(i, i1)
            j = Add(j0, i2)
        }
    """)
    ran = run_pass("dedup-weights", model)
    assert ran.stats["constant_nodes_removed"] == 2
    assert [n.op for n in ran.model.graph.nodes].count("Constant") == 2
    assert_same_outputs(model, ran.model)


_DTYPES = [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT8, TensorProto.UINT8,
           TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL, TensorProto.BFLOAT16,
           TensorProto.FLOAT8E4M3FN, TensorProto.INT4, TensorProto.STRING]


def _identity_pair(elem: int, make) -> onnx.ModelProto:
    """Initializers ``a`` and ``b`` of element type ``elem``, each read by an Identity. The
    tensors come from ``make`` (onnx.helper): the text format spells float16, bfloat16 and
    float8 values as bit patterns and does not pack int4."""
    t = TensorProto.DataType.Name(elem).lower()
    proto = onnx.parser.parse_model(f"""
        <ir_version: 10, opset_import: ["" : 21]>
        g () => ({t}[4] y, {t}[4] z) {{ y = Identity(a)  z = Identity(b) }}
    """)
    proto.graph.initializer.extend([make("a"), make("b")])
    return proto


@pytest.mark.parametrize("elem", _DTYPES, ids=lambda e: TensorProto.DataType.Name(e))
def test_every_element_type_merges_without_being_cast(elem):
    values = [b"x", b"yy", b"", b"z"] if elem == TensorProto.STRING else [1, 0, 1, 1]
    proto = _identity_pair(elem, lambda name: helper.make_tensor(name, elem, [4], values))
    onnx.checker.check_model(proto)
    model = Model.from_proto(proto)
    ran = run_pass("dedup-weights", model)
    assert ran.stats["merged"] == 1
    out = ran.model.to_proto()
    assert [t.name for t in out.graph.initializer] == ["a"]
    assert out.graph.initializer[0].data_type == elem  # stored as it was, never cast
    assert out.graph.initializer[0] == proto.graph.initializer[0]
    assert [n.input[0] for n in out.graph.node] == ["a", "a"]


def test_raw_and_typed_storage_of_the_same_values_merge():
    # The text spells typed values (float_data); numpy's array arrives as raw bytes.
    model = with_weights("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[3] x, float[3] raw) => (float[3] y, float[3] z)
        <float[3] typed = {1.5, -2.0, 0.25}>
        { y = Add(x, raw)  z = Mul(x, typed) }
    """, raw=np.array([1.5, -2.0, 0.25], np.float32))
    storage = {i.name: i.HasField("raw_data") for i in model.to_proto().graph.initializer}
    assert storage == {"raw": True, "typed": False}
    ran = run_pass("dedup-weights", model)
    assert ran.stats["merged"] == 1
    assert_same_outputs(model, ran.model)


@pytest.mark.parametrize("a, b", [
    ("float[2] a = {0.0, 1.0}", "float[2] b = {-0.0, 1.0}"),  # equal values, different bytes
    ("float[4] a = {1.0, 2.0, 3.0, 4.0}", "float[2,2] b = {1.0, 2.0, 3.0, 4.0}"),  # shape
    ("int32[2] a = {1065353216, 0}", "float[2] b = {1.0, 0.0}"),  # same bytes, other type
], ids=["signed-zero", "shape", "dtype"])
def test_does_not_merge_what_only_looks_alike(a, b):
    shape_a = a.split()[0].split("[")[1].rstrip("]")
    shape_b = b.split()[0].split("[")[1].rstrip("]")
    ta, tb = a.split()[0].split("[")[0], b.split()[0].split("[")[0]
    model = parse(f"""
        <ir_version: 9, opset_import: ["" : 18]>
        g () => ({ta}[{shape_a}] y, {tb}[{shape_b}] z)
        <{a}, {b}>
        {{ y = Identity(a)  z = Identity(b) }}
    """)
    ran = run_pass("dedup-weights", model)
    assert not ran.modified and ran.stats["merged"] == 0
    assert _initializer_names(ran.model) == ["a", "b"]


def test_confirms_bytes_when_digests_collide(monkeypatch):
    import onnxopt.passes.dedup_weights as mod

    class Same:
        def __init__(self, *args, **kwargs):
            pass

        def digest(self):
            return b"0" * 16

    monkeypatch.setattr(mod.hashlib, "blake2b", Same)
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y, float[2] z, float[2] u)
        <float[2] a = {1.0, 2.0}, float[2] b = {3.0, 4.0}, float[2] c = {1.0, 2.0}>
        { y = Add(x, a)  z = Add(x, b)  u = Add(x, c) }
    """)
    ran = run_pass("dedup-weights", model)
    assert ran.stats["merged"] == 1  # c into a; b only collided
    assert _initializer_names(ran.model) == ["a", "b"]
    assert_same_outputs(model, ran.model)


def test_overridable_initializers_are_never_merged():
    # IR 3: the weights are graph inputs too, so a user may feed either one.
    model = parse("""
        <ir_version: 3, opset_import: ["" : 9]>
        g (float[2] x, float[2] a, float[2] b) => (float[2] y, float[2] z)
        <float[2] a = {1.0, 2.0}, float[2] b = {1.0, 2.0}>
        { y = Add(x, a)  z = Mul(x, b) }
    """)
    ran = run_pass("dedup-weights", model)
    assert not ran.modified
    assert ran.stats["skipped_overridable"] == 2
    assert io_signature(ran.model) == io_signature(model)
    assert_same_outputs(model, ran.model, {"x": np.array([1.0, -1.0], np.float32)})


def test_constant_that_is_a_graph_output_stays():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y, float[2] c)
        <float[2] a = {1.0, 2.0}>
        { c = Constant <value = float[2] {1.0, 2.0}> ()  y = Add(x, c) }
    """)
    ran = run_pass("dedup-weights", model)
    assert ran.stats["constant_nodes_removed"] == 0 and ran.stats["skipped_graph_output"] == 1
    assert [n.op for n in ran.model.graph.nodes] == ["Constant", "Add"]
    assert io_signature(ran.model) == io_signature(model)


def test_unused_duplicates_are_left_to_dead_nodes():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y)
        <float[2] a = {1.0, 2.0}, float[2] unused = {1.0, 2.0}>
        { y = Add(x, a) }
    """)
    ran = run_pass("dedup-weights", model)
    assert not ran.modified


def test_min_bytes_leaves_small_constants():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y, float[2] z)
        <float[2] a = {1.0, 2.0}, float[2] b = {1.0, 2.0}>
        { y = Add(x, a)  z = Mul(x, b) }
    """)
    assert not run_pass("dedup-weights", model, min_bytes=9).modified
    assert run_pass("dedup-weights", model, min_bytes=8).modified


def test_rejects_a_negative_min_bytes():
    with pytest.raises(PipelineError, match="min_bytes"):
        get_pass("dedup-weights")(min_bytes=-1)


def test_is_idempotent():
    model = Model.from_proto(builders.dead_branches())
    once = run_pass("dedup-weights", model)
    twice = run_pass("dedup-weights", once.model)
    assert once.modified and once.stats["initializers_merged"] == 1 and once.stats["bytes_saved"] == 8 * 8 * 9 * 4
    assert not twice.modified
    assert twice.model.to_bytes() == once.model.to_bytes()
    assert_same_outputs(model, once.model)


# ---- subgraphs -------------------------------------------------------------------------

_IF_MODEL = """
    <ir_version: 9, opset_import: ["" : 18]>
    g (bool c, float[2] x) => (float[2] y, float[2] z)
    <float[2] outer = {1.0, 2.0}>
    {
        z = Sub(x, outer)
        y = If(c) <
            then_branch = t () => (float[2] a) <float[2] inner_t = {1.0, 2.0}> { a = Add(x, inner_t) },
            else_branch = e () => (float[2] b) { k = Constant <value = float[2] {1.0, 2.0}> ()  b = Mul(x, k) }
        >
    }
"""


#: One feed per branch of the Ifs on ``c``: true, then false.
_BOTH_BRANCHES = [{"c": np.array(flag), "x": np.array([3.0, -4.0], np.float32)} for flag in (True, False)]


def test_subgraph_constants_read_the_outer_copy():
    model = parse(_IF_MODEL)
    ran = run_pass("dedup-weights", model)
    assert ran.stats["merged"] == 2  # the branch initializer and the branch Constant node
    then_g, else_g = (g for g in iter_graphs(ran.model.graph) if g is not ran.model.graph)
    assert not extras(then_g).initializers
    assert [n.op for n in else_g.nodes] == ["Mul"]
    assert then_g.nodes[0].inputs[1] is extras(ran.model.graph).initializers[0]
    proto = ran.model.to_proto()
    assert [i.name for i in proto.graph.initializer] == ["outer"]
    assert_same_outputs(model, ran.model, _BOTH_BRANCHES)


def test_outer_constant_is_never_replaced_by_an_inner_one():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (bool c, float[2] x) => (float[2] y, float[2] z)
        {
            y = If(c) <
                then_branch = t () => (float[2] a) <float[2] inner = {1.0, 2.0}> { a = Add(x, inner) },
                else_branch = e () => (float[2] b) { b = Neg(x) }
            >
            k = Constant <value = float[2] {1.0, 2.0}> ()
            z = Mul(x, k)
        }
    """)
    ran = run_pass("dedup-weights", model)
    # The outer Constant node comes after the If: the body cannot read it, and the outer
    # graph cannot read the body's initializer. Nothing changes.
    assert not ran.modified
    assert ran.stats["skipped_out_of_scope"] == 1
    assert [n.op for n in ran.model.graph.nodes] == ["If", "Constant", "Mul"]


def test_outer_constant_node_before_the_body_is_shared():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (bool c, float[2] x) => (float[2] y, float[2] z)
        {
            k = Constant <value = float[2] {1.0, 2.0}> ()
            z = Mul(x, k)
            y = If(c) <
                then_branch = t () => (float[2] a) <float[2] inner = {1.0, 2.0}> { a = Add(x, inner) },
                else_branch = e () => (float[2] b) { b = Neg(x) }
            >
        }
    """)
    ran = run_pass("dedup-weights", model)
    assert ran.stats["initializers_merged"] == 1
    assert_same_outputs(model, ran.model, _BOTH_BRANCHES)


def test_sibling_bodies_do_not_share():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (bool c, float[2] x) => (float[2] y)
        {
            y = If(c) <
                then_branch = t () => (float[2] a) <float[2] p = {1.0, 2.0}> { a = Add(x, p) },
                else_branch = e () => (float[2] b) <float[2] q = {1.0, 2.0}> { b = Mul(x, q) }
            >
        }
    """)
    ran = run_pass("dedup-weights", model)
    assert not ran.modified and ran.stats["skipped_out_of_scope"] == 1
    assert_same_outputs(model, ran.model, _BOTH_BRANCHES)


def test_duplicates_within_one_body_merge():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (bool c, float[2] x) => (float[2] y)
        {
            y = If(c) <
                then_branch = t () => (float[2] a) <float[2] p = {1.0, 2.0}, float[2] q = {1.0, 2.0}>
                    { a0 = Add(x, p)  a = Mul(a0, q) },
                else_branch = e () => (float[2] b) { b = Neg(x) }
            >
        }
    """)
    ran = run_pass("dedup-weights", model)
    assert ran.stats["initializers_merged"] == 1
    assert_same_outputs(model, ran.model, _BOTH_BRANCHES)


def test_a_name_shadowed_in_between_blocks_the_merge():
    # The body has its own tensor named like the outer constant: reading the outer one by
    # name from inside the body would be ambiguous, so the body keeps its copy.
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (bool c, float[2] x) => (float[2] y, float[2] z)
        <float[2] w = {1.0, 2.0}>
        {
            z = Add(x, w)
            y = If(c) <
                then_branch = t () => (float[2] a) <float[2] k = {1.0, 2.0}> { v = Neg(x)  a = Add(v, k) },
                else_branch = e () => (float[2] b) { b = Neg(x) }
            >
        }
    """)
    assert run_pass("dedup-weights", model).stats["merged"] == 1  # without the clash it merges
    then_g = next(g for g in iter_graphs(model.graph) if g.name == "t")
    then_g.nodes[0].outputs[0].name = "w"  # an exporter reusing names (the checker forbids it)
    ran = get_pass("dedup-weights")().run(model, None)
    assert not ran.modified and ran.stats["skipped_out_of_scope"] == 1
    assert then_g.nodes[1].inputs[1].name == "k"


def test_loop_body_reads_the_outer_weight():
    model = Model.from_proto(builders.control_flow())
    body = next(g for g in iter_graphs(model.graph) if g.name == "loop_body")
    # give the body its own copy of the outer 'scale' weight
    scale = next(t for t in extras(model.graph).initializers if t.name == "scale")
    from onnx_graphsurgeon import Constant
    copy = Constant("body_scale", np.array(scale.values, copy=True))
    extras(body).initializers.append(copy)
    body.nodes[0].inputs[1] = copy
    copy_model = model.copy()  # a saved and reloaded model, to compare with
    ran = run_pass("dedup-weights", copy_model)
    assert ran.stats["initializers_merged"] == 1
    new_body = next(g for g in iter_graphs(ran.model.graph) if g.name == "loop_body")
    assert new_body.nodes[0].inputs[1].name == "scale"
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    for sign in (1, -1):
        assert_same_outputs(copy_model, ran.model, {"x": sign * np.abs(x)})


# ---- data is read only when needed -----------------------------------------------------


def test_external_data_is_read_only_for_tensors_sharing_a_header(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    with_weights("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[1, 64] x, float[64, 64] w1, float[64, 64] w2, float[32, 64] lonely) => (float[1, 32] y)
        { a = MatMul(x, w1)  b = MatMul(a, w2)  y = Gemm <transB = 1> (b, lonely) }
    """, w1=w, w2=w.copy(), lonely=rng.standard_normal((32, 64)).astype(np.float32)).save(
        tmp_path / "m.onnx", external_data=True)
    model = Model.load(tmp_path / "m.onnx")
    assert model.has_external_data()
    read: list[str] = []
    original = ExternalValues.read_bytes

    def counting(self):
        read.append(self.tensor.name)
        return original(self)

    monkeypatch.setattr(ExternalValues, "read_bytes", counting)
    ran = get_pass("dedup-weights")().run(model, None)
    assert ran.stats["merged"] == 1
    assert "lonely" not in read and {"w1", "w2"} <= set(read)
    assert all(isinstance(t._values, ExternalValues) for t in model.constants())  # nothing decoded
    out = tmp_path / "out.onnx"
    model.save(out, external_data=True)
    assert_same_outputs(Model.load(tmp_path / "m.onnx"), Model.load(out))


def test_fingerprint_reads_the_header_first():
    t = numpy_helper.from_array(np.arange(6, dtype=np.int16).reshape(2, 3), "t")
    const = Model.from_proto(_identity_pair(TensorProto.INT16, lambda n: helper.make_tensor(
        n, TensorProto.INT16, [4], [1, 2, 3, 4]))).constants().__next__()
    assert signature(const) == (TensorProto.INT16, (4,), "std")
    assert content_bytes(const) == np.array([1, 2, 3, 4], "<i2").tobytes()
    arr = numpy_helper.to_array(t)
    assert fingerprint(arr)[:3] == (TensorProto.INT16, (2, 3), "std")
    assert fingerprint(arr) == fingerprint(np.arange(6, dtype=np.int16).reshape(2, 3))
    assert fingerprint(arr) != fingerprint(arr.astype(np.int32))


# ---- real models (tests/conformance holds dedup-weights alone on them to the contract) ---


@pytest.mark.parametrize("name", REAL_MODEL_NAMES)
def test_real_models_share_their_repeated_constants(name):
    model = Model.load(real_model(name))
    ran = run_pass("dedup-weights", model)
    assert ran.modified and ran.stats["constant_nodes_removed"] > 50  # Paddle repeats 3.0, 6.0, axes ...
    assert node_count(ran.model) == node_count(model) - ran.stats["constant_nodes_removed"]


@pytest.mark.parametrize("path", light_models(), ids=lambda p: p.stem)
def test_ir3_light_models_merge_no_overridable_weight(path):
    model = Model.load(path)
    ran = run_pass("dedup-weights", model)
    proto = onnx.load(path)
    assert not ran.modified
    assert ran.stats["skipped_overridable"] == len(proto.graph.initializer)
    assert io_signature(ran.model) == io_signature(model)


def test_digits_classifier_keeps_its_accuracy():
    from models.digits import accuracy, digits_split

    proto = digits_mlp()
    model = Model.from_proto(proto)
    ran = run_pass("dedup-weights", model)
    assert not ran.modified  # trained weights: no two are alike
    _, x_test, _, y_test = digits_split()
    assert accuracy(ran.model.to_proto(), x_test, y_test) == accuracy(proto, x_test, y_test)


def test_silero_vad_bodies_read_outer_constants():
    model = Model.load(real_model("silero-vad"))
    ran = run_pass("dedup-weights", model)
    assert ran.stats["constant_nodes_removed"] > 200  # most of them inside the 25 If bodies
    assert ran.stats["skipped_out_of_scope"] > 0  # duplicates in sibling branches stay
