"""Channel groups: what goes together, what is refused and why, and that the
rewrite is exact — removing channels equals zeroing the weights that read them — on toy
graphs and on the real models; plus the analysis on every conformance model."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest

from models import builders
from models.digits import digits_mlp
from models.fetch import light_models
from onnxopt import Model
from onnxopt.channels import CHANNEL_MAP_KEY, analyze, channel_maps, keep_channels, kept_positions
from onnxopt.cli import main
from onnxopt.data import random_feeds
from onnxopt.graph import const_through_shape_ops
from onnxopt.validate import compare_outputs, run_model
from tests.helpers import REAL_MODEL_NAMES, io_signature, parse, real_model

PPOCR_SHAPES = {"ppocr-det": (1, 3, 96, 128), "ppocr-rec": (1, 3, 48, 160), "ppocr-cls": (1, 3, 48, 192)}

CONV_BN = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y)
    <float[6, 3, 1, 1] w1 = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8},
     float[6] s = {1.0, 1.1, 1.2, 1.3, 1.4, 1.5}, float[6] b = {0.0, 0.1, 0.2, 0.3, 0.4, 0.5},
     float[6] mu = {0.0, 0.0, 0.1, 0.1, 0.2, 0.2}, float[6] var = {1.0, 1.0, 1.0, 2.0, 2.0, 2.0},
     float[4, 6, 1, 1] w2 = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0,
                             1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0}>
    {
        c1 = Conv(x, w1)
        n1 = BatchNormalization(c1, s, b, mu, var)
        r1 = Relu(n1)
        y = Conv(r1, w2)
    }
"""


def _group_of(found, source_output: str):
    for g in found.groups:
        if any(m.role == "out" and m.node.outputs[0].name == source_output for m in g.members):
            return g
    raise AssertionError(f"no group created by {source_output}")


def zero_removed_inputs(model: Model, keep: dict) -> Model:
    """A copy of ``model`` whose layers read the channels outside ``keep`` with zero
    weights: what pruning them must be equivalent to."""
    work = model.copy()
    found = analyze(work)
    overrides = {}
    for m in found.members:
        if m.role != "in" or not any(found.root(s) in keep for s in m.layout.spaces()):
            continue
        kept = kept_positions(m.layout, {k: np.asarray(v) for k, v in keep.items()}, found.root)
        drop = np.setdiff1d(np.arange(m.layout.width), kept)
        w = np.array(const_through_shape_ops(m.node.inputs[m.index]), copy=True)
        index = [slice(None)] * w.ndim
        index[m.axis] = drop
        w[tuple(index)] = 0
        overrides[(id(m.node), m.index)] = w
    keep_channels(work, found, {}, overrides=overrides)
    return work


def check_exact_pruning(model: Model, shapes=None, keep_fraction: float = 0.6, seed: int = 1) -> Model:
    found = analyze(model)
    assert found.prunable, "nothing to prune"
    rng = np.random.default_rng(seed)
    keep = {g.id: np.sort(rng.choice(g.size, max(1, int(g.size * keep_fraction)), replace=False))
            for g in found.prunable}
    reference = zero_removed_inputs(model, keep)
    pruned = model.copy()
    stats = keep_channels(pruned, analyze(pruned), keep)
    onnx.checker.check_model(pruned.to_proto())
    assert io_signature(pruned) == io_signature(model)
    assert stats.channels_removed == sum(g.size - len(keep[g.id]) for g in found.prunable)
    assert pruned.summary().parameters < model.summary().parameters
    feeds, _ = random_feeds(model, shapes)
    want, got = run_model(reference, feeds), run_model(pruned, feeds)
    for name in want:
        m = compare_outputs(name, want[name], got[name], exact=True, rtol=1e-3, atol=1e-4)
        assert m.passed, f"{name}: {m.reason}"
    return pruned


# ---- what goes together -------------------------------------------------------------


def test_conv_bn_relu_conv_is_one_group_with_every_member():
    model = parse(CONV_BN)
    found = analyze(model)
    g = _group_of(found, "c1")
    assert g.prunable and g.size == 6
    roles = sorted(m.role for m in g.members)
    assert roles == ["bn_bias", "bn_mean", "bn_scale", "bn_var", "in", "out"]
    assert {t.name for t, _ in g.tensors} == {"c1", "n1", "r1"}
    out = _group_of(found, "y")
    assert not out.prunable and out.reasons[0].startswith("output:")


def test_pruning_conv_bn_removes_filters_bn_entries_and_input_channels():
    model = parse(CONV_BN)
    found = analyze(model)
    g = _group_of(found, "c1")
    work = model.copy()
    keep_channels(work, analyze(work), {g.id: [0, 2, 5]})
    shapes = {t.name: t.values.shape for t in work.constants()}
    assert shapes["w1"] == (3, 3, 1, 1) and shapes["s"] == (3,) and shapes["var"] == (3,)
    assert shapes["w2"] == (4, 3, 1, 1)
    w2 = next(t for t in work.constants() if t.name == "w2").values
    np.testing.assert_array_equal(w2[0, :, 0, 0], [1.0, 3.0, 6.0])
    assert channel_maps(work)["c1"] == [0, 2, 5]
    check_exact_pruning(model)


def test_residual_add_unites_both_producers():
    found = analyze(Model.from_proto(builders.cnn()))
    residual = [g for g in found.groups if len(g.sources) == 2]
    assert len(residual) == 1 and residual[0].prunable
    assert found.joins.number_of_edges() >= 1


def test_concat_keeps_offsets_and_a_fixed_segment():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 2, 4, 4] x) => (float[1, 3, 4, 4] y)
        <float[4, 2, 1, 1] wa = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0},
         float[3, 2, 1, 1] wb = {1.0, -1.0, 2.0, -2.0, 3.0, -3.0},
         float[3, 9, 1, 1] wc = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0,
                                 6.0, 7.0, 8.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0}>
        {
            a = Conv(x, wa)
            b = Conv(x, wb)
            ra = Relu(a)
            cat = Concat <axis = 1> (ra, x, b)
            y = Conv(cat, wc)
        }
    """)
    found = analyze(model)
    ga, gb = _group_of(found, "a"), _group_of(found, "b")
    assert ga.prunable and gb.prunable
    sink = next(m for m in ga.members if m.role == "in")
    assert [(s.size) for s in sink.layout.segs] == [4, 2, 3]
    pruned = check_exact_pruning(model, keep_fraction=0.5)
    assert next(t for t in pruned.constants() if t.name == "wc").values.shape == (3, 2 + 2 + 1, 1, 1)


def test_depthwise_conv_is_tied_and_its_group_attribute_follows():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 2, 6, 6] x) => (float[1, 2, 6, 6] y)
        <float[4, 2, 1, 1] w1 = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0},
         float[4, 1, 3, 3] dw = {1.0, 0.5, 0.2, 0.1, 1.0, 0.5, 0.2, 0.1, 1.0, 1.0, 0.5, 0.2, 0.1, 1.0, 0.5,
                                 0.2, 0.1, 1.0, 1.0, 0.5, 0.2, 0.1, 1.0, 0.5, 0.2, 0.1, 1.0, 1.0, 0.5, 0.2,
                                 0.1, 1.0, 0.5, 0.2, 0.1, 1.0},
         float[4] db = {0.1, 0.2, 0.3, 0.4},
         float[2, 4, 1, 1] w2 = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}>
        {
            a = Conv(x, w1)
            d = Conv <group = 4, pads = [1, 1, 1, 1]> (a, dw, db)
            r = Relu(d)
            y = Conv(r, w2)
        }
    """)
    g = _group_of(analyze(model), "a")
    assert sorted(m.role for m in g.members) == ["attr", "bias", "in", "out", "tied"]
    pruned = check_exact_pruning(model, keep_fraction=0.5)
    dwnode = next(n for n in pruned.graph.nodes if n.outputs[0].name == "d")
    assert dwnode.attrs["group"] == 2


def test_split_and_slice_on_the_channel_axis_are_rewritten():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 2, 4, 4] x) => (float[1, 2, 4, 4] y, float[1, 2, 4, 4] z)
        <float[6, 2, 1, 1] w1 = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0},
         int64[2] sizes = {4, 2}, int64[1] st = {1}, int64[1] en = {5}, int64[1] ax = {1},
         float[2, 4, 1, 1] wy = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0},
         float[2, 2, 1, 1] wz = {1.0, 2.0, 3.0, 4.0},
         float[2, 4, 1, 1] ws = {1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0}>
        {
            a = Conv(x, w1)
            p, q = Split <axis = 1> (a, sizes)
            y0 = Conv(p, wy)
            s = Slice(a, st, en, ax)
            y1 = Conv(s, ws)
            y = Add(y0, y1)
            z = Conv(q, wz)
        }
    """)
    g = _group_of(analyze(model), "a")
    assert g.prunable
    assert {m.kind for m in g.members} >= {"split", "slice_bounds"}
    check_exact_pruning(model, keep_fraction=0.5)
    check_exact_pruning(model, keep_fraction=0.7, seed=3)


def test_flatten_into_gemm_prunes_channel_by_spatial_blocks():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 1, 2, 2] x) => (float[1, 2] y)
        <float[3, 1, 1, 1] w1 = {1.0, -2.0, 0.5},
         float[12, 2] fc = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0,
                            1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0}>
        {
            a = Conv(x, w1)
            f = Flatten(a)
            y = Gemm(f, fc)
        }
    """)
    g = _group_of(analyze(model), "a")
    sink = next(m for m in g.members if m.role == "in")
    assert sink.layout.inner == 4
    pruned = check_exact_pruning(model, keep_fraction=0.67)
    assert next(t for t in pruned.constants() if t.name == "fc").values.shape == (8, 2)


def test_matmul_mlp_neurons_and_the_bias_add():
    found = analyze(Model.from_proto(digits_mlp()))
    sizes = sorted((g.size, g.prunable) for g in found.groups)
    assert sizes == [(10, False), (100, True), (300, True)]
    g = next(g for g in found.groups if g.size == 300)
    assert sorted(m.role for m in g.members) == ["in", "out", "param"]


def test_constant_node_weights_count_as_weights():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 2] x) => (float[1, 1] y)
        {
            w1 = Constant <value = float[2, 3] {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}> ()
            w2 = Constant <value = float[3, 1] {1.0, -1.0, 2.0}> ()
            h = MatMul(x, w1)
            r = Relu(h)
            y = MatMul(r, w2)
        }
    """)
    pruned = check_exact_pruning(model, keep_fraction=0.67)
    assert sum(1 for n in pruned.graph.nodes if n.op == "Constant") == 2


# ---- what is refused ------------------------------------------------------------------


@pytest.mark.parametrize("tail, kind", [
    ("y = Softmax <axis = 1> (a)", "reduce"),
    ("y = ReduceMean <axes = [1], keepdims = 1> (a)", "reduce"),
    ("y = com.vendor.Magic(a)", "op"),
    ("y = LRN <size = 3> (a)", "op"),
    ("y = Conv <group = 2> (a, wg)", "grouped"),
    ("y = Identity(a)", "output"),
])
def test_ops_that_mix_or_expose_the_channels_block_the_group(tail, kind):
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : 17, "com.vendor" : 1]>
        g (float[1, 2, 4, 4] x) => (float[1, 4, 4, 4] y)
        <float[4, 2, 1, 1] w1 = {{1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}},
         float[4, 2, 1, 1] wg = {{1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}}>
        {{
            a = Conv(x, w1)
            {tail}
        }}
    """) if "Magic" not in tail else Model.from_proto(_magic_model())
    found = analyze(model)
    g = _group_of(found, "a")
    assert not g.prunable
    assert g.reasons[0].split(":")[0] == kind, g.reasons
    assert found.stats()["unprunable_reasons"].get(kind, 0) >= 1


def _magic_model() -> onnx.ModelProto:
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 2, 1, 1), np.float32), "w1")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["a"]),
         helper.make_node("Magic", ["a"], ["y"], domain="com.vendor")],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.vendor", 1)])


def test_a_tensor_read_inside_a_subgraph_blocks_its_group():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 2, 4, 4] x, bool c) => (float[1, 2, 4, 4] y)
        <float[3, 2, 1, 1] w1 = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}, float[2, 3, 1, 1] w2 = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}>
        {
            a = Conv(x, w1)
            r = Relu(a)
            y = If(c) <
                then_branch = t () => (float[1, 2, 4, 4] o1) { o1 = Conv(r, w2) },
                else_branch = e () => (float[1, 2, 4, 4] o2) { o2 = Identity(x) }
            >
        }
    """)
    g = _group_of(analyze(model), "a")
    assert not g.prunable and g.reasons[0].startswith("subgraph:")


def test_overridable_initializers_are_not_weights():
    proto = onnx.load(next(p for p in light_models() if "resnet50" in p.name))
    found = analyze(Model.from_proto(proto))
    assert found.groups == [] or not found.prunable
    assert found.stats()["layers_skipped"]["weights are not constant"] == 54


# ---- the rewrite is exact, on the builders and on the real models ----------------------


@pytest.mark.parametrize("name", ["cnn", "mlp", "digits"])
def test_pruning_equals_zeroing_what_reads_the_channels_on_builders(name):
    check_exact_pruning(Model.from_proto(builders.build(name)))


@pytest.mark.parametrize("name", REAL_MODEL_NAMES)
def test_pruning_equals_zeroing_what_reads_the_channels_on_ppocr(name):
    model = Model.load(real_model(name))
    found = analyze(model)
    assert len(found.prunable) >= 20
    pruned = check_exact_pruning(model, {"x": PPOCR_SHAPES[name]})
    assert CHANNEL_MAP_KEY in dict(pruned.metadata_props)
    # the dynamic input dims survive, and the pruned model is analysable again
    assert io_signature(pruned) == io_signature(model)
    assert analyze(pruned).prunable


def test_ppocr_rec_keeps_attention_heads_and_prunes_feed_forward_neurons():
    found = analyze(Model.load(real_model("ppocr-rec")))
    ffn = [g for g in found.groups if g.size == 240 and g.sources[0].startswith("MatMul")]
    assert len(ffn) == 2 and all(g.prunable for g in ffn)
    qkv = [g for g in found.groups if g.size == 360]
    assert qkv and not any(g.prunable for g in qkv)


def test_pruning_twice_composes_the_channel_map():
    model = parse(CONV_BN)
    once = model.copy()
    g = _group_of(analyze(once), "c1")
    keep_channels(once, analyze(once), {g.id: [1, 2, 3, 5]})
    g = _group_of(analyze(once), "c1")
    keep_channels(once, analyze(once), {g.id: [0, 3]})
    assert channel_maps(once)["c1"] == [1, 5]


def test_keep_channels_refuses_an_unprunable_group_and_changes_nothing():
    model = parse(CONV_BN)
    found = analyze(model)
    out = _group_of(found, "y")
    before = model.to_bytes()
    with pytest.raises(ValueError):
        keep_channels(model, found, {out.id: [0]})
    assert model.to_bytes() == before


# ---- the analysis on every conformance model -------------------------------------------


def _node_cases():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            from onnx.backend.test.case.node import collect_testcases

            return collect_testcases(None)


def test_analysis_runs_on_every_onnx_node_test_case():
    failures = []
    cases = _node_cases()
    for case in cases:
        try:
            analyze(Model.from_proto(case.model)).stats()
        except Exception as exc:  # a crash is the failure; unprunable groups are fine
            failures.append(f"{case.name}: {type(exc).__name__}: {exc}")
    assert len(cases) > 1500
    assert not failures, failures[:5]


@pytest.mark.parametrize("path", light_models(), ids=lambda p: p.stem)
def test_analysis_runs_on_light_architectures(path):
    stats = analyze(Model.load(path)).stats()
    assert stats["groups"] == 0 and sum(stats["layers_skipped"].values()) > 0


@pytest.mark.parametrize("name", REAL_MODEL_NAMES)
def test_analysis_runs_on_ppocr(name):
    stats = analyze(Model.load(real_model(name))).stats()
    assert stats["prunable"] > 0 and stats["unprunable"] >= 1


# ---- the command line -------------------------------------------------------------------


def test_inspect_channel_groups_prints_the_table_and_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    path = tmp_path / "cnn.onnx"
    onnx.save(builders.cnn(), path)
    assert main(["inspect", str(path), "--channel-groups"]) == 0
    out = capsys.readouterr().out
    assert "channel groups: 3 of 4 prunable" in out and "reaches graph output" in out
    assert main(["inspect", str(path), "--channel-groups", "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["channel_groups"]["summary"]["prunable"] == 3
    assert len(data["channel_groups"]["groups"]) == 4
