"""Inputs for the PP-OCR models (det, rec, cls) and the task measures that judge their
outputs. Printed words, digits and punctuation are rendered with Pillow's bundled
TrueType font on unevenly lit, noisy paper, deterministically for a seed, and
preprocessed as PP-OCR preprocesses its inputs; nothing is downloaded.

Pillow's printed text is what these models were trained to read, so the recognizer
reads the rendered words back, the direction classifier tells upright lines from turned
ones and the detector's text mask lies on the text — which upscaled 8x8 handwritten
digit scans (scikit-learn's ``load_digits``) did not give them as well.

Every test and benchmark takes its PP-OCR inputs from :func:`ocr_feeds`:

    from models.ocr import ocr_feeds
    feeds = ocr_feeds("ppocr-det", 8, seed=0)   # 8 x {"x": float32 [1, 3, 320, 320]}

Sizes (:data:`SIZES`, height x width) keep each model's own layout: the detector takes
pages of 320 x 320 (any multiple of 32 may be asked for), the recognizer lines of
48 x 320 (height 48, any width), the classifier lines of 48 x 192 (height 48). The
recognizer's 320 is PP-OCR's usual line width; 320 x 320 pages hold several lines of
text and keep a detector run short enough for calibration in tests.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["SIZES", "ocr_feeds", "cls_labels", "ctc_decode", "mask_iou"]

#: Default (height, width) of each model's input.
SIZES = {"ppocr-det": (320, 320), "ppocr-rec": (48, 320), "ppocr-cls": (48, 192)}

_WORDS = (
    "the of and to in is for on that by with from at as this are be or an was which have not your "
    "price total date invoice number order street road city phone email page table model data value "
    "report name address amount tax paid due account bank card receipt store open close monday friday "
    "january march october 2023 2024 12:45 09/11 #4521 $19.99 15% no. item qty unit kg km ml net gross "
    "OCR onnx runtime quantize compiler graph layer network deep learning vision text image line detect "
    "Hello World Summary Notes Contact Service Delivery Customer Product Station Exit Entrance Warning"
).split()

_DET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # ImageNet, as PP-OCR det normalizes
_DET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@functools.lru_cache(maxsize=64)
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _paper(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A light RGB background [h, w, 3] in 0..255: a tint, a lighting gradient, noise."""
    base = rng.uniform(170, 250, size=3)
    gy = np.linspace(0, rng.uniform(-25, 25), h)[:, None, None]
    gx = np.linspace(0, rng.uniform(-25, 25), w)[None, :, None]
    noise = rng.normal(0, rng.uniform(2, 9), size=(h, w, 1))
    return np.clip(base[None, None, :] + gy + gx + noise, 0, 255)


def _phrase(rng: np.random.Generator, words: int) -> str:
    return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=words))


def _line(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One text line filling an ``h x w`` crop, RGB float [h, w, 3] in 0..255."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(_paper(rng, h, w).astype(np.uint8))
    size = int(rng.integers(int(h * 0.45), int(h * 0.75)))
    ink = tuple(int(v) for v in rng.uniform(0, 90, size=3))
    text = _phrase(rng, int(rng.integers(2, 6)))
    origin = (int(rng.integers(2, 12)), int((h - size) / 2 - rng.integers(0, 4)))
    ImageDraw.Draw(img).text(origin, text, font=_font(size), fill=ink)
    return np.asarray(img, dtype=np.float32)


def _page(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A page of text lines at random sizes and indents, RGB float [h, w, 3] in 0..255."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(_paper(rng, h, w).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(4, 20))
    while y < h - 16:
        size = int(rng.integers(12, 30))
        ink = tuple(int(v) for v in rng.uniform(0, 110, size=3))
        draw.text((int(rng.integers(4, w // 3)), y), _phrase(rng, int(rng.integers(1, 5))), font=_font(size),
                  fill=ink)
        y += size + int(rng.integers(4, 30))
    return np.asarray(img, dtype=np.float32)


def _size(name: str, size: tuple[int, int] | None) -> tuple[int, int]:
    if name not in SIZES:
        raise KeyError(f"unknown PP-OCR model {name!r}; known: {', '.join(SIZES)}")
    h, w = (int(v) for v in (size or SIZES[name]))
    if name == "ppocr-det" and (h % 32 or w % 32 or h <= 0 or w <= 0):
        raise ValueError(f"ppocr-det takes pages whose height and width are multiples of 32, not {h} x {w}")
    if name != "ppocr-det" and (h != 48 or w <= 0):
        raise ValueError(f"{name} takes lines 48 pixels high, not {h} x {w}")
    return h, w


def ocr_feeds(name: str, n: int = 1, *, seed: int = 0,
              size: tuple[int, int] | None = None) -> list[dict[str, np.ndarray]]:
    """``n`` feed dicts ``{"x": float32 [1, 3, H, W]}`` for the PP-OCR model ``name``
    (``ppocr-det``, ``ppocr-rec`` or ``ppocr-cls``) at ``size`` (height, width; default
    :data:`SIZES`). The detector gets pages normalized with ImageNet's mean and std; the
    recognizer and the classifier get single lines scaled to [-1, 1]; for the classifier
    every odd-numbered line is turned 180 degrees (:func:`cls_labels`). The same
    arguments give the same arrays; different seeds give different text."""
    h, w = _size(name, size)
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        if name == "ppocr-det":
            images.append((_page(rng, h, w) / 255.0 - _DET_MEAN) / _DET_STD)
            continue
        line = _line(rng, h, w)
        if name == "ppocr-cls" and i % 2 == 1:
            line = line[::-1, ::-1]
        images.append(line / 127.5 - 1.0)
    x = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2), dtype=np.float32)
    return [{"x": x[i:i + 1]} for i in range(n)]


def cls_labels(n: int) -> np.ndarray:
    """The direction class of the first ``n`` ``ppocr-cls`` samples of :func:`ocr_feeds`
    (any seed): 0 upright, 1 turned 180 degrees."""
    return np.arange(n, dtype=np.int64) % 2


def ctc_decode(probs: np.ndarray) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of recognizer scores [N, T, classes] (blank = 0): one label
    sequence per line, repeats merged and blanks dropped."""
    out = []
    for row in np.asarray(probs).argmax(-1):
        seq, prev = [], -1
        for k in row:
            if k != prev and k != 0:
                seq.append(int(k))
            prev = k
        out.append(tuple(seq))
    return out


def mask_iou(a: np.ndarray, b: np.ndarray, threshold: float = 0.3) -> float:
    """IoU of the text masks (probability > ``threshold``, DB post-processing's 0.3) of
    two detector outputs; 1.0 when neither finds text."""
    ma, mb = np.asarray(a) > threshold, np.asarray(b) > threshold
    union = np.logical_or(ma, mb).sum()
    return 1.0 if union == 0 else float(np.logical_and(ma, mb).sum() / union)
