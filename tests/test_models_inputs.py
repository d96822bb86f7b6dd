"""The data every test and benchmark shares: the PP-OCR inputs of ``models.ocr`` (layout,
preprocessing ranges, determinism, sizes, and that the real models see text in them) and
the digits classifier's split and training, built once per process."""

from __future__ import annotations

import numpy as np
import pytest

from models import digits
from models.ocr import SIZES, cls_labels, ctc_decode, mask_iou, ocr_feeds
from onnxopt.validate import make_session
from tests.helpers import real_model


@pytest.mark.parametrize("name", sorted(SIZES))
def test_feeds_keep_each_models_layout_and_preprocessing(name):
    feeds = ocr_feeds(name, 3, seed=4)
    h, w = SIZES[name]
    assert [sorted(f) for f in feeds] == [["x"]] * 3
    assert all(f["x"].shape == (1, 3, h, w) and f["x"].dtype == np.float32 for f in feeds)
    x = np.concatenate([f["x"] for f in feeds])
    if name == "ppocr-det":  # ImageNet mean/std over [0, 1]
        low = (0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        high = (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        assert (x.min(axis=(0, 2, 3)) >= low - 1e-5).all() and (x.max(axis=(0, 2, 3)) <= high + 1e-5).all()
    else:  # [-1, 1]
        assert x.min() >= -1.0 and x.max() <= 1.0
    # light paper with dark ink on it: both ends of the range are used
    gray = x.mean(axis=1)
    assert np.median(gray) > gray.min() + 0.5 * (gray.max() - gray.min())
    assert (gray < np.median(gray) - 1.0).mean() > 0.005


@pytest.mark.parametrize("name", sorted(SIZES))
def test_feeds_are_deterministic_and_seeds_differ(name):
    five, again = ocr_feeds(name, 5, seed=7), ocr_feeds(name, 5, seed=7)
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(five, again))
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(five, ocr_feeds(name, 2, seed=7)))
    assert not np.array_equal(five[0]["x"], ocr_feeds(name, 1, seed=8)[0]["x"])
    assert not np.array_equal(five[0]["x"], five[1]["x"])


def test_sizes_keep_the_models_layout():
    assert ocr_feeds("ppocr-det", 1, size=(96, 128))[0]["x"].shape == (1, 3, 96, 128)
    assert ocr_feeds("ppocr-rec", 1, size=(48, 256))[0]["x"].shape == (1, 3, 48, 256)
    with pytest.raises(ValueError, match="multiples of 32"):
        ocr_feeds("ppocr-det", 1, size=(100, 128))
    with pytest.raises(ValueError, match="48 pixels high"):
        ocr_feeds("ppocr-cls", 1, size=(32, 192))
    with pytest.raises(KeyError, match="unknown PP-OCR model"):
        ocr_feeds("ppocr-table", 1)


def test_task_measures():
    assert cls_labels(5).tolist() == [0, 1, 0, 1, 0]
    scores = np.zeros((2, 6, 4), np.float32)
    for t, k in enumerate([0, 2, 2, 0, 2, 3]):
        scores[0, t, k] = 1.0
    scores[1, :, 0] = 1.0
    assert ctc_decode(scores) == [(2, 2, 3), ()]
    a = np.array([[0.9, 0.9, 0.1, 0.0]])
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, np.array([[0.9, 0.1, 0.9, 0.0]])) == pytest.approx(1 / 3)
    assert mask_iou(np.zeros(4), np.zeros(4)) == 1.0


def test_real_models_see_text_in_the_inputs():
    """The classifier tells the turned lines from the upright ones, and the detector's
    text mask covers part of each page, not none of it and not all of it."""
    cls = make_session(real_model("ppocr-cls"))
    x = np.concatenate([f["x"] for f in ocr_feeds("ppocr-cls", 16, seed=3)])
    assert (cls.run(None, {"x": x})[0].argmax(1) == cls_labels(16)).mean() >= 0.9
    det = make_session(real_model("ppocr-det"))
    for feeds in ocr_feeds("ppocr-det", 2, seed=3):
        text = det.run(None, feeds)[0] > 0.3
        assert 0.02 < text.mean() < 0.5


def test_digits_are_built_once_per_process_and_shared_read_only():
    first, again = digits.digits_split(), digits.digits_split()
    assert all(a is b for a, b in zip(first, again))
    with pytest.raises(ValueError, match="read-only"):
        first[1][0, 0] = 1.0
    digits.digits_mlp()
    trained = digits.train_mlp.cache_info().misses
    digits.digits_mlp()
    assert digits.train_mlp.cache_info().misses == trained
