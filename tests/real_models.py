"""The real models the tests run on (fetched once into the model cache by `make models`):
their paths, the PP-OCR names and the silero-vad feeds. A test on a model that is not
fetched is skipped, saying how to fetch it.

Import them as ``from tests.real_models import REAL_MODEL_NAMES, real_model``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

#: The PP-OCR models (detection, recognition, direction classifier).
REAL_MODEL_NAMES = ["ppocr-det", "ppocr-rec", "ppocr-cls"]


def real_model(name: str) -> Path:
    """Path of a cached real model, or skip (saying how to fetch it)."""
    from models.fetch import cached

    path = cached(name)
    if path is None:
        pytest.skip(f"{name} not fetched (no package registry?); run `make models`")
    return path


def silero_feeds(rate: int = 16000, batch: int = 1, seed: int = 0) -> dict:
    """Feeds for the silero-vad model: one audio chunk (512 samples at 16 kHz, 256 at
    8 kHz — the sample rate picks the If branches), a zero LSTM state and the rate."""
    rng = np.random.default_rng(seed)
    samples = 512 if rate == 16000 else 256
    return {"input": (0.1 * rng.standard_normal((batch, samples))).astype(np.float32),
            "state": np.zeros((2, batch, 128), np.float32), "sr": np.array(rate, np.int64)}
