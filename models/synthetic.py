"""Text-like images for the PP-OCR models, synthesized with numpy (no dataset download).

The glyphs are real handwriting: scikit-learn's ``load_digits`` (8x8 scans of digits
written by 43 people), scaled up and laid out in lines of dark "ink" on a light, unevenly
lit, slightly noisy "paper", with a few coloured boxes and rules, the way a document photo
looks to a detector. Rows of glyphs become text-line crops for the recognizer and the
direction classifier (some rotated by 180 degrees, which is what the classifier detects).

Each function returns model inputs, already normalized as PP-OCR's own pre-processing
does (ImageNet mean/std for the detector; ``(x / 255 - 0.5) / 0.5`` for rec and cls):

    from models.synthetic import det_inputs, rec_inputs, cls_inputs
    x = det_inputs(8, 320, 320, seed=0)      # float32 [8, 3, 320, 320]
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["glyphs", "page", "text_line", "det_inputs", "rec_inputs", "cls_inputs", "calibration"]

_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


@functools.lru_cache(maxsize=1)
def glyphs() -> np.ndarray:
    """The 1,797 digit scans as ink density in [0, 1], shape [n, 8, 8]."""
    from sklearn.datasets import load_digits

    return (load_digits().images / 16.0).astype(np.float32)


def _paper(rng, h: int, w: int) -> np.ndarray:
    """A light background in RGB [3, h, w], 0..255, lit unevenly."""
    base = rng.uniform(170, 250, size=(3, 1, 1)).astype(np.float32)
    gy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    gx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    light = 1.0 + 0.08 * (rng.uniform(-1, 1) * gy + rng.uniform(-1, 1) * gx)
    img = base * light[None]
    img += rng.normal(0, 4, size=(3, h, w)).astype(np.float32)
    return img


def _stamp(img: np.ndarray, glyph: np.ndarray, top: int, left: int, scale: int, ink: np.ndarray) -> None:
    g = np.kron(glyph, np.ones((scale, scale), np.float32))
    h, w = g.shape
    H, W = img.shape[1:]
    if top >= H or left >= W:
        return
    g = g[: H - top, : W - left]
    region = img[:, top:top + g.shape[0], left:left + g.shape[1]]
    img[:, top:top + g.shape[0], left:left + g.shape[1]] = region * (1 - g) + ink[:, None, None] * g


def text_line(rng, height: int, width: int, *, chars: int | None = None) -> np.ndarray:
    """One line of handwritten digits filling a ``height x width`` crop (RGB, 0..255)."""
    img = _paper(rng, height, width)
    g = glyphs()
    scale = max(1, int(height * rng.uniform(0.55, 0.8)) // 8)
    size = 8 * scale
    top = max(0, (height - size) // 2 + int(rng.integers(-2, 3)))
    ink = rng.uniform(0, 70, size=3).astype(np.float32)
    n = chars if chars is not None else int(rng.integers(3, max(4, width // size)))
    left = int(rng.integers(0, max(1, size // 2)))
    for _ in range(n):
        if left + size > width:
            break
        _stamp(img, g[rng.integers(len(g))], top, left, scale, ink)
        left += size + int(rng.integers(-scale, 2 * scale + 1))
    return np.clip(img, 0, 255)


def page(rng, height: int, width: int) -> np.ndarray:
    """A document-like image: several lines of digits at random sizes, a few boxes."""
    img = _paper(rng, height, width)
    g = glyphs()
    for _ in range(int(rng.integers(0, 3))):  # coloured boxes and rules
        y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
        y1, x1 = min(height, y0 + int(rng.integers(2, height // 4 + 3))), min(width, x0 + int(rng.integers(20, width)))
        img[:, y0:y1, x0:x1] = img[:, y0:y1, x0:x1] * 0.6 + rng.uniform(0, 255, size=(3, 1, 1)) * 0.4
    y = int(rng.integers(2, 12))
    while y < height - 8:
        scale = int(rng.integers(2, 5))
        size = 8 * scale
        if y + size > height:
            break
        ink = rng.uniform(0, 80, size=3).astype(np.float32)
        x = int(rng.integers(0, max(1, width // 3)))
        for _ in range(int(rng.integers(3, 16))):
            if x + size > width:
                break
            _stamp(img, g[rng.integers(len(g))], y, x, scale, ink)
            x += size + int(rng.integers(-scale, 2 * scale + 1))
        y += size + int(rng.integers(scale, 4 * scale + 1))
    return np.clip(img, 0, 255)


def det_inputs(n: int, height: int = 320, width: int = 320, *, seed: int = 0) -> np.ndarray:
    """``n`` pages normalized for the PP-OCR detector: float32 [n, 3, height, width]."""
    rng = np.random.default_rng(seed)
    out = np.stack([page(rng, height, width) for _ in range(n)])
    return ((out / 255.0 - _MEAN) / _STD).astype(np.float32)


def rec_inputs(n: int, height: int = 48, width: int = 320, *, seed: int = 0) -> np.ndarray:
    """``n`` text lines normalized for the PP-OCR recognizer: float32 [n, 3, 48, width]."""
    rng = np.random.default_rng(seed)
    out = np.stack([text_line(rng, height, width) for _ in range(n)])
    return ((out / 255.0 - 0.5) / 0.5).astype(np.float32)


def cls_inputs(n: int, height: int = 48, width: int = 192, *, seed: int = 0) -> np.ndarray:
    """``n`` text lines for the direction classifier, every other one turned upside
    down: float32 [n, 3, 48, width]."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        line = text_line(rng, height, width)
        lines.append(line[:, ::-1, ::-1] if i % 2 else line)
    out = np.stack(lines)
    return ((out / 255.0 - 0.5) / 0.5).astype(np.float32)


def calibration(name: str, n: int, *, seed: int = 0, size: tuple[int, int] | None = None) -> list[dict]:
    """Calibration feeds (one sample each, batch 1) for ``ppocr-det``/``-rec``/``-cls``."""
    if name == "ppocr-det":
        h, w = size or (320, 320)
        x = det_inputs(n, h, w, seed=seed)
    elif name == "ppocr-rec":
        h, w = size or (48, 320)
        x = rec_inputs(n, h, w, seed=seed)
    elif name == "ppocr-cls":
        h, w = size or (48, 192)
        x = cls_inputs(n, h, w, seed=seed)
    else:
        raise KeyError(f"no synthetic inputs for '{name}'")
    return [{"x": x[i:i + 1]} for i in range(n)]
