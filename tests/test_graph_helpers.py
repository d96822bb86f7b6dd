"""detach_nodes and NameAllocator: the graph helpers the simplification passes lean on."""

from __future__ import annotations

from onnxopt.graph import NameAllocator, detach_nodes
from tests.helpers import parse


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
