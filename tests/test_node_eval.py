"""onnxopt.node_eval against onnxruntime: every case either gives onnxruntime's values to
the bit (same element type, shape and bytes) or is declined; never a value where
onnxruntime gives another one or refuses the node."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import helper

from onnxopt.node_eval import NUMPY_OPS, NodeEvaluator, NotEvaluable, evaluate_node

I64, I32, F32 = np.int64, np.int32, np.float32
INT64_MIN, INT32_MIN = np.iinfo(np.int64).min, np.iinfo(np.int32).min
_rng = np.random.default_rng(0)
X = _rng.standard_normal((2, 3, 4)).astype(F32)


def a(values, dtype):
    return np.array(values, dtype=dtype)


def _attrs_proto(attrs: dict) -> list[onnx.AttributeProto]:
    out = []
    for k, v in attrs.items():
        if isinstance(v, np.ndarray):
            out.append(helper.make_attribute(k, onnx.numpy_helper.from_array(v)))
        else:
            out.append(helper.make_attribute(k, v))
    return out


def _gs_attrs(attrs: dict) -> dict:
    return {k: gs.Constant("", v) if isinstance(v, np.ndarray) else v for k, v in attrs.items()}


def run_ort(op, inputs, attrs, n_out, opset):
    names = [f"i{k}" if v is not None else "" for k, v in enumerate(inputs)]
    outs = [f"o{k}" for k in range(n_out)]
    node = helper.make_node(op, names, outs)
    node.attribute.extend(_attrs_proto(attrs))
    graph = helper.make_graph(
        [node], "t",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
         for n, v in zip(names, inputs) if v is not None],
        [onnx.ValueInfoProto(name=o) for o in outs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {n: v for n, v in zip(names, inputs) if v is not None})


def run_numpy(op, inputs, attrs, n_out):
    node = gs.Node(op, attrs=_gs_attrs(attrs), inputs=[gs.Variable(f"i{k}") for k in range(len(inputs))],
                   outputs=[gs.Variable(f"o{k}") for k in range(n_out)])
    return evaluate_node(node, list(inputs))


# (op, inputs, attributes, number of outputs, opset)
CASES = [
    ("Identity", [X], {}, 1, 17),
    ("Reshape", [X, a([4, -1], I64)], {}, 1, 17),
    ("Reshape", [X, a([0, -1], I64)], {}, 1, 17),
    ("Reshape", [X, a([0, 0, 2, 2], I64)], {}, 1, 17),
    ("Reshape", [X, a([-1, 0], I64)], {"allowzero": 1}, 1, 17),
    ("Reshape", [X, a([4, -1], I32)], {}, 1, 17),
    ("Reshape", [X, a([5, -1], I64)], {}, 1, 17),
    ("Flatten", [X], {"axis": 0}, 1, 17),
    ("Flatten", [X], {"axis": -1}, 1, 17),
    ("Flatten", [X], {"axis": 3}, 1, 17),
    ("Unsqueeze", [X, a([0, -1], I64)], {}, 1, 17),
    ("Unsqueeze", [X], {"axes": [1]}, 1, 11),
    ("Unsqueeze", [X, a([0, 0], I64)], {}, 1, 17),
    ("Squeeze", [X[:1], a([0], I64)], {}, 1, 17),
    ("Squeeze", [X[:1, :, :1]], {}, 1, 17),
    ("Squeeze", [X, a([1], I64)], {}, 1, 17),
    ("Transpose", [X], {}, 1, 17),
    ("Transpose", [X], {"perm": [2, 0, 1]}, 1, 17),
    ("Concat", [a([[1, 2]], I64), a([[3]], I64)], {"axis": -1}, 1, 17),
    ("Concat", [X, X], {"axis": 1}, 1, 17),
    ("Concat", [a([1], I64), a([2], I32)], {"axis": 0}, 1, 17),
    ("Split", [X, a([1, 2], I64)], {"axis": 1}, 2, 17),
    ("Split", [X], {"axis": 2}, 2, 17),
    ("Split", [X], {"axis": 1}, 2, 17),
    ("Split", [np.arange(7, dtype=F32)], {"num_outputs": 3}, 3, 18),
    ("Split", [X], {"axis": 1, "split": [2, 1]}, 2, 11),
    ("Slice", [X, a([1], I64), a([100], I64)], {}, 1, 17),
    ("Slice", [X, a([-100], I64), a([100], I64), a([-1], I64), a([-1], I64)], {}, 1, 17),
    ("Slice", [X, a([100], I64), a([-100], I64), a([2], I64), a([-1], I64)], {}, 1, 17),
    ("Slice", [X, a([3], I64), a([0], I64), a([-1], I64), a([-2], I64)], {}, 1, 17),
    ("Slice", [X, a([-1, 0], I32), a([-4, 2], I32), a([2, 1], I32), a([-1, 1], I32)], {}, 1, 17),
    ("Slice", [X, a([0], I64), a([5], I64), a([0], I64), a([0], I64)], {}, 1, 17),
    ("Slice", [X, a([0], I64), a([5], I64), a([0], I32)], {}, 1, 17),
    ("Slice", [np.arange(10, dtype=I64), a([INT64_MIN], I64), a([np.iinfo(I64).max], I64)], {}, 1, 17),
    ("Slice", [X], {"starts": [1], "ends": [3], "axes": [2]}, 1, 9),
    ("Gather", [X, a([0, -1], I64)], {"axis": 1}, 1, 17),
    ("Gather", [X, a(1, I32)], {"axis": 2}, 1, 17),
    ("Gather", [X, a([3], I64)], {"axis": 1}, 1, 17),
    ("Gather", [X, a([-4], I64)], {"axis": 1}, 1, 17),
    ("Expand", [a([[1], [2]], I64), a([1, 3], I64)], {}, 1, 17),
    ("Expand", [X[:1], a([3, 1, 1], I64)], {}, 1, 17),
    ("Expand", [X, a([5, 4], I64)], {}, 1, 17),
    ("Tile", [X, a([2, 1, 3], I64)], {}, 1, 17),
    ("Tile", [X, a([2], I64)], {}, 1, 17),
    ("ConstantOfShape", [a([2, 3], I64)], {"value": a([7], I64)}, 1, 17),
    ("ConstantOfShape", [a([2, 0], I64)], {}, 1, 17),
    ("ConstantOfShape", [a([4], I64)], {"value": a([1.5], np.float16)}, 1, 17),
    ("Shape", [X], {}, 1, 17),
    ("Shape", [X], {"start": -2}, 1, 15),
    ("Shape", [X], {"start": 1, "end": -1}, 1, 15),
    ("Size", [X], {}, 1, 17),
    ("Where", [a([True, False, True, False], bool), X, X[:1, :1] * 0], {}, 1, 17),
    ("Where", [a([1, 0], I64), a([1, 2], I64), a([3, 4], I64)], {}, 1, 17),
    ("Cast", [a([2**40 + 5, -3], I64)], {"to": onnx.TensorProto.INT32}, 1, 17),
    ("Cast", [a([2**53 + 1, -7, 2**62], I64)], {"to": onnx.TensorProto.FLOAT}, 1, 17),
    ("Cast", [a([3.7, -3.7, 0.5, -0.5, 2e9], F32)], {"to": onnx.TensorProto.INT32}, 1, 17),
    ("Cast", [a([3.7, np.nan], F32)], {"to": onnx.TensorProto.INT64}, 1, 17),
    ("Cast", [a([3e10], F32)], {"to": onnx.TensorProto.INT32}, 1, 17),
    ("Cast", [a([-1.5], F32)], {"to": onnx.TensorProto.UINT8}, 1, 17),
    ("Cast", [X.astype(np.float64) / 3], {"to": onnx.TensorProto.FLOAT}, 1, 17),
    ("Cast", [X], {"to": onnx.TensorProto.FLOAT16}, 1, 17),
    ("Cast", [X], {"to": onnx.TensorProto.DOUBLE}, 1, 17),
    ("Cast", [a([0.0, -0.0, np.nan, 2.0], F32)], {"to": onnx.TensorProto.BOOL}, 1, 17),
    ("Cast", [a([0, 3, 255], np.uint8)], {"to": onnx.TensorProto.INT64}, 1, 17),
    ("Cast", [a([-1, 300], I64)], {"to": onnx.TensorProto.UINT8}, 1, 17),
    ("Cast", [a([True, False], bool)], {"to": onnx.TensorProto.FLOAT}, 1, 17),
    ("Add", [a([2**31 - 1, 5], I32), a([1, 2], I32)], {}, 1, 17),
    ("Add", [X, X[:, :1]], {}, 1, 17),
    ("Add", [a([1], I64), a([1], I32)], {}, 1, 17),
    ("Sub", [a(3, I64), a([5, 7], I64)], {}, 1, 17),
    ("Mul", [a([2**40], I64), a([2**30], I64)], {}, 1, 17),
    ("Mul", [X, X], {}, 1, 17),
    ("Div", [a([-7, 7, -7, 7, 0], I64), a([2, 2, -2, -2, 3], I64)], {}, 1, 17),
    ("Div", [a([1], I64), a([0], I64)], {}, 1, 17),
    ("Div", [a([INT32_MIN], I32), a([-1], I32)], {}, 1, 17),
    ("Div", [X, X[..., :1] - X[..., :1]], {}, 1, 17),
    ("Div", [X, a(3, F32)], {}, 1, 17),
    ("Equal", [a([1, 2, 3], I64), a([1, 0, 3], I64)], {}, 1, 17),
    ("Equal", [a([True, False], bool), a([True, True], bool)], {}, 1, 17),
    ("Neg", [a([1, -2, INT32_MIN], I32)], {}, 1, 17),
    ("Neg", [X], {}, 1, 17),
    ("Abs", [a([1, -2, INT32_MIN], I32)], {}, 1, 17),
    ("Abs", [X], {}, 1, 17),
    ("Min", [a([1, 5], I64), a([3, 2], I64), a([4], I64)], {}, 1, 17),
    ("Max", [a([1, 5], I64)], {}, 1, 17),
    ("Not", [a([True, False], bool)], {}, 1, 17),
    ("And", [a([True, False], bool), a([True], bool)], {}, 1, 17),
    ("Or", [a([True, False], bool), a([False], bool)], {}, 1, 17),
    ("Xor", [a([True, False], bool), a([True], bool)], {}, 1, 17),
    ("Range", [a(0, I64), a(10, I64), a(3, I64)], {}, 1, 17),
    ("Range", [a(10, I32), a(0, I32), a(-3, I32)], {}, 1, 17),
    ("Range", [a(5, I64), a(5, I64), a(1, I64)], {}, 1, 17),
    ("Range", [a(0, F32), a(1, F32), a(0.1, F32)], {}, 1, 17),
    ("CumSum", [a([[1, 2, 3], [4, 5, 6]], I64), a(1, I64)], {"exclusive": 1, "reverse": 1}, 1, 17),
    ("CumSum", [X, a(-1, I32)], {}, 1, 17),
    ("CumSum", [X, a(0, I64)], {"exclusive": 1}, 1, 17),
    ("BitShift", [a([1, 200, 255], np.uint8), a([3, 1, 7], np.uint8)], {"direction": "LEFT"}, 1, 17),
    ("BitShift", [a([1, 200, 255], np.uint8), a([0, 1, 7], np.uint8)], {"direction": "RIGHT"}, 1, 17),
    ("ScatterND", [np.zeros((4, 3), F32), a([[1], [-1]], I64), np.ones((2, 3), F32)], {}, 1, 17),
    ("ScatterElements", [np.zeros((2, 5), F32), a([[0, -1]], I64), a([[1, 2]], F32)], {"axis": 1}, 1, 17),
    ("ScatterElements", [np.zeros((3, 2), I64), a([[2, 0], [1, -3]], I32), a([[1, 2], [3, 4]], I64)], {}, 1, 17),
    ("ScatterElements", [np.zeros(5, F32), a([1, 1], I64), a([1, 2], F32)], {}, 1, 17),
    ("ScatterND", [np.zeros((4, 3), F32), a([[1], [1]], I64), np.ones((2, 3), F32)], {}, 1, 17),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_same_values_as_onnxruntime_or_declined(case):
    op, inputs, attrs, n_out, opset = case
    try:
        got = run_numpy(op, inputs, attrs, n_out)
    except NotEvaluable:
        return  # declined: the caller asks onnxruntime
    try:
        want = run_ort(op, inputs, attrs, n_out, opset)
    except Exception as exc:  # onnxruntime refuses the node: numpy must have declined it
        pytest.fail(f"numpy evaluated a node onnxruntime refuses: {str(exc).splitlines()[0][:200]}")
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert g.tobytes() == np.ascontiguousarray(w).tobytes()


def test_what_is_declined_is_declined():
    """Values whose result is not defined the same way everywhere, and inputs onnxruntime
    rejects, are never evaluated."""
    declined = [
        ("Cast", [a([3.7, np.nan], F32)], {"to": onnx.TensorProto.INT64}, 1),
        ("Cast", [a([3e10], F32)], {"to": onnx.TensorProto.INT32}, 1),
        ("Cast", [X], {"to": onnx.TensorProto.FLOAT16}, 1),
        ("Div", [a([1], I64), a([0], I64)], {}, 1),
        ("Gather", [X, a([3], I64)], {"axis": 1}, 1),
        ("Reshape", [X, a([4, -1], I32)], {}, 1),
        ("Concat", [a([1], I64), a([2], I32)], {"axis": 0}, 1),
        ("Range", [a(0, F32), a(1, F32), a(0.1, F32)], {}, 1),
        ("CumSum", [X, a(0, I64)], {"exclusive": 1}, 1),
        ("ScatterElements", [np.zeros(5, F32), a([1, 1], I64), a([1, 2], F32)], {}, 1),
        ("Softmax", [X], {}, 1),
    ]
    for op, inputs, attrs, n_out in declined:
        with pytest.raises(NotEvaluable):
            run_numpy(op, inputs, attrs, n_out)


def test_results_never_share_memory_with_the_inputs():
    for op, inputs, attrs in [("Identity", [X], {}), ("Reshape", [X, a([4, -1], I64)], {}),
                              ("Transpose", [X], {}), ("Slice", [X, a([0], I64), a([1], I64)], {})]:
        (out,) = run_numpy(op, inputs, attrs, 1)
        assert not np.shares_memory(out, X) and out.flags.c_contiguous


def test_every_kernel_is_exercised():
    assert NUMPY_OPS <= {c[0] for c in CASES}


def test_the_evaluator_asks_numpy_first_and_onnxruntime_for_the_rest():
    evaluator = NodeEvaluator({"": 17}, 8)
    reshape = gs.Node("Reshape", inputs=[gs.Variable("x"), gs.Variable("s")], outputs=[gs.Variable("y")])
    (out,) = evaluator.run(reshape, [X, a([4, -1], I64)])
    assert out.shape == (4, 6) and not evaluator.sessions  # numpy: no session made
    softmax = gs.Node("Softmax", attrs={"axis": -1}, inputs=[gs.Variable("x")], outputs=[gs.Variable("y")])
    (out,) = evaluator.run(softmax, [X])
    assert out.tobytes() == run_ort("Softmax", [X], {"axis": -1}, 1, 17)[0].tobytes()
    assert len(evaluator.sessions) == 1
    bad = gs.Node("Gather", inputs=[gs.Variable("x"), gs.Variable("i")], outputs=[gs.Variable("y")])
    with pytest.raises(NotEvaluable):
        evaluator.run(bad, [X, a([9], I64)])  # declined by numpy, refused by onnxruntime
