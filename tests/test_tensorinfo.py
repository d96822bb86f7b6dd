"""ShapeIndex: per-tensor shapes that rewrites can trust."""

from __future__ import annotations

import numpy as np
import onnx

from onnxopt import Model
from onnxopt.tensorinfo import ShapeIndex, known_dims
from tests.helpers import parse


def _tensor(model: Model, name: str):
    from onnxopt.model import iter_graphs

    for g in iter_graphs(model.graph):
        for n in g.nodes:
            for t in n.outputs:
                if t.name == name:
                    return t
        for t in g.inputs:
            if t.name == name:
                return t
    raise KeyError(name)


def test_static_dynamic_and_constant_tensors():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[N,3] x) => (float[N,3] y)
        <float[3] w = {1.0, 2.0, 3.0}>
        { c = Constant<value = float[2,2] {1.0, 2.0, 3.0, 4.0}>()  y = Add(x, w)  z = Relu(c) }
    """)
    index = ShapeIndex(model)
    y, c = _tensor(model, "y"), _tensor(model, "c")
    assert index.dims(y) == (None, 3) and index.rank(y) == 2 and index.static(y) is None
    assert index.dtype(y) == np.float32
    assert index.static(c) == (2, 2)
    w = model.graph.nodes[1].inputs[1]
    assert index.static(w) == (3,) and index.dtype(w) == np.float32


def test_minus_one_and_question_marks_are_unknown():
    assert known_dims([-1, "?", 3, None, "N"]) == (None, None, 3, None, None)
    proto = onnx.parser.parse_model("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[A,B] x) => (float[A,B] y) { y = Relu(x) }
    """)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_value = -1
    dims[1].Clear()
    dims[1].dim_param = "?"
    model = Model.from_proto(proto)
    assert ShapeIndex(model).dims(_tensor(model, "y")) == (None, None)


def test_a_name_reused_by_sibling_branches_gets_no_shape():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (bool c, float[2] x, float[3,4] z) => (int64 y)
        { y = If(c) <then_branch = t () => (int64[1] r) { r = Shape(x) },
                     else_branch = e () => (int64[2] q) { r = Shape(z)  q = Neg(r) }> }
    """)
    index = ShapeIndex(model)
    branches = model.graph.nodes[0].attrs
    r_then = branches["then_branch"].nodes[0].outputs[0]
    r_else = branches["else_branch"].nodes[0].outputs[0]
    assert index.info(r_then) is None and index.info(r_else) is None  # inference answers by name
    assert index.static(branches["else_branch"].nodes[1].outputs[0]) == (2,)


def test_loop_bodies_and_what_follows_a_loop_keep_only_their_dtype():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y)
        <int64 trip = {3}>
        { l = Loop(trip, , x) <body = b (int64 i, bool cin, float[2] acc) => (bool cout, float[2] nxt)
              { cout = Identity(cin)  nxt = Neg(acc) }>
          y = Relu(l) }
    """)
    index = ShapeIndex(model)
    body = model.graph.nodes[0].attrs["body"]
    nxt = body.nodes[1].outputs[0]
    assert index.dtype(nxt) == np.float32 and index.dims(nxt) is None
    y = model.graph.nodes[1].outputs[0]
    assert index.dtype(y) == np.float32 and index.dims(y) is None


def test_ranks_after_an_opset_12_reshape_with_a_computed_target():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 12]>
        g (float[N,6] x, int64[3] s) => (float y)
        { r = Reshape(x, s)  t = Transpose<perm = [0, 2, 1]>(r)  y = Relu(t) }
    """)
    index = ShapeIndex(model)
    assert index.rank(_tensor(model, "r")) == 3  # ONNX inference says nothing here
    assert index.rank(_tensor(model, "y")) == 3


def test_an_index_answers_for_a_copy_of_its_model_without_inferring_again(monkeypatch):
    model = parse("""
        <ir_version: 8, opset_import: ["" : 12]>
        g (float[N,6] x, int64[3] s) => (float y)
        { r = Reshape(x, s)  t = Transpose<perm = [0, 2, 1]>(r)  y = Relu(t) }
    """)
    index = ShapeIndex(model)
    copy = model.copy()
    import onnxopt.tensorinfo

    monkeypatch.setattr(onnxopt.tensorinfo, "infer_shapes", lambda m: {})  # would blind it
    of_copy = index.for_copy(copy)
    r, r_copy = _tensor(model, "r"), _tensor(copy, "r")
    assert r_copy is not r
    assert of_copy.rank(r_copy) == 3 and of_copy.dtype(r_copy) == np.float32
    assert of_copy.dims(_tensor(copy, "x")) == (None, 6)
    assert of_copy.info(r) is None and index.info(r_copy) is None  # answers are by identity
