"""drop_nodes and prune_unused: what a rewrite leaves behind goes, nothing else."""

from __future__ import annotations

import onnx

from onnxopt import Model
from onnxopt.graph import replace_uses
from onnxopt.model import extras
from onnxopt.rewrite import Edits, const_value_if_small, drop_nodes, prune_unused
from tests.helpers import ops, parse


def test_prune_removes_the_chain_that_only_fed_a_rewired_node():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y, float[2] z)
        <float[2] w = {1.0, 2.0}, float[2] keep = {3.0, 4.0}>
        { a = Mul(x, w)  b = Relu(a)  y = Add(b, keep)  z = Add(x, keep) }
    """)
    add = model.graph.nodes[2]
    old = add.inputs[0]
    add.inputs[0] = model.graph.inputs[0]  # y = x + keep now
    removed, released = prune_unused(model, [old])
    assert (removed, released) == (2, 1)
    assert ops(model) == ["Add", "Add"]
    assert [t.name for t in extras(model.graph).initializers] == ["keep"]
    onnx.checker.check_model(model.to_proto())


def test_prune_keeps_graph_outputs_inputs_and_shared_tensors():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y, float[2] a)
        { a = Relu(x)  b = Neg(a)  y = Neg(b) }
    """)
    y = model.graph.nodes[2]
    replace_uses(y.inputs[0], model.graph.inputs[0])
    removed, _ = prune_unused(model, [model.graph.nodes[1].outputs[0], model.graph.inputs[0]])
    assert removed == 1 and ops(model) == ["Relu", "Neg"]  # a is a graph output: kept


def _fifty_readers_of_c(reader: str, first: str = "") -> Model:
    """``first`` then fifty copies of ``reader`` (``{i}`` numbers them), each making an
    output ``y{i}``, over the constants c and d."""
    body = "  ".join(reader.format(i=i) for i in range(50))
    outs = ", ".join(f"float[2] y{i}" for i in range(50))
    return parse(f"""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => ({outs})
        <float[2] c = {{1.0, 2.0}}, float[2] d = {{3.0, 4.0}}>
        {{ {first} {body} }}
    """)


def test_drop_nodes_unlinks_from_a_widely_shared_constant():
    model = _fifty_readers_of_c("y{i} = Mul(x, c)")
    c = model.graph.nodes[0].inputs[1]
    dead = {id(n) for n in model.graph.nodes[::2]}
    read = drop_nodes(model, dead)
    assert len(model.graph.nodes) == 25 and len(c.outputs) == 25
    assert all(any(c is t for t in n.inputs) for n in c.outputs)
    assert sum(1 for t in read if t is c) == 25


def test_const_value_if_small_does_not_load_large_weights():
    import numpy as np
    from onnx import numpy_helper
    from onnx_graphsurgeon.ir.tensor import LazyValues

    from onnxopt import Model

    proto = onnx.parser.parse_model("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[512,1024] x) => (float[512,1024] y) { y = Add(x, w) }
    """)
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros((512, 1024), np.float32), "w"))
    model = Model.from_proto(proto)
    w = model.graph.nodes[0].inputs[1]
    assert const_value_if_small(w) is None and isinstance(w._values, LazyValues)  # 2 MB: left on disk
    assert const_value_if_small(w, limit=4 << 20).shape == (512, 1024)


def test_edits_rewire_remove_and_commit_in_one_sweep():
    model = _fifty_readers_of_c("a{i} = Mul(x, c)  y{i} = Relu(a{i})", first="n = Neg(x)")
    nodes = model.graph.nodes
    c = nodes[1].inputs[1]
    edits = Edits()
    muls = [n for n in nodes if n.op == "Mul"]
    for mul in muls[:25]:  # read d instead of c
        edits.rewire(mul, [mul.inputs[0], extras(model.graph).initializers[1]])
    for mul, relu in zip(muls[25:], [n for n in nodes if n.op == "Relu"][25:]):
        edits.take_output(mul, relu)  # the Mul produces y_i; the Relu goes
    edits.remove(nodes[0])
    assert len(model.graph.nodes) == 101  # nothing leaves its graph before commit
    removed, released = edits.commit(model)
    assert (removed, released) == (26, 0)
    assert sorted(ops(model)) == ["Mul"] * 50 + ["Relu"] * 25
    assert len(c.outputs) == 25 and all(any(c is t for t in n.inputs) for n in c.outputs)
    for mul in muls[25:]:
        edits.rewire(mul, [mul.inputs[0], extras(model.graph).initializers[1]])
    assert edits.commit(model) == (0, 1)  # c is read by nothing now
    assert [t.name for t in extras(model.graph).initializers] == ["d"]
    onnx.checker.check_model(model.to_proto())


def test_prune_counts_each_reader_once_when_a_body_dies_before_its_holder():
    """The inner If dies first (nothing reads it); when the outer If dies, its bodies'
    nodes — the inner If's among them — must not be counted as readers lost twice."""
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x, bool c) => (float[2] y) {
            a = Add(x, x)
            y = Relu(a)
            o = If(c) <then_branch = t () => (float[2] t_out) {
                    inner = If(c) <then_branch = t2 () => (float[2] p) { p = Neg(a) },
                                   else_branch = e2 () => (float[2] q) { q = Tanh(a) }>
                    t_out = Neg(x)
                }, else_branch = e () => (float[2] e_out) { e_out = Neg(x) }>
            r = Identity(o)
        }
    """)
    outer, identity = model.graph.nodes[2], model.graph.nodes[3]
    inner = outer.attrs["then_branch"].nodes[0]
    read = drop_nodes(model, {id(identity)})
    removed, _ = prune_unused(model, read + [inner.outputs[0]])  # the inner If is looked at first
    assert removed == 6 and ops(model) == ["Add", "Relu"]  # both Ifs, their four body nodes
    onnx.checker.check_model(model.to_proto())
