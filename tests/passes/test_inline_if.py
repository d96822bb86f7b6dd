"""inline-if: fires on conditions the declared signature decides, each guard holds, the
onnxruntime check undoes what does not load, idempotent, equivalent, nested Ifs and outer
references, I/O kept."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxopt import Model, PassManager
from onnxopt.framework import PassContext
from onnxopt.model import iter_graphs
from tests.helpers import assert_same_outputs, io_signature, node_count, ops, parse, real_model, run_pass

F32 = np.float32


def _all_ops(model: Model) -> list[str]:
    return [n.op for g in iter_graphs(model.graph) for n in g.nodes]


def _if_on(condition: str, decl: str = "[N,3]", *, inputs: str = "", outputs: str = "", more: str = "") -> Model:
    """y = If(c) { Relu(x) } else { Neg(x) }, ``condition`` computing c (and ``more`` nodes
    beside, with their ``inputs`` and ``outputs``)."""
    return parse(f"""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float{decl} x{inputs}) => (float{decl} y{outputs})
        {{
            {condition}
            y = If(c) <then_branch = t () => (float{decl} a) {{ a = Relu(x) }},
                       else_branch = e () => (float{decl} b) {{ b = Neg(x) }}>
            {more}
        }}
    """)


#: c = (rank of x == {}).
RANK_IS = "s = Shape(x)  r = Size(s)  k = Constant<value = int64 {{{}}}>()  c = Equal(r, k)"


def _rank_if(decl: str, rank: int) -> Model:
    return _if_on(RANK_IS.format(rank), decl)


def test_inlines_the_branch_a_declared_rank_takes():
    model = _rank_if("[N,3]", 2)
    ran = run_pass("inline-if", model)
    assert ran.modified and ran.stats["inlined"] == 1 and ran.stats["check"] == "run"
    assert _all_ops(ran.model) == ["Relu"]  # the If, its else branch and the condition are gone
    assert ran.stats["nodes_removed"] == node_count(model) - 1
    assert io_signature(ran.model) == io_signature(model)
    assert_same_outputs(model, ran.model, {"x": np.linspace(-1, 1, 12, dtype=F32).reshape(4, 3)})


def test_inlines_the_else_branch_when_the_condition_is_false():
    ran = run_pass("inline-if", _rank_if("[N,3]", 3))
    assert ran.stats["inlined"] == 1 and _all_ops(ran.model) == ["Neg"]


def test_a_static_dimension_decides_and_a_dynamic_one_does_not():
    first_is_2 = ("s = Shape(x)  i = Constant<value = int64 {0}>()  d = Gather(s, i)"
                  "  two = Constant<value = int64 {2}>()  c = Equal(d, two)")
    static = _if_on(first_is_2, "[2,N]")
    ran = run_pass("inline-if", static)
    assert ran.stats["inlined"] == 1 and _all_ops(ran.model) == ["Relu"]
    assert_same_outputs(static, ran.model)
    ran = run_pass("inline-if", _if_on(first_is_2, "[B,N]"))
    assert not ran.modified and ran.stats["undecided"] == 1 and "If" in ops(ran.model)


def test_a_rank_the_signature_does_not_fix_decides_nothing():
    # v's rank is the length of `target`, a dynamic dimension of the signature.
    model = _if_on("v = Reshape(x, target)  " + RANK_IS.format(2).replace("Shape(x)", "Shape(v)"), "[N]",
                   inputs=", int64[K] target")
    ran = run_pass("inline-if", model)
    assert not ran.modified and ran.stats["undecided"] == 1


def test_a_condition_fed_from_outside_decides_nothing():
    ran = run_pass("inline-if", _if_on("", "[2]", inputs=", bool c"))
    assert not ran.modified and ran.stats["undecided"] == 1
    assert not run_pass("inline-if", parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y) { y = Relu(x) }
    """)).modified


def test_a_constant_condition_is_decided_inside_a_loop_body():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y)
        {
            trip = Constant<value = int64 {3}>()
            go = Constant<value = bool {1}>()
            y = Loop(trip, go, x) <body = b (int64 i, bool cond, float[2] h) => (bool co, float[2] ho) {
                co = Identity(cond)
                yes = Constant<value = bool {1}>()
                ho = If(yes) <then_branch = t () => (float[2] a) { a = Relu(h) },
                              else_branch = e () => (float[2] n) { n = Neg(h) }>
            }>
        }
    """)
    ran = run_pass("inline-if", model)
    assert ran.stats["inlined"] == 1 and "If" not in _all_ops(ran.model) and "Relu" in _all_ops(ran.model)
    assert_same_outputs(model, ran.model, {"x": np.array([-1.0, 2.0], F32)})


def test_outer_references_constants_and_repeated_outputs_are_kept():
    # The taken branch reads an input and a tensor of the parent, returns an outer tensor as it
    # is, a constant of its own, and one tensor twice: every If output keeps its name.
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[N,2] x) => (float[N,2] y1, float[N,2] y2, float[2] y3, float[N,2] y4, float[N,2] y5)
        {
            h = Sigmoid(x)
            s = Shape(x)
            r = Size(s)
            k = Constant<value = int64 {2}>()
            c = Equal(r, k)
            y1, y2, y3, y4, y5 = If(c) <
                then_branch = t () => (float[N,2] a, float[N,2] b, float[2] w, float[N,2] d, float[N,2] e) {
                    w = Constant<value = float[2] {1.0, 2.0}>()
                    a = Mul(h, w)
                    b = Identity(x)
                    d = Add(a, x)
                    e = Identity(d)
                },
                else_branch = f () => (float[N,2] a2, float[N,2] b2, float[2] w2, float[N,2] d2, float[N,2] e2) {
                    a2 = Neg(x)  b2 = Neg(x)  w2 = Constant<value = float[2] {0.0, 0.0}>()
                    d2 = Neg(x)  e2 = Neg(x)
                }>
        }
    """)
    ran = run_pass("inline-if", model)
    assert ran.stats["inlined"] == 1 and "If" not in _all_ops(ran.model)
    assert io_signature(ran.model) == io_signature(model)
    onnx.checker.check_model(ran.model.to_proto(), full_check=True)
    assert_same_outputs(model, ran.model, {"x": np.arange(6, dtype=F32).reshape(3, 2) - 2})


def test_nested_ifs_are_decided_and_an_undecided_one_moves_with_its_branch():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[B,4] x, bool flag) => (float[B,4] y)
        {
            s = Shape(x)
            r = Size(s)
            two = Constant<value = int64 {2}>()
            c = Equal(r, two)
            y = If(c) <
                then_branch = t () => (float[B,4] a) {
                    u = Relu(x)
                    s2 = Shape(u)
                    i = Constant<value = int64 {1}>()
                    d = Gather(s2, i)
                    four = Constant<value = int64 {4}>()
                    c2 = Equal(d, four)
                    v = If(c2) <then_branch = t2 () => (float[B,4] p) { p = Sigmoid(u) },
                                else_branch = e2 () => (float[B,4] q) { q = Tanh(u) }>
                    a = If(flag) <then_branch = t3 () => (float[B,4] m) { m = Mul(v, u) },
                                  else_branch = e3 () => (float[B,4] n) { n = Add(v, u) }>
                },
                else_branch = e () => (float[B,4] b) { b = Neg(x) }>
        }
    """)
    ran = run_pass("inline-if", model)
    assert ran.stats["inlined"] == 2 and ran.stats["undecided"] == 1
    assert ops(ran.model) == ["Relu", "Sigmoid", "If"]  # the If on `flag` reads u and v from the main graph now
    x = np.linspace(-2, 2, 12, dtype=F32).reshape(3, 4)
    for flag in (True, False):
        assert_same_outputs(model, ran.model, {"x": x, "flag": np.array(flag)})


def test_names_defined_in_two_branches_stay_unique():
    # Both Ifs' branches define `t`: once one branch is inlined, its `t` would be in scope of
    # the other If's branches, which ONNX forbids.
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[N,2] x, bool flag) => (float[N,2] y, float[N,2] z)
        {
            s = Shape(x)
            r = Size(s)
            two = Constant<value = int64 {2}>()
            c = Equal(r, two)
            y = If(c) <then_branch = t1 () => (float[N,2] t) { t = Relu(x) },
                       else_branch = e1 () => (float[N,2] t_) { t_ = Neg(x) }>
            z = If(flag) <then_branch = t2 () => (float[N,2] t) { t = Sigmoid(x) },
                          else_branch = e2 () => (float[N,2] u) { u = Tanh(y) }>
        }
    """)
    ran = run_pass("inline-if", model)
    assert ran.stats["inlined"] == 1
    onnx.checker.check_model(ran.model.to_proto(), full_check=True)
    for flag in (True, False):
        assert_same_outputs(model, ran.model, {"x": np.ones((2, 2), F32), "flag": np.array(flag)})


def _range_model() -> onnx.ModelProto:
    """A Range fed a one-element tensor from the main graph: onnxruntime accepts it in a
    branch, but refuses it once the branch is part of the main graph."""
    return onnx.parser.parse_model("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[N,3] x) => (float[M] y)
        {
            s = Shape(x)
            r = Size(s)
            two = Constant<value = int64 {2}>()
            c = Equal(r, two)
            s2 = Shape<start = 1>(x)
            y = If(c) <then_branch = t () => (float[M] a) {
                          zero = Constant<value = int64 {0}>()
                          one = Constant<value = int64 {1}>()
                          ai = Range(zero, s2, one)
                          a = Cast<to = 1>(ai)
                       },
                       else_branch = e () => (float[M] b) { b = ReduceSum<keepdims = 0>(x) }>
        }
    """)


def test_an_inlining_onnxruntime_refuses_is_undone_with_its_reason():
    proto = _range_model()
    model = Model.from_proto(proto)
    ran = run_pass("inline-if", model)
    assert not ran.modified and ran.stats["rolled_back"] == 1 and ran.stats["inlined"] == 0
    assert "Range" in ran.stats["rolled_back_why"][0] and "does not load" in ran.stats["rolled_back_why"][0]
    assert onnx.printer.to_text(ran.model.to_proto()) == onnx.printer.to_text(model.to_proto())  # as it was
    assert_same_outputs(model, ran.model, {"x": np.ones((2, 3), F32)})


def test_only_the_refused_inlining_is_undone():
    # The same refused If beside one that inlines fine: the second stays inlined.
    proto = _range_model()
    g = proto.graph
    g.node.extend(onnx.parser.parse_graph("""
        h (float[N,3] x, bool c) => (float[N,3] z)
        { z = If(c) <then_branch = t () => (float[N,3] p) { p = Relu(x) },
                     else_branch = e () => (float[N,3] q) { q = Neg(x) }> }
    """).node)
    g.output.append(onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", 3]))
    model = Model.from_proto(proto)
    ran = run_pass("inline-if", model)
    assert ran.stats["inlined"] == 1 and ran.stats["rolled_back"] == 1
    assert "Range" not in ops(ran.model) and ops(ran.model).count("If") == 1
    assert_same_outputs(model, ran.model, {"x": np.ones((2, 3), F32)})


def _needs_two_rows() -> Model:
    """The rank-decided If beside a Reshape that runs only when the batch holds two rows:
    feeds generated from the signature (one row) do not run it."""
    return _if_on(RANK_IS.format(2), outputs=", float[6] z",
                  more="six = Constant<value = int64[1] {6}>()  z = Reshape(x, six)")


def test_the_check_runs_the_context_feeds_and_else_checks_that_it_loads():
    model = _needs_two_rows()
    feeds = {"x": np.linspace(-1, 1, 6, dtype=F32).reshape(2, 3)}
    ran = run_pass("inline-if", model, PassContext(reference=model, feeds=feeds))
    assert ran.stats["check"] == "run" and ran.stats["inlined"] == 1
    assert_same_outputs(model, ran.model, feeds)
    alone = run_pass("inline-if", model)  # generated feeds (one row) do not run the model
    assert alone.stats["check"] == "load" and alone.stats["inlined"] == 1
    wrong = {"x": np.ones((2, 3), np.int64)}  # feeds that do not fit the model count as none
    assert run_pass("inline-if", model, PassContext(reference=model, feeds=wrong)).stats["check"] == "load"


def test_the_manager_passes_its_feeds_to_the_passes():
    model = _needs_two_rows()
    feeds = {"x": np.ones((2, 3), F32)}
    run = PassManager("inline-if", feeds=feeds).run(model.copy())
    assert run.records[0].stats["check"] == "run"
    assert PassManager("inline-if").run(model.copy()).records[0].stats["check"] == "load"


def test_is_idempotent_and_part_of_the_default_preset():
    model = _rank_if("[N,3]", 2)
    once = run_pass("inline-if", model)
    assert not run_pass("inline-if", once.model).modified
    work = model.copy()
    result = PassManager("default").run(work)
    assert any(r.name == "inline-if" and r.modified for r in result.records)
    assert "If" not in _all_ops(work)


@pytest.mark.parametrize("rate", [16000, 8000])
def test_silero_vad_inlines_its_lstm_branch_and_shrinks(rate):
    from tests.helpers import silero_feeds

    proto = onnx.load(real_model("silero-vad"))
    model = Model.from_proto(proto)
    feeds = silero_feeds(rate)
    ran = run_pass("inline-if", model, PassContext(reference=model, feeds=feeds))
    assert ran.stats["inlined"] == 2 and ran.stats["check"] == "run"
    assert_same_outputs(model, ran.model, feeds)
    # Without feeds that run it (generated ones do not), what is checked is that it loads.
    assert run_pass("inline-if", model).stats["check"] == "load"
    work = Model.from_proto(proto)
    PassManager("default").run(work)
    assert work.summary().nodes_total <= 152  # onnxslim's count, the best peer's
    assert len(work.to_bytes()) <= len(proto.SerializeToString())
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    sess = ort.InferenceSession(work.to_bytes(), opts, providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    for a, b in zip(ref.run(None, feeds), sess.run(None, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

