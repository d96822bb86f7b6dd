"""merge-neurons: exact when the incoming weights are exactly parallel (through BN too),
each guard, and on the digits classifier and the real models."""

from __future__ import annotations

import numpy as np
import pytest

from models import builders
from models.digits import accuracy, digits_mlp, digits_split
from onnxopt import Model
from tests.helpers import REAL_MODEL_NAMES, assert_same_outputs, io_signature, parse, real_model, run_pass

# neuron 2 = 2 x neuron 0 (weights and bias): after ReLU it is 2 x neuron 0.
DUPLICATE = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3] x) => (float[N, 2] y)
    <float[3, 4] w1 = {1.0, 0.5, 2.0, -1.0, -2.0, 1.0, -4.0, 0.3, 0.5, 0.2, 1.0, 0.7},
     float[4] b1 = {0.1, 0.3, 0.2, -0.4},
     float[4, 2] w2 = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}>
    {
        h = MatMul(x, w1)
        hb = Add(h, b1)
        r = %s(hb)
        y = MatMul(r, w2)
    }
"""


def test_merges_an_exactly_parallel_neuron_without_changing_outputs():
    model = parse(DUPLICATE % "Relu")
    ran = run_pass("merge-neurons", model)
    assert ran.modified and ran.stats["neurons_merged"] == 1 and ran.stats["min_cosine"] == pytest.approx(1.0)
    # the smaller neuron (0) goes into the larger one (2), scaled by 1/2
    w2 = next(t for t in ran.model.constants() if t.name == "w2").values
    assert w2.shape == (3, 2)
    np.testing.assert_allclose(w2[1], [5.0 + 0.5 * 1.0, 6.0 + 0.5 * 2.0])
    assert_same_outputs(model, ran.model, shapes={"x": (16, 3)})
    assert io_signature(ran.model) == io_signature(model)


def test_is_idempotent_on_exact_merges():
    once = run_pass("merge-neurons", parse(DUPLICATE % "Relu"))
    twice = run_pass("merge-neurons", once.model)
    assert once.modified and not twice.modified


def test_merges_through_batchnorm_in_a_conv_block():
    w1 = np.array([[1.0, -1.0], [0.5, 2.0], [2.0, -2.0]], np.float32)  # filter 2 = 2 x filter 0
    scale = np.array([1.0, 1.5, 1.5], np.float32)  # after BN: channel 2 = 3 x channel 0
    var = np.ones(3, np.float32)
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 2, 4, 4] x) => (float[1, 2, 4, 4] y)
        <float[3, 2, 1, 1] w1 = {{{", ".join(map(str, w1.ravel()))}}},
         float[3] s = {{{", ".join(map(str, scale))}}}, float[3] b = {{0.2, 0.1, 0.6}},
         float[3] mu = {{0.0, 0.0, 0.0}}, float[3] var = {{{", ".join(map(str, var))}}},
         float[2, 3, 1, 1] w2 = {{1.0, 2.0, 3.0, 4.0, 5.0, 6.0}}>
        {{
            c = Conv(x, w1)
            n = BatchNormalization(c, s, b, mu, var)
            r = Relu(n)
            y = Conv(r, w2)
        }}
    """)
    ran = run_pass("merge-neurons", model, threshold=0.9999)
    assert ran.stats["neurons_merged"] == 1
    assert_same_outputs(model, ran.model, rtol=1e-3, atol=1e-4)


def test_does_not_merge_below_the_threshold():
    model = Model.from_proto(builders.mlp())
    ran = run_pass("merge-neurons", model, threshold=0.99)
    assert not ran.modified and ran.stats["neurons_merged"] == 0 and ran.stats["groups_considered"] == 2


def test_after_a_sigmoid_only_duplicates_merge():
    model = parse(DUPLICATE % "Sigmoid")
    ran = run_pass("merge-neurons", model, threshold=0.5)
    assert not ran.modified  # 2 x neuron 0 is not a duplicate of it after a sigmoid


def test_residual_groups_and_depthwise_convs_are_left_alone():
    ran = run_pass("merge-neurons", Model.from_proto(builders.cnn()), threshold=0.0)
    assert ran.stats["skipped"]["several producers (residual join)"] == 1


def test_an_add_after_the_activation_blocks_merging():
    model = parse(DUPLICATE.replace("y = MatMul(r, w2)", "q = Add(r, b1)\n y = MatMul(q, w2)") % "Relu")
    ran = run_pass("merge-neurons", model, threshold=0.5)
    assert not ran.modified and ran.stats["skipped"] == {"Add after the activation": 1}


def test_ratio_bounds_how_many_go():
    model = Model.from_proto(digits_mlp())
    ran = run_pass("merge-neurons", model, threshold=0.0, ratio=0.25)
    assert ran.stats["neurons_merged"] == 75 + 25


def test_digits_merging_beats_plain_pruning_at_equal_size():
    model = Model.from_proto(digits_mlp())
    _, x_test, _, y_test = digits_split()
    merged = run_pass("merge-neurons", model, threshold=0.0, ratio=0.5).model
    pruned = run_pass("prune-channels", model, ratio=0.5).model
    assert merged.summary().parameters == pruned.summary().parameters
    assert accuracy(merged, x_test, y_test) > accuracy(pruned, x_test, y_test)
    # near-duplicates at the default threshold cost nothing
    near = run_pass("merge-neurons", model)
    assert near.modified and abs(accuracy(near.model, x_test, y_test) - accuracy(model, x_test, y_test)) <= 0.005


@pytest.mark.parametrize("name", REAL_MODEL_NAMES)
def test_real_models_merge_only_where_the_activation_allows_and_still_run(name):
    from models.ocr import ocr_feeds
    from onnxopt.validate import run_model

    model = Model.load(real_model(name))
    ran = run_pass("merge-neurons", model, threshold=0.0, ratio=0.25)
    assert ran.stats["groups_considered"] < ran.stats["groups"]
    assert ran.stats["skipped"]  # hard-swish blocks, depthwise convs, residual joins ...
    assert io_signature(ran.model) == io_signature(model)
    feeds = ocr_feeds(name, 1, seed=2, size=(96, 128) if name == "ppocr-det" else None)[0]
    assert all(np.isfinite(v).all() for v in run_model(ran.model, feeds).values())
