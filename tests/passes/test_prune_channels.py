"""prune-channels: fires (structure, stats), each guard, the options, the real models
(checker, onnxruntime, inputs/outputs kept), and the digits accuracy it costs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from models import builders
from models.digits import accuracy, digits_mlp, digits_split
from models.fetch import light_models
from models.ocr import ocr_feeds
from onnxopt import Model
from onnxopt.channels import analyze
from onnxopt.errors import CalibrationError, PipelineError
from onnxopt.framework import PassContext
from onnxopt.validate import compare_outputs, run_model
from tests.helpers import REAL_MODEL_NAMES, io_signature, parse, real_model, run_pass
from tests.test_channels import PPOCR_SHAPES

MLP = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 2] y)
    <float[4, 8] w1 = {1.0, 0.1, 2.0, 0.2, 3.0, 0.3, 4.0, 0.4, 1.0, 0.1, 2.0, 0.2, 3.0, 0.3, 4.0, 0.4,
                        1.0, 0.1, 2.0, 0.2, 3.0, 0.3, 4.0, 0.4, 1.0, 0.1, 2.0, 0.2, 3.0, 0.3, 4.0, 0.4},
     float[8] b1 = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8},
     float[8, 2] w2 = {1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0}>
    {
        h = MatMul(x, w1)
        hb = Add(h, b1)
        r = Relu(hb)
        y = MatMul(r, w2)
    }
"""


def _digits():
    return Model.from_proto(digits_mlp())


def test_fires_removes_the_weakest_neurons_and_reports():
    model = parse(MLP)
    ran = run_pass("prune-channels", model, ratio=0.5)
    assert ran.modified
    shapes = {t.name: t.values.shape for t in ran.model.constants()}
    assert shapes == {"w1": (4, 4), "b1": (4,), "w2": (4, 2)}
    # the four columns of w1 with norm ~0.1 x 4 are the ones that went
    assert np.allclose(next(t for t in ran.model.constants() if t.name == "w1").values[0], [1.0, 2.0, 3.0, 4.0])
    s = ran.stats
    assert s["groups"] == 2 and s["groups_prunable"] == 1 and s["groups_pruned"] == 1
    assert s["channels_removed"] == 4 and s["parameters_after"] < s["parameters_before"]
    assert s["unprunable"] == {"output": 1}
    assert io_signature(ran.model) == io_signature(model)


def test_does_not_fire_with_ratio_zero():
    ran = run_pass("prune-channels", parse(MLP), ratio=0.0)
    assert not ran.modified and ran.stats["channels_removed"] == 0


def test_does_not_fire_when_no_group_is_prunable():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 3] y)
        <float[4, 3] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0}>
        { h = MatMul(x, w)  y = Softmax <axis = 1> (h) }
    """)
    ran = run_pass("prune-channels", model, ratio=0.5)
    assert not ran.modified and ran.stats["groups_prunable"] == 0


def test_does_not_fire_on_excluded_layers():
    ran = run_pass("prune-channels", parse(MLP), ratio=0.5, exclude=["h"])
    assert not ran.modified and ran.stats["groups_excluded"] == 1


def test_round_to_and_min_channels():
    model = Model.from_proto(builders.cnn())
    ran = run_pass("prune-channels", model, ratio=0.3, round_to=8)
    sizes = sorted(g.size for g in analyze(ran.model).prunable)
    assert all(s % 8 == 0 for s in sizes), sizes
    ran = run_pass("prune-channels", model, ratio=0.9, min_channels=12)
    assert min(g.size for g in analyze(ran.model).prunable) == 12


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn", "activation"])
def test_criteria_run_and_bn_uses_batchnorm_scales(criterion):
    model = Model.from_proto(builders.cnn())
    feeds = [{"input": np.random.default_rng(i).standard_normal((2, 3, 32, 32)).astype(np.float32)}
             for i in range(4)]
    ran = run_pass("prune-channels", model, PassContext(reference=model, calibration=feeds),
                   ratio=0.25, criterion=criterion)
    assert ran.modified and ran.stats["channels_removed"] > 0
    assert ran.stats["criterion_fallbacks"] == 0
    run_model(ran.model, feeds[0])


def test_bn_criterion_falls_back_to_l1_without_batchnorm():
    ran = run_pass("prune-channels", parse(MLP), ratio=0.5, criterion="bn")
    assert ran.modified and ran.stats["criterion_fallbacks"] == 1


def test_activation_criterion_needs_calibration_data():
    with pytest.raises(CalibrationError, match="prune-channels"):
        run_pass("prune-channels", parse(MLP), ratio=0.5, criterion="activation")


def test_bad_options_are_pipeline_errors():
    from onnxopt.framework import parse_pipeline

    for text in ("prune-channels(ratio=1.5)", "prune-channels(criterion=random)", "prune-channels(round_to=0)"):
        with pytest.raises(PipelineError):
            parse_pipeline(text)


def test_global_scope_takes_more_from_weak_groups():
    model = _digits()
    ran = run_pass("prune-channels", model, ratio=0.5, scope="global")
    assert ran.modified
    sizes = sorted(g.size for g in analyze(ran.model).prunable)
    assert sum(sizes) == 200 and sizes != [50, 150]


def test_sensitivity_scope_spares_the_sensitive_group():
    model = _digits()
    x_train = digits_split()[0]
    feeds = [{"input": x_train[i:i + 32]} for i in range(0, 256, 32)]
    ran = run_pass("prune-channels", model, PassContext(reference=model, calibration=feeds),
                   ratio=0.5, scope="sensitivity")
    assert ran.modified and set(ran.stats["sensitivity"]) == {str(g.id) for g in analyze(model).prunable}
    assert ran.stats["channels_removed"] == pytest.approx(200, abs=2)


def test_a_group_read_in_a_subgraph_stays_whole_and_the_model_still_runs():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 2, 4, 4] x, bool c) => (float[1, 2, 4, 4] y, float[1, 2, 4, 4] z)
        <float[4, 2, 1, 1] w1 = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0},
         float[2, 4, 1, 1] w2 = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0},
         float[4, 2, 1, 1] w3 = {1.0, 0.1, 3.0, 0.1, 5.0, 0.1, 7.0, 0.1},
         float[2, 4, 1, 1] w4 = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}>
        {
            a = Conv(x, w1)
            y = If(c) <
                then_branch = t () => (float[1, 2, 4, 4] o1) { o1 = Conv(a, w2) },
                else_branch = e () => (float[1, 2, 4, 4] o2) { o2 = Identity(x) }
            >
            b = Conv(x, w3)
            rb = Relu(b)
            z = Conv(rb, w4)
        }
    """)
    ran = run_pass("prune-channels", model, ratio=0.5)
    assert ran.modified and ran.stats["unprunable"] == {"output": 1, "subgraph": 1}
    shapes = {t.name: t.values.shape for t in ran.model.constants()}
    assert shapes["w1"] == (4, 2, 1, 1) and shapes["w3"] == (2, 2, 1, 1)
    feeds = {"x": np.ones((1, 2, 4, 4), np.float32), "c": np.array(True)}
    run_model(ran.model, feeds)
    assert io_signature(ran.model) == io_signature(model)


def test_digits_accuracy_cost_of_plain_pruning():
    model = _digits()
    _, x_test, _, y_test = digits_split()
    base = accuracy(model, x_test, y_test)
    mild = accuracy(run_pass("prune-channels", model, ratio=0.25).model, x_test, y_test)
    hard = accuracy(run_pass("prune-channels", model, ratio=0.75).model, x_test, y_test)
    assert base > 0.95
    assert base - mild < 0.03  # a quarter of the neurons are nearly free
    assert hard < mild  # three quarters are not: that is what reconstruct/distill are for


@pytest.mark.parametrize("name", REAL_MODEL_NAMES)
def test_real_models_pruned_pass_the_checker_run_and_keep_their_io(name):
    model = Model.load(real_model(name))
    ran = run_pass("prune-channels", model, ratio=0.3, round_to=8)
    assert ran.modified and ran.stats["channels_removed"] > 0.2 * ran.stats["channels_prunable"]
    assert ran.stats["parameters_after"] < 0.8 * ran.stats["parameters_before"]
    assert io_signature(ran.model) == io_signature(model)
    feeds = ocr_feeds(name, 1, seed=3, size=PPOCR_SHAPES[name][2:])[0]
    want, got = run_model(model, feeds), run_model(ran.model, feeds)
    for key in want:
        assert got[key].shape == want[key].shape and np.isfinite(got[key]).all()
    # dynamic sizes still work: another input size
    other = ocr_feeds(name, 1, seed=4, size=(64, 96) if name == "ppocr-det" else (48, 256))[0]
    run_model(ran.model, other)


def test_ppocr_cls_output_drifts_more_the_more_is_pruned():
    model = Model.load(real_model("ppocr-cls"))
    feeds = ocr_feeds("ppocr-cls", 4, seed=5)
    x = {"x": np.concatenate([f["x"] for f in feeds])}
    name = "save_infer_model/scale_0.tmp_1"
    want = run_model(model, x)[name]
    cos = [compare_outputs(name, want, run_model(run_pass("prune-channels", model, ratio=r).model, x)[name],
                           exact=False).cosine for r in (0.05, 0.5)]
    assert 1.0 > cos[0] > cos[1]


@pytest.mark.slow
def test_light_resnet50_with_materialized_weights_prunes_structurally():
    from benchmarks.structured import materialize

    model = materialize(Model.load(next(p for p in light_models() if "resnet50" in p.name)))
    ran = run_pass("prune-channels", model, ratio=0.3, round_to=8)
    assert ran.stats["groups_pruned"] >= 30
    onnx.checker.check_model(ran.model.to_proto())
    feeds = {"gpu_0/data_0": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    assert run_model(ran.model, feeds)["gpu_0/softmax_1"].shape == (1, 1000)
