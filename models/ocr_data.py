"""Real-looking inputs for the PP-OCR models: text rendered with Pillow (its bundled
TrueType font) on paper-like backgrounds, deterministic for a seed, preprocessed exactly
as PP-OCR expects. No data set is downloaded.

* :func:`det_images` — pages with several text lines, ImageNet-normalized, NCHW;
* :func:`rec_images` — single text lines, 48 pixels high, normalized to [-1, 1];
* :func:`cls_images` — text lines for the direction classifier, half of them turned
  180°, with their labels (0 upright, 1 turned): a labelled task;
* :func:`ocr_feeds` — calibration/evaluation feed dicts for a PP-OCR model by name;
* :func:`ctc_decode` and :func:`mask_iou` — task-level fidelity for rec and det.
"""

from __future__ import annotations

import numpy as np

__all__ = ["WORDS", "det_images", "rec_images", "cls_images", "ocr_feeds", "ctc_decode", "mask_iou",
           "OCR_SHAPES"]

WORDS = (
    "the of and to in is for on that by with from at as this are be or an was which have not your "
    "price total date invoice number order street road city phone email page table model data value "
    "report name address amount tax paid due account bank card receipt store open close monday friday "
    "january march october 2023 2024 12:45 09/11 #4521 $19.99 15% no. item qty unit kg km ml net gross "
    "OCR onnx runtime quantize compiler graph layer network deep learning vision text image line detect "
    "Hello World Summary Notes Contact Service Delivery Customer Product Station Exit Entrance Warning"
).split()

#: Input shapes used for PP-OCR calibration and evaluation (N, C, H, W).
OCR_SHAPES = {"ppocr-det": (1, 3, 320, 320), "ppocr-rec": (1, 3, 48, 320), "ppocr-cls": (1, 3, 48, 192)}


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.uniform(170, 250, size=3)
    gy = np.linspace(0, rng.uniform(-25, 25), h)[:, None, None]
    gx = np.linspace(0, rng.uniform(-25, 25), w)[None, :, None]
    noise = rng.normal(0, rng.uniform(2, 9), size=(h, w, 1))
    return np.clip(base[None, None, :] + gy + gx + noise, 0, 255)


def _phrase(rng: np.random.Generator, words: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=words))


def _render_line(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.fromarray(_background(rng, h, w).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    size = int(rng.integers(int(h * 0.45), int(h * 0.75)))
    ink = tuple(int(v) for v in rng.uniform(0, 90, size=3))
    text = _phrase(rng, int(rng.integers(2, 6)))
    draw.text((int(rng.integers(2, 12)), int((h - size) / 2 - rng.integers(0, 4))), text, font=_font(size), fill=ink)
    return np.asarray(img, dtype=np.float32)


def _render_page(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.fromarray(_background(rng, h, w).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(4, 20))
    while y < h - 16:
        size = int(rng.integers(12, 30))
        ink = tuple(int(v) for v in rng.uniform(0, 110, size=3))
        draw.text((int(rng.integers(4, w // 3)), y), _phrase(rng, int(rng.integers(1, 5))), font=_font(size), fill=ink)
        y += size + int(rng.integers(4, 30))
    return np.asarray(img, dtype=np.float32)


def det_images(n: int, shape: tuple[int, int] = (320, 320), seed: int = 0) -> np.ndarray:
    """``n`` pages, float32 [n, 3, H, W], normalized with ImageNet mean/std (PP-OCR det)."""
    rng = np.random.default_rng(seed)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    out = np.stack([(_render_page(rng, *shape) / 255.0 - mean) / std for _ in range(n)])
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2), dtype=np.float32)


def rec_images(n: int, width: int = 320, height: int = 48, seed: int = 0) -> np.ndarray:
    """``n`` text lines, float32 [n, 3, height, width], normalized to [-1, 1] (PP-OCR rec)."""
    rng = np.random.default_rng(seed)
    out = np.stack([_render_line(rng, height, width) / 127.5 - 1.0 for _ in range(n)])
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2), dtype=np.float32)


def cls_images(n: int, width: int = 192, height: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` text lines for the direction classifier and their labels (1: turned 180°)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        line = _render_line(rng, height, width)
        turned = i % 2 == 1
        if turned:
            line = line[::-1, ::-1]
        images.append(line / 127.5 - 1.0)
        labels.append(int(turned))
    out = np.stack(images).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out, dtype=np.float32), np.array(labels, np.int64)


def ocr_feeds(name: str, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` single-image feed dicts (input ``x``) for the PP-OCR model ``name``."""
    _, _, h, w = OCR_SHAPES[name]
    if name == "ppocr-det":
        x = det_images(n, (h, w), seed)
    elif name == "ppocr-rec":
        x = rec_images(n, w, h, seed)
    elif name == "ppocr-cls":
        x = cls_images(n, w, h, seed)[0]
    else:
        raise KeyError(f"unknown PP-OCR model {name!r}")
    return [{"x": x[i:i + 1]} for i in range(n)]


def ctc_decode(probs: np.ndarray) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of [N, T, classes] scores (blank = 0): label sequences."""
    best = np.asarray(probs).argmax(-1)
    out = []
    for row in best:
        seq, prev = [], -1
        for k in row:
            if k != prev and k != 0:
                seq.append(int(k))
            prev = k
        out.append(tuple(seq))
    return out


def mask_iou(a: np.ndarray, b: np.ndarray, threshold: float = 0.3) -> float:
    """IoU of the text masks (probability > threshold) of two detector outputs."""
    ma, mb = np.asarray(a) > threshold, np.asarray(b) > threshold
    union = np.logical_or(ma, mb).sum()
    return 1.0 if union == 0 else float(np.logical_and(ma, mb).sum() / union)
