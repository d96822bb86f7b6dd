"""share-weights: the 1-D k-means, fires (codebook + indices, zeros exact, stats), each
guard, idempotent, deterministic, subgraphs, after pruning, and the real models."""

from __future__ import annotations

import numpy as np
import pytest
from onnxopt.passes.share_weights import kmeans_1d

from models.digits import accuracy, digits_mlp, digits_split
from models.fetch import light_models
from models.ocr import ocr_feeds
from onnxopt import Model, PassContext
from onnxopt.errors import PipelineError
from onnxopt.framework import get_pass
from tests.helpers import cosine, io_signature, parse, real_model, run_pass, with_weights
from tests.passes.compress_helpers import (
    assert_identical_outputs,
    optimized_ops,
    run,
    storages,
    two_layer_mlp,
    values,
    weights,
)

RNG = np.random.default_rng(21)
W0 = RNG.standard_normal((32, 24)).astype(np.float32)
W1 = RNG.standard_normal((24, 32)).astype(np.float32)


def mlp(w0: np.ndarray = W0, w1: np.ndarray = W1) -> Model:
    return two_layer_mlp(w0, w1, bias=np.linspace(-1, 1, 24))


def feeds() -> dict:
    return {"x": np.random.default_rng(3).standard_normal((4, 32)).astype(np.float32)}


# ---- k-means --------------------------------------------------------------------------


def test_kmeans_linear_init_is_lloyd_from_evenly_spaced_centroids():
    v = np.array([0.0, 0.1, 0.2, 5.0, 5.1, 9.9, 10.0])
    centroids, labels = kmeans_1d(v, 3)
    assert np.allclose(centroids, [0.1, 5.05, 9.95])
    assert labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert np.allclose(centroids[labels], [0.1, 0.1, 0.1, 5.05, 5.05, 9.95, 9.95])


def test_kmeans_keeps_few_distinct_values_exactly_and_drops_empty_clusters():
    v = np.array([3.0, -1.0, 3.0, 2.5])
    centroids, labels = kmeans_1d(v, 8)
    assert centroids.tolist() == [-1.0, 2.5, 3.0] and np.array_equal(centroids[labels], v)
    v = np.concatenate([np.zeros(50) + 0.01, [100.0]])  # linear init leaves the middle empty
    centroids, labels = kmeans_1d(v, 4)
    assert len(centroids) == 2 and labels.max() == 1


def test_kmeans_linear_init_reseeds_empty_clusters_of_a_heavy_tailed_layer():
    """Two outliers stretch [min, max]: evenly spaced centroids leave all but a few
    empty. They are re-seeded into the worst clusters, so the whole codebook is used and
    the error is far below that of Lloyd over the evenly spaced ones alone."""
    v = np.concatenate([np.random.default_rng(0).standard_normal(5000), [60.0, -60.0]])
    centroids, labels = kmeans_1d(v, 16)
    assert len(centroids) == 16 and np.all(np.diff(centroids) > 0)
    assert set(np.unique(labels)) == set(range(16))
    sse = ((v - centroids[labels]) ** 2).sum()
    lone = np.linspace(v.min(), v.max(), 16)  # the bulk falls to 2-3 of these
    assert ((v[:, None] - lone[None]) ** 2).min(1).sum() > 20 * sse
    assert (np.abs(v[:, None] - centroids[None]).argmin(1) == labels).mean() > 0.999


def test_kmeans_plus_plus_is_seeded():
    v = np.random.default_rng(0).standard_normal(2000)
    a = kmeans_1d(v, 16, init="kmeans++", rng=np.random.default_rng(1))
    b = kmeans_1d(v, 16, init="kmeans++", rng=np.random.default_rng(1))
    c = kmeans_1d(v, 16, init="kmeans++", rng=np.random.default_rng(2))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    # Lloyd: every value sits with its nearest centroid, every centroid is its cluster's mean
    centroids, labels = a
    assert (np.abs(v[:, None] - centroids[None]).argmin(1) == labels).mean() > 0.999
    means = np.array([v[labels == j].mean() for j in range(len(centroids))])
    assert np.allclose(means, centroids, atol=1e-2)


# ---- the pass -------------------------------------------------------------------------


def test_clusters_each_layer_into_a_codebook_and_packed_indices():
    model = mlp()
    ran = run_pass("share-weights", model, bits=3, min_size=0)
    assert ran.modified and ran.stats["layers_shared"] == 2
    got = weights(ran.model)
    for name, w in (("w0", W0), ("w1", W1)):
        assert len(np.unique(got[name])) <= 8
        # each weight went to its nearest shared value
        shared = np.unique(got[name])
        nearest = shared[np.abs(w[..., None] - shared).argmin(-1)]
        assert np.array_equal(got[name], nearest)
    assert storages(ran.model) == {"w0": "dense-idx", "w1": "dense-idx"}
    ops = [n.op for n in ran.model.graph.nodes]
    assert ops.count("BitShift") == 2 and ops.count("Gather") == 2  # one block, two codebooks
    rows = {r["layer"]: r for r in ran.stats["layers"]}
    assert rows["w0"]["bits"] == 3 and rows["w0"]["clusters"] <= 8
    assert 3 <= rows["w0"]["bits_per_weight"] < 4.5
    assert rows["w0"]["max_abs_change"] == pytest.approx(float(np.abs(got["w0"] - W0).max()), rel=1e-6)
    assert_identical_outputs(ran.model, with_weights(model, **got), feeds())
    assert io_signature(ran.model) == io_signature(model)
    assert not {"Gather", "BitShift"} & set(optimized_ops(ran.model))


def test_zeros_stay_exact_zeros_outside_the_clusters():
    pruned = np.where(np.abs(W0) < 0.8, 0, W0).astype(np.float32)
    pruned[0, :3] = -0.0
    ran = run_pass("share-weights", mlp(w0=pruned), bits=2, min_size=0)
    got = weights(ran.model)["w0"]
    zero = pruned == 0
    assert np.array_equal(got == 0, zero)  # the same weights are zero, and only those
    assert not np.signbit(got[zero]).any()  # -0.0 became a plain zero
    assert len(np.unique(got[~zero])) <= 3  # 2 bits: three clusters and the zero
    assert storages(ran.model)["w0"] in ("dense-idx", "sparse-idx")


def test_per_layer_widths():
    ran = run_pass("share-weights", mlp(), bits=6, layers=["w1=2"], min_size=0)
    got = weights(ran.model)
    assert len(np.unique(got["w1"])) <= 4 and 16 < len(np.unique(got["w0"])) <= 64
    assert {r["layer"]: r["bits"] for r in ran.stats["layers"]} == {"w0": 6, "w1": 2}


@pytest.mark.parametrize("options, reason", [
    ({"min_size": 10_000}, "smaller than min_size"),
    ({"exclude": ["^w"]}, "excluded"),
    ({"ops": ["Conv"]}, None),
])
def test_does_not_fire_on_layers_it_is_told_to_leave(options, reason):
    model = mlp()
    ran = run_pass("share-weights", model, **{"min_size": 0, **options})
    assert not ran.modified and ran.stats["layers_shared"] == 0
    if reason:
        assert ran.stats["skipped"] == {reason: 2}
    assert weights(ran.model).keys() == {"w0", "w1"}
    assert all(np.array_equal(v, {"w0": W0, "w1": W1}[k]) for k, v in weights(ran.model).items())


def test_leaves_the_bias_alone_and_skips_overridable_weights():
    ran = run_pass("share-weights", mlp(), bits=2, min_size=0)
    bias = next(t for t in ran.model.constants() if t.name == "b0")
    assert np.array_equal(bias.values, np.linspace(-1, 1, 24).astype(np.float32))
    light = Model.load(light_models()[0])
    ran = run_pass("share-weights", light, min_size=0)
    assert not ran.modified and io_signature(ran.model) == io_signature(light)


@pytest.mark.parametrize("options, message", [
    ({"bits": 1}, "must be >="),
    ({"bits": 9}, "must be <="),
    ({"init": "random"}, "must be one of"),
    ({"layers": ["w0=12"]}, "value must be in"),
    ({"ops": ["Add"]}, "ops must be among"),
])
def test_bad_options_are_one_clear_error(options, message):
    with pytest.raises(PipelineError, match=message):
        get_pass("share-weights")(**options)


def test_is_idempotent_and_deterministic():
    once = run_pass("share-weights", mlp(), bits=4, min_size=0)
    twice = run_pass("share-weights", once.model, bits=4, min_size=0)
    assert once.modified and not twice.modified
    assert twice.stats["skipped"] == {"already shared": 2}
    assert twice.model.to_bytes() == once.model.to_bytes()
    assert run_pass("share-weights", mlp(), bits=4, min_size=0).model.to_bytes() == once.model.to_bytes()
    pp = run_pass("share-weights", mlp(), PassContext(seed=5), bits=4, init="kmeans++", min_size=0)
    assert pp.model.to_bytes() == run_pass("share-weights", mlp(), PassContext(seed=5), bits=4,
                                           init="kmeans++", min_size=0).model.to_bytes()
    fewer = run_pass("share-weights", once.model, bits=2, min_size=0)  # a narrower width re-clusters
    assert fewer.modified and all(len(np.unique(v)) <= 4 for v in weights(fewer.model).values())


def test_after_pruning_one_block_holds_positions_and_indices():
    pruned = run_pass("prune-magnitude", mlp(), sparsity=0.8, min_size=0)
    ran = run_pass("share-weights", pruned.model, bits=4, min_size=0)
    before, after = weights(pruned.model), weights(ran.model)
    for name in before:
        assert np.array_equal(before[name] == 0, after[name] == 0)
    assert set(storages(ran.model).values()) == {"sparse-idx"}
    assert [n.op for n in ran.model.graph.nodes].count("ScatterElements") == 1
    assert len(ran.model.to_bytes()) < 0.7 * len(pruned.model.to_bytes())
    assert_identical_outputs(ran.model, with_weights(mlp(), **after), feeds())


def test_survives_an_if_body():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((32, 32)).astype(np.float32)
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (bool c, float[N, 32] x) => (float[N, 32] y)
        {{
            y = If(c) <
                then_branch = t () => (float[N, 32] a) <float[32, 32] inner = {values(w)}> {{ a = MatMul(x, inner) }},
                else_branch = e () => (float[N, 32] b) {{ b = Neg(x) }}
            >
        }}
    """)
    ran = run_pass("share-weights", model, bits=3, min_size=0)
    assert ran.modified and len(np.unique(weights(ran.model)["inner"])) <= 8
    assert io_signature(ran.model) == io_signature(model)
    x = rng.standard_normal((2, 32)).astype(np.float32)
    for c in (True, False):
        assert_identical_outputs(ran.model, _with_inner(model, weights(ran.model)["inner"]), {"c": np.array(c), "x": x})


def _with_inner(model: Model, value: np.ndarray) -> Model:
    from onnxopt.model import extras, iter_graphs

    out = model.copy()
    for g in iter_graphs(out.graph):
        for t in extras(g).initializers:
            if t.name == "inner":
                t.values = value
    return out


def test_digits_classifier_keeps_its_accuracy_at_five_bits():
    model = Model.from_proto(digits_mlp())
    _, x_test, _, y_test = digits_split()
    base = accuracy(model, x_test, y_test)
    ran = run_pass("share-weights", model, PassContext(reference=model), bits=5)
    assert ran.stats["layers_shared"] == 3
    assert accuracy(ran.model, x_test, y_test) >= base - 0.01
    assert ran.stats["total"]["file_ratio"] > 5


@pytest.mark.parametrize("name, init", [("ppocr-det", "kmeans++"), ("ppocr-rec", "linear"), ("ppocr-cls", "linear")])
def test_real_models_share_and_stay_faithful(name, init):
    """8-bit sharing on text images (printed text rendered with Pillow): the detector's map, the
    recognizer's characters and the classifier's score stay; all on stock onnxruntime."""
    model = Model.load(real_model(name))
    ran = run_pass("share-weights", model, bits=8, init=init)
    assert ran.stats["layers_shared"] >= 10
    assert io_signature(ran.model) == io_signature(model)
    (x,) = ocr_feeds(name)
    (a,), (b,) = run(model, x), run(ran.model, x)
    if name == "ppocr-det":
        text_a, text_b = a > 0.3, b > 0.3
        assert text_a.mean() > 0.05 and (text_a & text_b).sum() / (text_a | text_b).sum() > 0.8
    elif name == "ppocr-rec":
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
    else:
        assert cosine(model, ran.model, x) > 0.999
    assert not {"Gather", "BitShift", "ScatterElements"} & set(optimized_ops(ran.model)) - set(optimized_ops(model))


def test_below_opset_11_indices_are_one_byte_each_and_layers_share_a_block():
    model = parse(f"""
        <ir_version: 5, opset_import: ["" : 10]>
        g (float[N, 32] x) => (float[N, 32] y)
        <float[32, 24] w0 = {values(W0)}, float[24, 32] w1 = {values(W1)}>
        {{ h = MatMul(x, w0)  y = MatMul(h, w1) }}
    """)
    ran = run_pass("share-weights", model, bits=4, min_size=0)
    ops = [n.op for n in ran.model.graph.nodes]
    assert ops.count("Split") == 1 and "BitShift" not in ops  # BitShift needs opset 11
    words = [t for t in ran.model.constants() if t.values.dtype == np.uint8]
    assert len(words) == 1 and words[0].values.size == W0.size + W1.size
    assert_identical_outputs(ran.model, with_weights(model, **weights(ran.model)), feeds())
