"""Shape inference that ignores declarations; activation capture on onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

from models import builders
from onnxopt import Model
from onnxopt.activations import capture
from onnxopt.errors import UsageError
from onnxopt.shapes import infer_shapes, static_shape
from tests.helpers import parse


def test_inference_ignores_a_wrong_declared_shape():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2, 3] x) => (float[7, 7] y)
        <int64[1] flat = {6}>
        { y = Reshape(x, flat) }
    """)
    info = infer_shapes(model)
    assert static_shape(info["y"]) == (6,)


def test_inference_propagates_shape_computations_and_keeps_dynamic_dims():
    model = parse("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[N, 3, 4] x) => (float[N, 12] y)
        <int64[1] zero = {0}, int64[1] twelve = {12}>
        {
            s = Shape(x)
            n = Gather <axis: int = 0> (s, zero)
            shape = Concat <axis: int = 0> (n, twelve)
            y = Reshape(x, shape)
        }
    """)
    info = infer_shapes(model)
    assert info["y"].shape == ("N", 12)


def test_capture_gives_intermediate_tensors_per_sample():
    model = Model.from_proto(builders.mlp())
    relus = [n.outputs[0].name for n in model.graph.nodes if n.op == "Relu"]
    feeds = [{"input": np.full((1, 64), v, np.float32)} for v in (0.0, 1.0, -1.0)]
    got = list(capture(model, relus, feeds, include_outputs=True))
    assert len(got) == 3 and set(got[0]) == set(relus) | {"logits"}
    assert got[1][relus[0]].shape == (1, 128) and (got[1][relus[0]] >= 0).all()


def test_capture_of_an_unknown_tensor_is_an_error():
    with pytest.raises(UsageError, match="cannot capture"):
        list(capture(Model.from_proto(builders.mlp()), ["nope"], []))
