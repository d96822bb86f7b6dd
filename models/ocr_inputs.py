"""Realistic inputs for the PP-OCR models, with no image files: lines of real handwritten
digits (scikit-learn's ``load_digits``, dark ink on white paper, upscaled), preprocessed
the way PP-OCR preprocesses its inputs.

Random noise is a poor input for an OCR model: the detector sees no text (its map is
all zeros, so a cosine is meaningless) and the recognizer sees no characters. These
images give the models something to detect, classify and read, so that fidelity is
measured where it matters.

    from models.ocr_inputs import ocr_feeds
    feeds = ocr_feeds("ppocr-det")   # {"x": float32 [1, 3, 160, 320]}
"""

from __future__ import annotations

import numpy as np

__all__ = ["digit_line", "digit_page", "ocr_feeds", "SHAPES"]

#: Input shape used for each model (height and width as PP-OCR expects them).
SHAPES = {"ppocr-det": (1, 3, 160, 320), "ppocr-rec": (1, 3, 48, 320), "ppocr-cls": (1, 3, 48, 192)}


def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target


def digit_line(count: int = 8, scale: int = 5, seed: int = 0) -> np.ndarray:
    """A grey uint8 image [8*scale + 8, width] of ``count`` handwritten digits in a row."""
    images, _ = _digits()
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(images), count, replace=False)
    glyphs = [np.kron(images[i], np.ones((scale, scale))) for i in picks]  # 0..16 ink
    gap = np.zeros((8 * scale, scale))
    row = np.concatenate([g for glyph in glyphs for g in (glyph, gap)], axis=1)
    ink = np.pad(row, ((4, 4), (scale, scale)))
    return (255 - ink * (255 / 16)).astype(np.uint8)


def digit_page(height: int, width: int, lines: int = 3, seed: int = 0) -> np.ndarray:
    """A grey uint8 page ``height`` x ``width`` holding ``lines`` lines of digits."""
    page = np.full((height, width), 255, np.uint8)
    y = 8
    for i in range(lines):
        line = digit_line(count=6 + 2 * i, scale=4, seed=seed + i)
        h, w = line.shape
        if y + h > height:
            break
        x = 8 + 12 * i
        w = min(w, width - x)
        page[y:y + h, x:x + w] = line[:, :w]
        y += h + 10
    return page


def _fit(gray: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize to ``height`` keeping the aspect ratio, padded white (or
    cut) to ``width``."""
    h, w = gray.shape
    new_w = max(1, min(width, round(w * height / h)))
    rows = (np.arange(height) * h / height).astype(int)
    cols = (np.arange(new_w) * w / new_w).astype(int)
    out = np.full((height, width), 255, np.uint8)
    out[:, :new_w] = gray[rows][:, cols]
    return out


def ocr_feeds(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """The feed dict of a PP-OCR model (``ppocr-det``, ``ppocr-rec``, ``ppocr-cls``)."""
    _, _, height, width = SHAPES[name]
    if name == "ppocr-det":
        gray = digit_page(height, width, seed=seed)
        rgb = np.repeat(gray[None].astype(np.float32) / 255.0, 3, axis=0)
        mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
        std = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
        x = (rgb - mean) / std
    else:
        gray = _fit(digit_line(count=8 if name == "ppocr-rec" else 5, seed=seed), height, width)
        x = np.repeat((gray[None].astype(np.float32) / 255.0 - 0.5) / 0.5, 3, axis=0)
    return {"x": x[None].astype(np.float32)}
