"""distill: fits the head to the teacher (KL down, agreement up), labels from a file,
each guard, the digits accuracy after heavy pruning, and a real model's head."""

from __future__ import annotations

import numpy as np
import pytest

from models.digits import accuracy, digits_mlp, digits_split
from onnxopt import Model, PassManager
from onnxopt.errors import CalibrationError, UsageError
from onnxopt.framework import PassContext, get_pass
from tests.helpers import io_signature, parse, real_model, run_pass


@pytest.fixture(scope="module")
def digits():
    model = Model.from_proto(digits_mlp())
    x_train, x_test, y_train, y_test = digits_split()
    calib = [{"input": x_train[i:i + 16]} for i in range(0, len(x_train), 16)]
    return model, calib, x_test, y_test, y_train


def _student(model, calib, text):
    work = model.copy()
    PassManager(text).run(work, PassContext(reference=model, calibration=calib))
    return work


def test_fires_kl_down_agreement_up_without_labels(digits):
    model, calib, x_test, y_test, _ = digits
    student = _student(model, calib, "prune-channels(ratio=0.75)")
    ran = run_pass("distill", student, PassContext(reference=model, calibration=calib))
    s = ran.stats
    assert ran.modified and s["kept"] and not s["labels"] and s["alpha"] == 1.0
    assert s["kl_after"] < s["kl_before"] / 4 and s["agreement_after"] > s["agreement_before"]
    assert s["rows_held_out"] > 0
    assert accuracy(ran.model, x_test, y_test) > accuracy(student, x_test, y_test)
    assert io_signature(ran.model) == io_signature(model)


def test_labels_from_a_file_and_two_layers(digits, tmp_path):
    model, calib, x_test, y_test, y_train = digits
    np.save(tmp_path / "labels.npy", y_train)
    np.savez(tmp_path / "labels.npz", labels=y_train)
    student = _student(model, calib, "prune-channels(ratio=0.75)")
    for path in ("labels.npy", "labels.npz"):
        ran = run_pass("distill", student, PassContext(reference=model, calibration=calib),
                       labels=str(tmp_path / path), layers=2)
        assert ran.stats["labels"] and ran.stats["alpha"] == 0.7 and ran.stats["layers"] == 2
        assert ran.stats["accuracy_after"] >= ran.stats["accuracy_before"]
    # 75 % of the hidden neurons gone, then the head distilled: within a point
    assert accuracy(model, x_test, y_test) - accuracy(ran.model, x_test, y_test) <= 0.01


def test_does_not_fire_when_the_head_already_matches(digits):
    model, calib, *_ = digits
    ran = run_pass("distill", model, PassContext(reference=model, calibration=calib))
    assert not ran.modified and ran.stats["kept"] is False


def test_does_not_fire_without_a_dense_head():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) { y = Softmax(x) }
    """)
    ran = run_pass("distill", model, PassContext(reference=model, calibration=[{"x": np.ones((2, 4), np.float32)}]))
    assert not ran.modified and "no Gemm/MatMul" in ran.stats["skipped"]


def test_guards(digits, tmp_path):
    model, calib, *_ = digits
    with pytest.raises(CalibrationError, match="distill"):
        run_pass("distill", model, PassContext(reference=model))
    with pytest.raises(UsageError, match="teacher"):
        get_pass("distill")().run(model.copy(), PassContext(calibration=calib))
    with pytest.raises(UsageError, match="no output"):
        run_pass("distill", model, PassContext(reference=model, calibration=calib), output="nope")
    np.save(tmp_path / "few.npy", np.zeros(3, np.int64))
    with pytest.raises(CalibrationError, match="labels"):
        run_pass("distill", model, PassContext(reference=model, calibration=calib), labels=str(tmp_path / "few.npy"))
    np.save(tmp_path / "bad.npy", np.full(5000, 12, np.int64))
    with pytest.raises(CalibrationError, match=r"\[0, 10\)"):
        run_pass("distill", model, PassContext(reference=model, calibration=calib), labels=str(tmp_path / "bad.npy"))
    with pytest.raises(CalibrationError, match="no such file"):
        run_pass("distill", model, PassContext(reference=model, calibration=calib), labels=str(tmp_path / "none.npy"))


def test_ppocr_cls_head_through_softmax_and_a_computed_reshape():
    from models.ocr import ocr_feeds

    model = Model.load(real_model("ppocr-cls"))
    calib = ocr_feeds("ppocr-cls", 24, seed=0)
    student = _student(model, calib, "prune-channels(ratio=0.2,round_to=8)")
    ran = run_pass("distill", student, PassContext(reference=model, calibration=calib), holdout=0.25)
    s = ran.stats
    assert s["layers"] == 1 and s["rows"] == 24 and s["rows_held_out"] == 6
    assert ran.modified and s["kept"] and s["kl_after"] < s["kl_before"]
    assert io_signature(ran.model) == io_signature(model)
