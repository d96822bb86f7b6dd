"""prune-magnitude: fires (structure, stats, exact zeros), each guard, the criteria
(per-layer and global sparsity, threshold, N:M along each op's input axis), idempotent,
deterministic, subgraphs, Constant-node weights, and the real models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxopt.passes.prune_magnitude import nm_mask

from models import builders
from models.digits import accuracy, digits_mlp, digits_split
from models.fetch import light_models
from models.ocr import ocr_feeds
from onnxopt import Model, PassContext
from onnxopt.errors import PipelineError
from onnxopt.framework import get_pass
from tests.helpers import REAL_MODEL_NAMES, io_signature, parse, real_model, run_pass, with_weights
from tests.passes.compress_helpers import (
    assert_identical_outputs,
    decoder_nodes,
    optimized_ops,
    storages,
    two_layer_mlp,
    values,
    weights,
)

RNG = np.random.default_rng(7)
W0 = RNG.standard_normal((32, 24)).astype(np.float32)
W1 = (RNG.standard_normal((24, 32)) * 0.1).astype(np.float32)


def mlp(ir: int = 8, opset: int = 17) -> Model:
    return two_layer_mlp(W0, W1, bias=np.linspace(-1, 1, 24), ir=ir, opset=opset)


def feeds(n: int = 4, width: int = 32) -> dict:
    return {"x": np.random.default_rng(3).standard_normal((n, width)).astype(np.float32)}


def smallest_zeroed(w: np.ndarray, count: int) -> np.ndarray:
    flat = w.ravel().copy()
    flat[np.argsort(np.abs(flat), kind="stable")[:count]] = 0
    return flat.reshape(w.shape)


def test_zeroes_the_smallest_weights_of_each_layer_and_stores_them_sparsely():
    model = mlp()
    ran = run_pass("prune-magnitude", model, sparsity=0.75, min_size=0)
    assert ran.modified
    expected = {"w0": smallest_zeroed(W0, 576), "w1": smallest_zeroed(W1, 576)}
    got = weights(ran.model)
    for name in expected:
        assert np.array_equal(got[name], expected[name])
    assert storages(ran.model) == {"w0": "sparse", "w1": "sparse"}
    s = ran.stats
    assert s["layers_pruned"] == 2 and s["weights_zeroed"] == 1152 and s["sparsity"] == 0.75
    rows = {r["layer"]: r for r in s["layers"]}
    assert rows["w0"]["sparsity"] == 0.75 and rows["w0"]["zeroed"] == 576 and rows["w0"]["storage"] == "sparse"
    assert s["total"]["file_bytes"] < s["total"]["original_file_bytes"]
    assert s["total"]["file_ratio"] > 1.5
    # The bias is never a candidate, and the model computes exactly what the pruned dense
    # weights compute, on stock onnxruntime.
    bias = next(t for t in ran.model.constants() if t.name == "b0")
    assert np.array_equal(bias.values, np.linspace(-1, 1, 24).astype(np.float32))
    assert_identical_outputs(ran.model, with_weights(model, **expected), feeds())
    assert io_signature(ran.model) == io_signature(model)
    assert "ScatterElements" not in optimized_ops(ran.model)


def test_biases_and_normalization_parameters_are_left_alone():
    model = Model.from_proto(builders.cnn())
    ran = run_pass("prune-magnitude", model, sparsity=0.9, min_size=0)
    before = {t.name: t.values for t in model.constants()}
    after = {t.name: t for t in ran.model.constants()}
    for name, value in before.items():
        if name.startswith(("bn_", "fc_b")):
            assert np.array_equal(after[name].values, value), name
    pruned = {r["layer"] for r in ran.stats["layers"]}
    assert pruned == {n for n in before if n.startswith(("conv_w", "fc_w"))}


def test_global_scope_uses_one_threshold_over_all_layers():
    ran = run_pass("prune-magnitude", mlp(), sparsity=0.5, scope="global", min_size=0)
    got = weights(ran.model)
    all_w = np.concatenate([W0.ravel(), W1.ravel()])
    k = all_w.size // 2
    cut = np.sort(np.abs(all_w))[k]
    assert sum(int((v == 0).sum()) for v in got.values()) == k
    assert all((np.abs(v[v != 0]) >= cut).all() for v in got.values())
    # w1 is ten times smaller than w0: a global threshold takes most of it.
    rows = {r["layer"]: r["sparsity"] for r in ran.stats["layers"]}
    assert rows["w1"] > 0.8 and rows["w0"] < 0.3


def test_threshold_absolute_and_in_standard_deviations():
    ran = run_pass("prune-magnitude", mlp(), threshold=0.5, min_size=0)
    got = weights(ran.model)
    assert np.array_equal(got["w0"], np.where(np.abs(W0) < 0.5, 0, W0))
    assert np.array_equal(got["w1"], np.where(np.abs(W1) < 0.5, 0, W1))  # all of w1
    ran = run_pass("prune-magnitude", mlp(), threshold=1.0, threshold_unit="std", min_size=0)
    got = weights(ran.model)
    for name, w in (("w0", W0), ("w1", W1)):
        assert np.array_equal(got[name], np.where(np.abs(w) < np.std(w, dtype=np.float64), 0, w))


def test_per_layer_targets_override_the_sparsity():
    ran = run_pass("prune-magnitude", mlp(), sparsity=0.5, layers=["w1=0.9"], min_size=0)
    rows = {r["layer"]: r["zeroed"] for r in ran.stats["layers"]}
    assert rows == {"w0": 384, "w1": round(0.9 * 768)}


def _conv_gemm_matmul() -> tuple[Model, dict]:
    rng = np.random.default_rng(11)
    w = {"conv": rng.standard_normal((8, 12, 3, 3)).astype(np.float32),
         "gemm_t": rng.standard_normal((6, 8)).astype(np.float32),
         "gemm": rng.standard_normal((6, 6)).astype(np.float32),
         "mm": rng.standard_normal((6, 5)).astype(np.float32)}
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 12, 5, 5] x) => (float[1, 5] y)
        <float[8, 12, 3, 3] conv = {values(w["conv"])}, float[6, 8] gemm_t = {values(w["gemm_t"])},
         float[6, 6] gemm = {values(w["gemm"])}, float[6, 5] mm = {values(w["mm"])}>
        {{
            c = Conv <pads = [1, 1, 1, 1]> (x, conv)
            p = GlobalAveragePool(c)
            f = Flatten(p)
            t = Gemm <transB = 1> (f, gemm_t)
            u = Gemm (t, gemm)
            y = MatMul(u, mm)
        }}
    """)
    return model, w


def test_n_m_pattern_runs_along_each_ops_input_dimension():
    model, w = _conv_gemm_matmul()
    ran = run_pass("prune-magnitude", model, pattern="2:4", min_size=0)
    got = weights(ran.model)
    # Conv [O, I, kh, kw]: groups along I; Gemm transB [N, K]: along axis 1; Gemm and
    # MatMul [K, N]: along axis 0.
    for name, axis in (("conv", 1), ("gemm_t", 1), ("gemm", 0), ("mm", 0)):
        v = np.moveaxis(got[name], axis, -1)
        length = v.shape[-1]
        full = length - length % 4
        groups = v[..., :full].reshape(v.shape[:-1] + (-1, 4))
        assert ((groups != 0).sum(-1) <= 2).all(), name
        assert np.array_equal(got[name] != 0, nm_mask(w[name], axis, 2, 4)), name
    # the kept ones are the largest of their group
    conv = np.moveaxis(np.abs(w["conv"]), 1, -1).reshape(8, 3, 3, 3, 4)
    kept = np.moveaxis(got["conv"] != 0, 1, -1).reshape(8, 3, 3, 3, 4)
    assert (np.where(kept, conv, np.inf).min(-1) >= np.where(kept, -np.inf, conv).max(-1)).all()
    assert_identical_outputs(ran.model, with_weights(model, **got), {"x": np.ones((1, 12, 5, 5), np.float32)})


def test_n_m_mask_keeps_a_short_last_group():
    w = np.array([[5.0, -1.0, 4.0, 0.5, 3.0, 2.0]], np.float32)
    assert nm_mask(w, 1, 2, 4).tolist() == [[True, False, True, False, True, True]]


@pytest.mark.parametrize("options, reason", [
    ({"min_size": 10_000}, "smaller than min_size"),
    ({"exclude": ["w"]}, "excluded"),
    ({"include": ["^nothing$"]}, "not included"),
])
def test_does_not_fire_on_layers_it_is_told_to_leave(options, reason):
    ran = run_pass("prune-magnitude", mlp(), **{"min_size": 0, **options})
    assert not ran.modified and ran.stats["skipped"] == {reason: 2}
    assert ran.model.to_bytes() == mlp().to_bytes()


def test_ops_filter_and_name_patterns_select_layers():
    model, _ = _conv_gemm_matmul()
    ran = run_pass("prune-magnitude", model, ops=["Conv"], min_size=0)
    assert [r["layer"] for r in ran.stats["layers"]] == ["conv"]
    ran = run_pass("prune-magnitude", model, include=["^gemm"], min_size=0)
    assert sorted(r["layer"] for r in ran.stats["layers"]) == ["gemm", "gemm_t"]


def test_does_not_fire_with_zero_sparsity():
    ran = run_pass("prune-magnitude", mlp(), sparsity=0.0, min_size=0)
    assert not ran.modified and ran.stats["weights_zeroed"] == 0


def test_skips_weights_it_must_not_change():
    w = values(RNG.standard_normal((16, 32)))
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 16] x, float[16, 32] fed) => (float[N, 32] y, float[16, 32] exposed)
        <float[16, 32] shared = {w}, float[16, 32] exposed = {w}, int64[1] zero = {{0}}, int64[1] one = {{1}}>
        {{
            shared_row = Slice(shared, zero, one)
            a = MatMul(x, shared)
            b = Add(a, shared_row)
            c = MatMul(x, exposed)
            d = MatMul(x, fed)
            e = Add(b, c)
            y = Add(e, d)
        }}
    """)
    ran = run_pass("prune-magnitude", model, sparsity=0.9, min_size=0)
    assert not ran.modified
    assert ran.stats["skipped"] == {"also read as data by another node": 1, "graph output": 1}


def test_ir3_weights_listed_as_inputs_are_overridable_and_skipped():
    for path in light_models()[:3]:
        model = Model.load(path)
        ran = run_pass("prune-magnitude", model, sparsity=0.5, min_size=0)
        assert not ran.modified
        assert set(ran.stats["skipped"]) <= {"overridable (graph input)", "not a constant"}
        assert io_signature(ran.model) == io_signature(model)


@pytest.mark.parametrize("options, message", [
    ({"sparsity": 0.5, "threshold": 0.1}, "give one of sparsity, threshold or pattern"),
    ({"pattern": "4:2"}, "pattern must be N:M"),
    ({"pattern": "two:four"}, "pattern must be N:M"),
    ({"threshold_unit": "std"}, "threshold_unit needs a threshold"),
    ({"ops": ["Relu"]}, "ops must be among"),
    ({"exclude": ["("]}, "bad name pattern"),
    ({"layers": ["w0"]}, "not PATTERN=VALUE"),
    ({"layers": ["w0=2"]}, "value must be in"),
    ({"sparsity": 1.5}, "must be <="),
    ({"scope": "model"}, "must be one of"),
])
def test_bad_options_are_one_clear_error(options, message):
    with pytest.raises(PipelineError, match=message):
        get_pass("prune-magnitude")(**options)


def test_is_idempotent_and_deterministic():
    once = run_pass("prune-magnitude", mlp(), sparsity=0.8, min_size=0)
    twice = run_pass("prune-magnitude", once.model, sparsity=0.8, min_size=0)
    assert once.modified and not twice.modified
    assert twice.model.to_bytes() == once.model.to_bytes()
    again = run_pass("prune-magnitude", mlp(), sparsity=0.8, min_size=0)
    assert again.model.to_bytes() == once.model.to_bytes()
    more = run_pass("prune-magnitude", once.model, sparsity=0.9, min_size=0)
    assert more.modified and more.stats["weights_zeroed"] == 2 * (round(0.9 * 768) - round(0.8 * 768))
    assert [n.op for n in more.model.graph.nodes].count("ScatterElements") == 1  # one block, rebuilt
    assert decoder_nodes(more.model) <= decoder_nodes(once.model) + 1


def test_prunes_constant_node_weights_as_paddle_exports_them():
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : 12]>
        g (float[N, 32] x) => (float[N, 24] y)
        {{ w = Constant <value = float[32, 24] {values(W0)}> ()  y = MatMul(x, w) }}
    """)
    ran = run_pass("prune-magnitude", model, sparsity=0.6, min_size=0)
    assert ran.modified and "Constant" not in [n.op for n in ran.model.graph.nodes]
    expected = smallest_zeroed(W0, round(0.6 * W0.size))
    assert np.array_equal(weights(ran.model)["w"], expected)
    assert_identical_outputs(ran.model, parse(f"""
        <ir_version: 8, opset_import: ["" : 12]>
        g (float[N, 32] x) => (float[N, 24] y)
        {{ w = Constant <value = float[32, 24] {values(expected)}> ()  y = MatMul(x, w) }}
    """), feeds())


def test_below_opset_11_prunes_but_stores_densely():
    model = mlp(opset=10)
    ran = run_pass("prune-magnitude", model, sparsity=0.9, min_size=0)
    assert ran.modified and set(storages(ran.model).values()) <= {"dense", "dense-idx"}
    assert not {"ScatterElements", "BitShift", "CumSum"} & {n.op for n in ran.model.graph.nodes}  # opset 11 ops
    assert ran.stats["weights_zeroed"] == 2 * round(0.9 * 768)
    assert_identical_outputs(ran.model, with_weights(model, **weights(ran.model)), feeds())


def test_survives_if_and_loop_bodies():
    rng = np.random.default_rng(5)
    outer, inner = rng.standard_normal((16, 16)).astype(np.float32), rng.standard_normal((16, 16)).astype(np.float32)
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (bool c, float[N, 16] x) => (float[N, 16] y, float[N, 16] z)
        <float[16, 16] outer = {values(outer)}, int64 trip = {{2}}>
        {{
            y = If(c) <
                then_branch = t () => (float[N, 16] a) {{ a = MatMul(x, outer) }},
                else_branch = e () => (float[N, 16] b) {{ b = Neg(x) }}
            >
            z = Loop(trip, c, x) <body = body (int64 i, bool cin, float[N, 16] acc) => (bool cout, float[N, 16] nxt)
                <float[16, 16] inner = {values(inner)}>
                {{ cout = Identity(cin)  nxt = MatMul(acc, inner) }}>
        }}
    """)
    ran = run_pass("prune-magnitude", model, sparsity=0.5, min_size=0)
    assert sorted(r["layer"] for r in ran.stats["layers"]) == ["inner", "outer"]
    got = weights(ran.model)
    expected = {"outer": smallest_zeroed(outer, 128), "inner": smallest_zeroed(inner, 128)}
    assert all(np.array_equal(got[k], v) for k, v in expected.items())
    assert io_signature(ran.model) == io_signature(model)
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    reference = with_weights(model, **expected)
    for c in (True, False):
        assert_identical_outputs(ran.model, reference, {"c": np.array(c), "x": x})
    onnx.checker.check_model(ran.model.to_proto(), full_check=True)


def test_digits_classifier_keeps_its_accuracy_at_half_sparsity():
    model = Model.from_proto(digits_mlp())
    _, x_test, _, y_test = digits_split()
    base = accuracy(model, x_test, y_test)
    ran = run_pass("prune-magnitude", model, PassContext(reference=model), sparsity=0.5)
    assert ran.stats["layers_pruned"] == 3 and ran.stats["sparsity"] == 0.5
    assert accuracy(ran.model, x_test, y_test) >= base - 0.01
    assert ran.stats["total"]["file_ratio"] > 1.7


@pytest.mark.parametrize("name", REAL_MODEL_NAMES)
def test_real_models_prune_and_run_on_stock_onnxruntime(name):
    model = Model.load(real_model(name))
    ran = run_pass("prune-magnitude", model, PassContext(reference=model), sparsity=0.5)
    assert ran.modified and ran.stats["layers_pruned"] >= 10
    assert all(abs(r["sparsity"] - 0.5) < 1e-3 for r in ran.stats["layers"])
    assert io_signature(ran.model) == io_signature(model)
    assert ran.stats["total"]["file_bytes"] < 0.7 * ran.stats["total"]["original_file_bytes"]
    # The compressed file gives exactly what its pruned dense weights give.
    dense = run_pass("materialize", ran.model)
    assert_identical_outputs(ran.model, dense.model, ocr_feeds(name)[0])
    assert not {"ScatterElements", "BitShift", "CumSum"} & set(optimized_ops(ran.model))


def test_dense_storage_keeps_plain_tensors_with_zeros():
    model = mlp()
    ran = run_pass("prune-magnitude", model, sparsity=0.75, min_size=0, storage="dense")
    assert ran.modified and storages(ran.model) == {"w0": "dense", "w1": "dense"}
    assert decoder_nodes(ran.model) == 0
    expected = {"w0": smallest_zeroed(W0, 576), "w1": smallest_zeroed(W1, 576)}
    assert all(np.array_equal(weights(ran.model)[k], v) for k, v in expected.items())
    assert ran.stats["total"]["file_gzip_ratio"] > 1.5 > ran.stats["total"]["file_ratio"]
    # a compact model pruned further with dense storage becomes plain again
    compact = run_pass("prune-magnitude", model, sparsity=0.5, min_size=0).model
    plain = run_pass("prune-magnitude", compact, sparsity=0.75, min_size=0, storage="dense")
    assert storages(plain.model) == {"w0": "dense", "w1": "dense"}
    assert_identical_outputs(plain.model, with_weights(model, **expected), feeds())


def test_a_threshold_above_every_weight_empties_the_layer():
    model = mlp()
    ran = run_pass("prune-magnitude", model, threshold=100.0, min_size=0)
    assert ran.stats["sparsity"] == 1.0
    assert all(not v.any() for v in weights(ran.model).values())
    shared = run_pass("share-weights", ran.model, min_size=0)
    zero = with_weights(model, w0=np.zeros_like(W0), w1=np.zeros_like(W1))
    for m in (ran.model, shared.model):
        assert_identical_outputs(m, zero, feeds())
