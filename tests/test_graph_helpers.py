"""detach_nodes, NameAllocator, const_through_shape_ops and write_constant: the graph
helpers the passes lean on."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph import NameAllocator, const_through_shape_ops, detach_nodes, write_constant
from onnxopt.model import extras
from tests.helpers import parse, run_model


def test_detach_nodes_unlinks_them_and_their_bodies_only():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (bool c, float[2] x) => (float[2] y)
        <float[2] k = {1.0, 2.0}>
        {
            a = Mul(x, k)
            b = Mul(x, k)
            d = If(c) <then_branch = t () => (float[2] p) { p = Add(x, k) },
                       else_branch = e () => (float[2] q) { q = Neg(x) }>
            y = Add(a, x)
        }
    """)
    g = model.graph
    k = g.nodes[0].inputs[1]
    x = g.inputs[1]
    assert len(k.outputs) == 3 and len(x.outputs) == 5  # Mul, Mul, body Add; Mul, Mul, body Add, body Neg, Add
    detach_nodes([g.nodes[1], g.nodes[2]])
    assert [n.op for n in k.outputs] == ["Mul"] and k.outputs[0] is g.nodes[0]
    assert [n.op for n in x.outputs] == ["Mul", "Add"]
    assert not g.nodes[1].inputs and not g.nodes[1].outputs and not g.nodes[2].inputs
    assert len(g.nodes) == 4  # the caller takes them out of the list


def test_name_allocator_gives_the_first_free_suffix_every_time():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] w) => (float[2] y) { w_1 = Neg(w)  w_3 = Neg(w_1)  y = Relu(w_3) }
    """)
    names = NameAllocator(model)
    assert [names("w") for _ in range(4)] == ["w_2", "w_4", "w_5", "w_6"]
    assert names("fresh") == "fresh" and names("fresh") == "fresh_1"
    assert len({names("") for _ in range(1000)}) == 1000


SHAPE_CHAINS = """
    <ir_version: 9, opset_import: ["" : 18]>
    g (float[1, 3, 2, 2] x, float[3] fed) => (float[1, 3, 2, 2] y)
    <float[3] b = {1.0, 2.0, 3.0}, int64[4] s = {1, 3, 1, 1}, int64[2] ax = {0, 2},
     float[2, 3] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}>
    {
        r = Reshape(b, s)
        c = Cast <to = 10> (r)
        u = Unsqueeze(b, ax)
        k = Constant <value = float[3] {4.0, 5.0, 6.0}> ()
        ki = Identity(k)
        wt = Transpose <perm = [1, 0]> (w)
        f = Reshape(fed, s)
        n = Relu(b)
        nr = Reshape(n, s)
        d1 = Identity(b)
        d2 = Identity(d1)
        d3 = Identity(d2)
        d4 = Identity(d3)
        d5 = Identity(d4)
        y0 = Add(x, r)
        y1 = Add(y0, c)
        y2 = Add(y1, f)
        y3 = Add(y2, nr)
        y = Add(y3, d5)
    }
"""


def _tensor(model, name):
    return next(t for t in model.graph.tensors().values() if t.name == name)


def test_const_through_shape_ops_reads_constants_through_reshape_cast_unsqueeze_transpose():
    model = parse(SHAPE_CHAINS)
    b = np.array([1.0, 2.0, 3.0], np.float32)
    got = const_through_shape_ops(_tensor(model, "r"))
    np.testing.assert_array_equal(got, b.reshape(1, 3, 1, 1))
    cast = const_through_shape_ops(_tensor(model, "c"))
    assert cast.dtype == np.float16 and cast.shape == (1, 3, 1, 1)
    assert const_through_shape_ops(_tensor(model, "u")).shape == (1, 3, 1)
    np.testing.assert_array_equal(const_through_shape_ops(_tensor(model, "ki")), [4.0, 5.0, 6.0])
    np.testing.assert_array_equal(const_through_shape_ops(_tensor(model, "wt")),
                                  np.array([[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]], np.float32))


def test_const_through_shape_ops_stops_at_inputs_other_ops_and_depth():
    model = parse(SHAPE_CHAINS)
    assert const_through_shape_ops(_tensor(model, "f")) is None  # a graph input underneath
    assert const_through_shape_ops(_tensor(model, "nr")) is None  # Relu is not a shape op
    assert const_through_shape_ops(_tensor(model, "x")) is None
    assert const_through_shape_ops(_tensor(model, "d4")) is not None  # four Identities deep
    assert const_through_shape_ops(_tensor(model, "d5")) is None
    assert const_through_shape_ops(_tensor(model, "d5"), depth=5) is not None


def test_const_through_shape_ops_leaves_overridable_initializers_alone():
    model = parse("""
        <ir_version: 3, opset_import: ["" : 9]>
        g (float[3] x, float[3] b) => (float[3] y)
        <float[3] b = {1.0, 2.0, 3.0}>
        { bi = Identity(b)  y = Add(x, bi) }
    """)
    assert const_through_shape_ops(_tensor(model, "bi")) is None


def test_const_through_shape_ops_does_not_read_a_constant_over_max_bytes():
    model = parse(SHAPE_CHAINS)
    assert const_through_shape_ops(_tensor(model, "d1"), max_bytes=12) is not None  # 3 float32
    assert const_through_shape_ops(_tensor(model, "d1"), max_bytes=11) is None
    r = _tensor(model, "r")  # every constant read counts, the target shape (4 int64) too
    assert const_through_shape_ops(r, max_bytes=32) is not None
    assert const_through_shape_ops(r, max_bytes=31) is None
    assert const_through_shape_ops(_tensor(model, "ki"), max_bytes=11) is None  # a Constant node
    assert const_through_shape_ops(_tensor(model, "ki"), max_bytes=12) is not None


WRITE = """
    <ir_version: 9, opset_import: ["" : 18]>
    g (float[1, 2, 3, 3] x) => (float[1, 2, 3, 3] y, float[1, 2, 3, 3] z)
    <float[2, 2, 1, 1] w = {1.0, 2.0, 3.0, 4.0}, float[2, 2, 1, 1] shared = {1.0, 0.0, 0.0, 1.0},
     int64[1] s = {2}>
    {
        bc = Constant <value = float[1, 2] {0.5, -0.5}> ()
        b = Reshape(bc, s)
        a = Conv(x, w, b)
        y = Conv(a, shared)
        z = Conv(x, shared)
    }
"""


def test_write_constant_in_place_keeps_the_dtype():
    model = parse(WRITE)
    conv = model.graph.nodes[2]
    w = conv.inputs[1]
    write_constant(model, conv, 1, np.full((2, 2, 1, 1), 2, dtype=np.float64))
    assert conv.inputs[1] is w and w.values.dtype == np.float32
    np.testing.assert_array_equal(w.values.reshape(-1), [2.0, 2.0, 2.0, 2.0])


def test_write_constant_gives_a_shared_constant_a_new_one():
    model = parse(WRITE)
    y_conv = model.graph.nodes[3]
    shared = y_conv.inputs[1]
    write_constant(model, y_conv, 1, np.zeros((2, 2, 1, 1), np.float32))
    assert y_conv.inputs[1] is not shared and y_conv.inputs[1].name == "shared_1"
    assert shared.values.reshape(-1).tolist() == [1.0, 0.0, 0.0, 1.0]  # z still reads it


def test_write_constant_removes_the_chain_that_computed_the_old_value():
    model = parse(WRITE)
    conv = model.graph.nodes[2]
    before = run_model(model, {"x": np.ones((1, 2, 3, 3), np.float32)})
    write_constant(model, conv, 2, np.array([0.5, -0.5], np.float32))  # the same bias, now plain
    assert [n.op for n in model.graph.nodes] == ["Conv", "Conv", "Conv"]
    assert "s" not in {t.name for t in extras(model.graph).initializers}
    onnx.checker.check_model(model.to_proto())
    after = run_model(model, {"x": np.ones((1, 2, 3, 3), np.float32)})
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-6)


def test_write_constant_adds_a_missing_bias():
    model = parse(WRITE)
    z_conv = model.graph.nodes[4]
    write_constant(model, z_conv, 2, np.array([1.0, 2.0], np.float32))
    bias = z_conv.inputs[2]
    assert isinstance(bias, gs.Constant) and bias.name == "z_bias"
    out = run_model(model, {"x": np.zeros((1, 2, 3, 3), np.float32)})["z"]
    np.testing.assert_allclose(out[0, :, 0, 0], [1.0, 2.0])


def test_write_constant_leaves_the_clean_up_to_a_caller_that_collects():
    model = parse(WRITE)
    conv = model.graph.nodes[2]
    names, replaced = NameAllocator(model), []
    write_constant(model, conv, 2, np.array([0.5, -0.5], np.float32), names=names, replaced=replaced)
    assert [t.name for t in replaced] == ["b"]
    assert [n.op for n in model.graph.nodes] == ["Constant", "Reshape", "Conv", "Conv", "Conv"]
