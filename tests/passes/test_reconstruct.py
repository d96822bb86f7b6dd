"""reconstruct: fires (stats, errors down), each guard, exactness where the answer is
known, and — on the digits classifier and PP-OCR — that it wins back what pruning cost."""

from __future__ import annotations

import numpy as np
import pytest

from models import builders
from models.digits import accuracy, digits_mlp, digits_split
from models.ocr import ocr_feeds
from onnxopt import Model, PassManager
from onnxopt.errors import CalibrationError, UsageError
from onnxopt.framework import PassContext
from onnxopt.validate import compare_outputs, run_model
from tests.helpers import cosine, io_signature, parse, real_model, run_pass

CONV = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 8, 8] x) => (float[N, 2, 8, 8] y)
    <float[6, 3, 3, 3] w1 = {WEIGHTS}, float[6] b1 = {0.1, -0.1, 0.2, -0.2, 0.3, -0.3},
     float[2, 6, 1, 1] w2 = {1.0, -0.5, 0.25, 0.8, -1.2, 0.6, 0.3, 0.9, -0.7, 0.4, 1.1, -0.2}>
    {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu(a)
        y = Conv(r, w2)
    }
""".replace("WEIGHTS", ", ".join(f"{v:.3f}" for v in np.random.default_rng(0).standard_normal(162)))


def _feeds(n, seed=0, shape=(2, 3, 8, 8), name="x"):
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _error(ref: Model, cand: Model, feeds) -> float:
    """1 - cosine over every feed (the lowest over the outputs)."""
    return 1 - cosine(ref, cand, feeds)


def _pipeline(model: Model, text: str, calib) -> tuple[Model, list]:
    work = model.copy()
    result = PassManager(text).run(work, PassContext(reference=model, calibration=calib))
    return work, result.records


def test_fires_after_pruning_and_lowers_the_error():
    model = parse(CONV)
    calib, test = _feeds(16), _feeds(4, seed=9)
    pruned, _ = _pipeline(model, "prune-channels(ratio=0.5)", calib)
    fixed, records = _pipeline(model, "prune-channels(ratio=0.5),reconstruct", calib)
    s = records[1].stats
    assert records[1].modified and s["refit"] >= 1 and s["error_after"] < s["error_before"]
    # independent random channels cannot be rebuilt from the others: lower, not gone
    assert _error(model, fixed, test) < 0.8 * _error(model, pruned, test)
    assert io_signature(fixed) == io_signature(model)


def test_does_not_fire_when_the_student_is_the_teacher():
    model = parse(CONV)
    ran = run_pass("reconstruct", model, PassContext(reference=model, calibration=_feeds(2)))
    assert not ran.modified and ran.stats["layers"] == 0


def test_layers_all_refits_unchanged_layers_without_harm():
    model = parse(CONV)
    ran = run_pass("reconstruct", model, PassContext(reference=model, calibration=_feeds(4)), layers="all")
    assert ran.stats["layers"] == 2
    assert _error(model, ran.model, _feeds(2, seed=5)) < 1e-6


def test_needs_calibration_data_and_a_teacher():
    model = parse(CONV)
    with pytest.raises(CalibrationError, match="reconstruct"):
        run_pass("reconstruct", model, PassContext(reference=model))
    from onnxopt.framework import get_pass

    with pytest.raises(UsageError, match="teacher"):
        get_pass("reconstruct")().run(model.copy(), PassContext(calibration=_feeds(1)))


def test_recovers_exactly_when_the_lost_channel_was_a_copy():
    # Channel 2 duplicates channel 0; pruning it and refitting the next layer must give
    # back the original function exactly (least squares has a zero-error solution).
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x) => (float[N, 2] y)
        <float[3, 3] w1 = {1.0, 0.0, 0.001, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0},
         float[3, 2] w2 = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}>
        { h = MatMul(x, w1)  r = Relu(h)  y = MatMul(r, w2) }
    """)
    feeds = _feeds(8, shape=(16, 3))
    out, _ = _pipeline(model, "prune-channels(ratio=0.34),reconstruct(ridge=0)", feeds)
    assert next(t for t in out.constants() if t.name == "w2").values.shape == (2, 2)
    assert _error(model, out, _feeds(2, seed=3, shape=(16, 3))) < 1e-9


def test_bias_only_corrects_the_mean_shift():
    model = parse(CONV)
    calib = _feeds(16)
    pruned, _ = _pipeline(model, "prune-channels(ratio=0.5)", calib)
    fixed, records = _pipeline(model, "prune-channels(ratio=0.5),reconstruct(bias_only=true)", calib)
    s = records[1].stats
    assert s["bias_corrected"] >= 1 and s["refit"] == 0
    f = calib[0]
    want = run_model(model, f)["y"].mean(axis=(0, 2, 3))
    assert np.abs(run_model(fixed, f)["y"].mean(axis=(0, 2, 3)) - want).max() < \
        np.abs(run_model(pruned, f)["y"].mean(axis=(0, 2, 3)) - want).max()


def test_refits_a_residual_cnn_and_a_transpose_convolution():
    model = Model.from_proto(builders.cnn())
    calib, test = _feeds(8, name="input", shape=(2, 3, 32, 32)), _feeds(2, seed=7, name="input", shape=(2, 3, 32, 32))
    pruned, _ = _pipeline(model, "prune-channels(ratio=0.5)", calib)
    fixed, records = _pipeline(model, "prune-channels(ratio=0.5),reconstruct", calib)
    assert records[1].stats["refit"] >= 4
    assert _error(model, fixed, test) < _error(model, pruned, test) / 2

    convt = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 2, 4, 4] x) => (float[N, 1, 8, 8] y)
        <float[4, 2, 1, 1] w1 = {1.0, 2.0, -1.0, 0.5, 0.3, -0.2, 1.5, 0.7},
         float[4, 3, 2, 2] wt = {WEIGHTS}, float[1, 3, 1, 1] bt = {0.1, 0.2, 0.3},
         float[1, 3, 1, 1] w3 = {1.0, -1.0, 0.5}>
        {
            a = Conv(x, w1)
            r = Relu(a)
            t = ConvTranspose <strides = [2, 2], kernel_shape = [2, 2]> (r, wt)
            tb = Add(t, bt)
            s = Relu(tb)
            y = Conv(s, w3)
        }
    """.replace("WEIGHTS", ", ".join(f"{v:.3f}" for v in np.random.default_rng(1).standard_normal(48))))
    calib, test = _feeds(8, shape=(2, 2, 4, 4)), _feeds(2, seed=4, shape=(2, 2, 4, 4))
    pruned, _ = _pipeline(convt, "prune-channels(ratio=0.5)", calib)
    fixed, records = _pipeline(convt, "prune-channels(ratio=0.5),reconstruct", calib)
    assert records[1].stats["refit"] >= 1 and not records[1].stats["skipped"]
    assert _error(convt, fixed, test) < _error(convt, pruned, test)


def test_a_layer_inside_a_subgraph_is_left_alone():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x, bool c) => (float[N, 2] y)
        <float[3, 4] w1 = {1.0, 0.1, 2.0, 0.2, 3.0, 0.3, 4.0, 0.4, 1.0, 0.1, 2.0, 0.2},
         float[4, 2] w2 = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}>
        {
            h = MatMul(x, w1)
            r = Relu(h)
            y = If(c) <
                then_branch = t () => (float[N, 2] o1) { o1 = MatMul(r, w2) },
                else_branch = e () => (float[N, 2] o2) { o2 = MatMul(r, w2) }
            >
        }
    """)
    feeds = [{"x": f["x"], "c": np.array(True)} for f in _feeds(4, shape=(8, 3))]
    ran = run_pass("reconstruct", model, PassContext(reference=model, calibration=feeds), layers="all")
    run_model(ran.model, feeds[0])
    assert ran.stats["layers"] == 1  # the MatMul in the main graph; the bodies are not touched


def test_digits_half_the_neurons_removed_costs_at_most_one_point_after_reconstruct():
    model = Model.from_proto(digits_mlp())
    x_train, x_test, _, y_test = digits_split()
    calib = [{"input": x_train[i:i + 64]} for i in range(0, len(x_train), 64)]
    base = accuracy(model, x_test, y_test)
    for text in ("prune-channels(ratio=0.5),reconstruct",
                 "merge-neurons(threshold=0,ratio=0.5),reconstruct",
                 "prune-channels(ratio=0.5),merge-neurons,reconstruct"):
        out, _ = _pipeline(model, text, calib)
        assert out.summary().parameters < 0.4 * model.summary().parameters
        assert base - accuracy(out, x_test, y_test) <= 0.01, text


def test_ppocr_cls_error_at_least_halved():
    model = Model.load(real_model("ppocr-cls"))
    calib, test = ocr_feeds("ppocr-cls", 16, seed=0), ocr_feeds("ppocr-cls", 4, seed=9)
    pruned, _ = _pipeline(model, "prune-channels(ratio=0.2,round_to=8)", calib)
    fixed, records = _pipeline(model, "prune-channels(ratio=0.2,round_to=8),reconstruct(samples=16)", calib)
    assert records[1].stats["refit"] > 30
    assert _error(model, fixed, test) < _error(model, pruned, test) / 2
    assert io_signature(fixed) == io_signature(model)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ppocr-det", "ppocr-rec"])
def test_ppocr_det_and_rec_error_at_least_halved(name):
    model = Model.load(real_model(name))
    calib, test = ocr_feeds(name, 32, seed=0), ocr_feeds(name, 8, seed=99)  # as the benchmark
    pruned, _ = _pipeline(model, "prune-channels(ratio=0.3,round_to=16)", calib)
    fixed, _ = _pipeline(model, "prune-channels(ratio=0.3,round_to=16),reconstruct", calib)
    assert _error(model, fixed, test) < _error(model, pruned, test) / 2
    out = run_model(fixed, test[0])
    assert all(np.isfinite(v).all() for v in out.values())


def test_quantized_like_layers_get_bias_correction_only():
    # weights computed at run time (as after quantization): only the bias can move
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x) => (float[N, 2] y)
        <float[3, 2] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}, float[2] b = {0.5, -0.5}>
        { h = MatMul(x, w)  y = Add(h, b) }
    """)
    student = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x) => (float[N, 2] y)
        <float[3, 2] w0 = {1.1, 2.0, 3.0, 4.0, 5.0, 6.2}, float[2] b = {0.5, -0.5}>
        { w = Identity(w0)  wq = Relu(w)  h = MatMul(x, wq)  y = Add(h, b) }
    """)
    feeds = _feeds(8, shape=(16, 3))
    ran = run_pass("reconstruct", student, PassContext(reference=model, calibration=feeds))
    assert ran.stats["bias_corrected"] == 1 and ran.stats["refit"] == 0
    assert compare_outputs("y", run_model(model, feeds[0])["y"].mean(0), run_model(ran.model, feeds[0])["y"].mean(0),
                           exact=False).cosine > 0.999
