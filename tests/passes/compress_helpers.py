"""Helpers for the compression tests: weights written into ONNX text, a two-layer model
with given weights, weight values read back, onnxruntime's optimized graph, and
bit-identical outputs (models with given dense weights: ``tests.helpers.with_weights``)."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt import Model
from onnxopt.weights.sites import find_weights
from tests.helpers import parse


def values(arr: np.ndarray) -> str:
    """An array as the ``{...}`` value list of an ONNX-text initializer (exact float32)."""
    return "{" + ", ".join(repr(float(v)) for v in np.asarray(arr).ravel()) + "}"


def two_layer_mlp(w0: np.ndarray, w1: np.ndarray, *, bias: np.ndarray | None = None, ir: int = 8,
                  opset: int = 17) -> Model:
    """``y = MatMul(Relu(MatMul(x, w0) [+ bias]), w1)`` with the given weights (initializers
    ``w0``, ``b0``, ``w1``), IR version and opset."""
    n_in, hidden = w0.shape
    n_out = w1.shape[1]
    b0 = "" if bias is None else f", float[{hidden}] b0 = {values(bias)}"
    body = "h = MatMul(x, w0)  r = Relu(h)" if bias is None else "h = MatMul(x, w0)  a = Add(h, b0)  r = Relu(a)"
    return parse(f"""
        <ir_version: {ir}, opset_import: ["" : {opset}]>
        g (float[N, {n_in}] x) => (float[N, {n_out}] y)
        <float[{n_in}, {hidden}] w0 = {values(w0)}{b0}, float[{hidden}, {n_out}] w1 = {values(w1)}>
        {{ {body}  y = MatMul(r, w1) }}
    """)


def weights(model: Model) -> dict[str, np.ndarray]:
    """Name -> value of every weight operand of Conv/ConvTranspose/Gemm/MatMul."""
    sites, _ = find_weights(model)
    return {s.name: s.value for s in sites}


def storages(model: Model) -> dict[str, str]:
    sites, _ = find_weights(model)
    return {s.name: s.storage for s in sites}


def optimized_ops(model: Model | bytes, level: str = "basic") -> list[str]:
    """Op types left in the graph onnxruntime runs after its optimizations."""
    data = model.to_bytes() if isinstance(model, Model) else model
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "opt.onnx")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                         "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
        opts.optimized_model_filepath = path
        ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        proto = onnx.load(path)
    ops = []

    def walk(g):
        for n in g.node:
            ops.append(n.op_type)
            for a in n.attribute:
                if a.HasField("g"):
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)

    walk(proto.graph)
    return ops


def decoder_nodes(model: Model) -> int:
    """Nodes that expand weights (in some weight's decoder cone; Constant nodes aside)."""
    sites, _ = find_weights(model)
    return len({id(n) for s in sites for n in s.cone if n.op != "Constant"})


def run(model: Model, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.to_bytes(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_identical_outputs(a: Model, b: Model, feeds: dict) -> None:
    """Both models give bit-identical outputs on onnxruntime."""
    assert_identical(run(a, feeds), run(b, feeds))


def assert_identical(xs: list[np.ndarray], ys: list[np.ndarray]) -> None:
    """The arrays are bit-identical, pair by pair (shape, dtype and bytes)."""
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), f"max diff {np.abs(x - y).max()}"
