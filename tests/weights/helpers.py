"""Helpers for the tests of onnxopt.weights: a two-layer MatMul model with given weights,
and new weight values written into a copy of a model."""

from __future__ import annotations

import numpy as np
import onnx

from onnxopt import Model
from onnxopt.weights.sites import find_weights
from onnxopt.weights.writer import StorageWriter
from tests.passes.compress_helpers import two_layer_mlp


def mlp(w0: np.ndarray, w1: np.ndarray, opset: int = 17, ir: int = 8) -> Model:
    """x -> MatMul(w0) -> Add(b0) -> Relu -> MatMul(w1) -> y, opset and IR version as given."""
    return two_layer_mlp(w0, w1, bias=np.full(w0.shape[1], 0.1), ir=ir, opset=opset)


def write(model: Model, new: dict[str, np.ndarray]) -> Model:
    """A copy of ``model`` with the weights named in ``new`` written by StorageWriter
    (checked by onnx.checker)."""
    out = model.copy()
    sites, _ = find_weights(out)
    writer = StorageWriter(out)
    for s in sites:
        if s.name in new:
            writer.write(s, new[s.name])
    writer.commit()
    onnx.checker.check_model(out.to_proto(), full_check=True)
    return out
