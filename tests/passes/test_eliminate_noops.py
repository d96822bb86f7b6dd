"""eliminate-noops: each no-op goes, each near miss stays (with its reason), graph output
names survive, subgraphs are handled, real models stay equivalent."""

from __future__ import annotations

import numpy as np
import pytest

from models import builders
from models.fetch import light_models
from onnxopt import Model
from tests.helpers import (
    REAL_MODEL_NAMES,
    assert_same_outputs,
    io_signature,
    node_count,
    ops,
    parse,
    real_model,
    run_pass,
)

F32 = np.float32
HEAD = '<ir_version: 9, opset_import: ["" : 18]>'


def _x(*shape):
    return np.random.default_rng(0).standard_normal(shape).astype(F32)


# One model per no-op: ``y = Relu(<no-op>(x))`` keeps the check on the no-op itself.
REMOVED = {
    "Identity": ("float[N,4] x", "t = Identity(x)"),
    "Dropout": ("float[N,4] x", "t = Dropout(x)"),
    "Dropout_ratio": ("float[N,4] x", "r = Constant<value = float {0.3}>()  t = Dropout(x, r)"),
    "Cast": ("float[N,4] x", "t = Cast<to = 1>(x)"),
    "CastLike": ("float[N,4] x", "like = Constant<value = float {0.0}>()  t = CastLike(x, like)"),
    "Cast_round_trip": ("float[N,4] x", "d = Cast<to = 11>(x)  t = Cast<to = 1>(d)"),
    "Transpose": ("float[N,4] x", "t = Transpose<perm = [0, 1]>(x)"),
    "Reshape_copy": ("float[N,4] x", "s = Constant<value = int64[2] {0, -1}>()  t = Reshape(x, s)"),
    "Reshape_static": ("float[2,4] x", "s = Constant<value = int64[2] {2, 4}>()  t = Reshape(x, s)"),
    "Flatten": ("float[N,4] x", "t = Flatten<axis = 1>(x)"),
    "Squeeze": ("float[2,4] x", "t = Squeeze(x)"),
    "Slice": ("float[N,4] x", "st = Constant<value = int64[1] {0}>()  en = Constant<value = int64[1] {9223372036854775807}>()"
              "  ax = Constant<value = int64[1] {1}>()  t = Slice(x, st, en, ax)"),
    "Slice_static_end": ("float[N,4] x", "st = Constant<value = int64[1] {0}>()  en = Constant<value = int64[1] {4}>()"
                         "  ax = Constant<value = int64[1] {1}>()  t = Slice(x, st, en, ax)"),
    "Pad": ("float[N,4] x", "p = Constant<value = int64[4] {0, 0, 0, 0}>()  t = Pad(x, p)"),
    "Expand": ("float[N,4] x", "s = Constant<value = int64[2] {1, 4}>()  t = Expand(x, s)"),
    "Tile": ("float[N,4] x", "r = Constant<value = int64[2] {1, 1}>()  t = Tile(x, r)"),
    "Add_0": ("float[N,4] x", "c = Constant<value = float[1,4] {0, 0, 0, 0}>()  t = Add(x, c)"),
    "Add_0_left": ("float[N,4] x", "c = Constant<value = float {0}>()  t = Add(c, x)"),
    "Sub_0": ("float[N,4] x", "c = Constant<value = float {0}>()  t = Sub(x, c)"),
    "Mul_1": ("float[N,4] x", "c = Constant<value = float[4] {1, 1, 1, 1}>()  t = Mul(c, x)"),
    "Div_1": ("float[N,4] x", "c = Constant<value = float {1}>()  t = Div(x, c)"),
    "Pow_1": ("float[N,4] x", "c = Constant<value = float {1}>()  t = Pow(x, c)"),
    "Concat_one": ("float[N,4] x", "t = Concat<axis = 1>(x)"),
    "Sum_one": ("float[N,4] x", "t = Sum(x)"),
    "Max_one": ("float[N,4] x", "t = Max(x)"),
}


def _model(inp: str, body: str, out: str = "float[N,4] y") -> Model:
    return parse(f"{HEAD} g ({inp}) => ({out}) {{ {body}  y = Relu(t) }}")


@pytest.mark.parametrize("case", sorted(REMOVED))
def test_removes(case):
    inp, body = REMOVED[case]
    model = _model(inp, body)
    ran = run_pass("eliminate-noops", model)
    assert ran.modified and ran.stats["removed"] == 1
    assert ops(ran.model) == ["Relu"], ops(ran.model)  # operands and feeding Casts pruned too
    assert not ran.model.to_proto().graph.initializer
    assert io_signature(ran.model) == io_signature(model)
    shape = (2, 4) if "N" not in inp else (3, 4)
    assert_same_outputs(model, ran.model, {"x": _x(*shape)})
    again = run_pass("eliminate-noops", ran.model)
    assert not again.modified


# Near misses: each stays, and the interesting ones say why.
KEPT = {
    "Dropout_mask_used": ("float[N,4] x", "t, m = Dropout(x)  mf = Cast<to = 1>(m)  y2 = Add(t, mf)",
                          "dropout_mask_used"),
    "Dropout_training": ("float[N,4] x", "r = Constant<value = float {0.0}>()  tm = Constant<value = bool {1}>()"
                         "  t = Dropout(x, r, tm)", "dropout_training"),
    "Cast_through_float16": ("float[N,4] x", "u = Cast<to = 10>(x)  t = Cast<to = 1>(u)",
                             "cast_round_trip_lossy"),
    "Transpose_swap": ("float[N,4] x", "t = Transpose<perm = [1, 0]>(x)", None),
    "Reshape_other": ("float[N,4] x", "s = Constant<value = int64[2] {-1, 2}>()  t = Reshape(x, s)", None),
    "Reshape_dynamic_value": ("float[N,4] x", "s = Constant<value = int64[2] {2, 4}>()  t = Reshape(x, s)", None),
    "Slice_part": ("float[N,4] x", "st = Constant<value = int64[1] {1}>()  en = Constant<value = int64[1] {4}>()"
                   "  ax = Constant<value = int64[1] {1}>()  t = Slice(x, st, en, ax)", None),
    "Slice_reverse": ("float[N,4] x", "st = Constant<value = int64[1] {-1}>()  en = Constant<value = int64[1] "
                      "{-9223372036854775807}>()  ax = Constant<value = int64[1] {1}>()  sp = Constant<value = "
                      "int64[1] {-1}>()  t = Slice(x, st, en, ax, sp)", None),
    "Pad_some": ("float[N,4] x", "p = Constant<value = int64[4] {0, 1, 0, 0}>()  t = Pad(x, p)", None),
    "Expand_grows": ("float[N,4] x", "s = Constant<value = int64[3] {2, 1, 4}>()  t = Expand(x, s)", None),
    "Add_broadcasts": ("float[N] x", "c = Constant<value = float[4,1] {0, 0, 0, 0}>()  t = Add(x, c)",
                       "broadcast_changes_shape"),
    "Sub_0_left": ("float[N,4] x", "c = Constant<value = float {0}>()  t = Sub(c, x)", None),
    "Add_nonzero": ("float[N,4] x", "c = Constant<value = float {0.5}>()  t = Add(x, c)", None),
    "Custom_identity": ("float[N,4] x", "t = com.vendor.Identity(x)", None),
}


@pytest.mark.parametrize("case", sorted(KEPT))
def test_keeps(case):
    inp, body, why = KEPT[case]
    head = HEAD.replace('"" : 18', '"" : 18, "com.vendor" : 1')
    out = "float[N,4] y, float[N,4] y2" if "y2" in body else "float[N,4] y"
    if case in ("Reshape_other", "Expand_grows", "Add_broadcasts", "Transpose_swap"):
        out = "float y"
    model = parse(f"{head} g ({inp}) => ({out}) {{ {body}  y = Relu(t) }}")
    ran = run_pass("eliminate-noops", model)
    assert ran.stats["removed"] == 0 and not ran.modified
    if why:
        assert ran.stats[f"kept_{why}"] >= 1
    if case != "Custom_identity":
        shape = (2,) if inp.startswith("float[N] ") else (2, 4)
        assert_same_outputs(model, ran.model, {"x": _x(*shape)})


def test_graph_output_keeps_its_name_when_its_producer_is_bypassed():
    model = parse(f"""{HEAD}
        g (float[N,4] x) => (float[N,4] y)
        {{ r = Relu(x)  y = Identity(r) }}
    """)
    ran = run_pass("eliminate-noops", model)
    assert ops(ran.model) == ["Relu"] and ran.model.graph.nodes[0].outputs[0].name == "y"
    assert io_signature(ran.model) == io_signature(model)
    assert_same_outputs(model, ran.model, {"x": _x(2, 4)})


def test_identity_from_a_graph_input_to_an_output_is_kept():
    model = parse(f"""{HEAD}
        g (float[N,4] x) => (float[N,4] y, float[N,4] z)
        {{ y = Identity(x)  z = Relu(x) }}
    """)
    ran = run_pass("eliminate-noops", model)
    assert not ran.modified and ran.stats["kept_graph_output"] == 1
    assert io_signature(ran.model) == io_signature(model)


def test_if_branches_and_loop_bodies():
    model = parse(f"""{HEAD}
        g (bool c, float[4] x) => (float[4] y, float[4] z)
        <int64 trip = {{2}}>
        {{
            y = If(c) <then_branch = t () => (float[4] a) {{ i = Identity(x)  a = Relu(i) }},
                       else_branch = e () => (float[4] b) {{ b = Identity(x) }}>
            z = Loop(trip, , x) <body = l (int64 it, bool cin, float[4] acc) => (bool cout, float[4] nxt)
                {{ cout = Identity(cin)  one = Constant<value = float {{1}}>()  m = Mul(acc, one)
                   nxt = Neg(m) }}>
        }}
    """)
    ran = run_pass("eliminate-noops", model)
    branch, loop = ran.model.graph.nodes
    assert [n.op for n in branch.attrs["then_branch"].nodes] == ["Relu"]
    assert [n.op for n in branch.attrs["else_branch"].nodes] == ["Identity"]  # maps an outer tensor out
    assert [n.op for n in loop.attrs["body"].nodes] == ["Identity", "Neg"]  # cond passes through
    assert ran.stats["removed"] == 2 and ran.stats["kept_graph_output"] == 2
    for cond in (True, False):
        assert_same_outputs(model, ran.model, {"c": np.array(cond), "x": _x(4)})


def test_builders_lose_their_identity_and_dropout():
    model = Model.from_proto(builders.dead_branches())
    ran = run_pass("eliminate-noops", model)
    assert ran.stats["removed_Identity"] == 1 and ran.stats["removed_Dropout"] == 1
    assert not {"Identity", "Dropout"} & set(ops(ran.model))
    assert_same_outputs(model, ran.model, shapes={"input": (2, 3, 16, 16)})


@pytest.mark.parametrize("name", REAL_MODEL_NAMES)
def test_real_models_lose_paddles_noops_once_folded(name):
    # tests/conformance holds eliminate-noops alone on the real models to the contract.
    model = Model.load(real_model(name))
    folded = run_pass("fold-constants", model).model  # Paddle's operands are Constant nodes
    ran = run_pass("eliminate-noops", folded)
    assert node_count(ran.model) <= node_count(folded)
    if name == "ppocr-rec":
        assert ran.stats["removed_Mul"] == 5  # x * 1 from Paddle's scale ops
    if name == "ppocr-cls":
        assert ran.stats["removed_Identity"] == 1  # the final Identity; the output keeps its name


@pytest.mark.parametrize("path", light_models(), ids=lambda p: p.stem)
def test_light_models(path):
    model = Model.load(path)
    ran = run_pass("eliminate-noops", model)
    dropouts = ops(model).count("Dropout")
    assert ran.stats["removed"] == dropouts and "Dropout" not in ops(ran.model)
    assert io_signature(ran.model) == io_signature(model)
    if dropouts:
        assert_same_outputs(model, ran.model, rtol=1e-3, atol=1e-4)
