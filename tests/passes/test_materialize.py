"""materialize: fires on every compact storage (outputs bit-identical, plain weights under
their own names), does not fire on plain models, idempotent, IR < 4, subgraphs, real
models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from models import builders
from models.ocr import ocr_feeds
from onnxopt import Model
from tests.conformance.conformance import check_pipeline_on
from tests.helpers import REAL_MODEL_NAMES, io_signature, parse, real_model, run_pass
from tests.passes.compress_helpers import (
    assert_identical,
    assert_identical_outputs,
    decoder_nodes,
    storages,
    two_layer_mlp,
    values,
    weights,
)

RNG = np.random.default_rng(2)
W0 = RNG.standard_normal((32, 24)).astype(np.float32)
W1 = RNG.standard_normal((24, 16)).astype(np.float32)


def mlp(ir: int = 8) -> Model:
    return two_layer_mlp(W0, W1, ir=ir, opset=13)


def feeds() -> dict:
    return {"x": np.random.default_rng(4).standard_normal((3, 32)).astype(np.float32)}


@pytest.mark.parametrize("pipeline", [
    {"prune-magnitude": {"sparsity": 0.8}},
    {"share-weights": {"bits": 4}},
    {"prune-magnitude": {"sparsity": 0.6}, "share-weights": {"bits": 3}},
])
def test_expands_every_storage_back_to_plain_weights_with_identical_outputs(pipeline):
    model = mlp()
    for name, options in pipeline.items():
        model = run_pass(name, model, min_size=0, **options).model
    compressed = weights(model)
    ran = run_pass("materialize", model)
    assert ran.modified and ran.stats["layers_materialized"] == 2
    assert storages(ran.model) == {"w0": "dense", "w1": "dense"} and decoder_nodes(ran.model) == 0
    proto = ran.model.to_proto()
    assert {i.name for i in proto.graph.initializer} == {"w0", "w1"}
    assert [n.op_type for n in proto.graph.node] == ["MatMul", "Relu", "MatMul"]
    assert all(np.array_equal(weights(ran.model)[k], v) for k, v in compressed.items())
    assert ran.stats["tensor_bytes_after"] == (W0.size + W1.size) * 4
    assert_identical_outputs(model, ran.model, feeds())
    assert io_signature(ran.model) == io_signature(model)


def test_does_not_fire_on_plain_models_and_is_idempotent():
    for proto in (builders.cnn(), builders.control_flow()):
        model = Model.from_proto(proto)
        ran = run_pass("materialize", model)
        assert not ran.modified and ran.model.to_bytes() == model.to_bytes()
    once = run_pass("materialize", run_pass("share-weights", mlp(), min_size=0).model)
    twice = run_pass("materialize", once.model)
    assert once.modified and not twice.modified and twice.model.to_bytes() == once.model.to_bytes()


def test_ir3_models_get_constant_nodes_not_overridable_initializers():
    model = parse(f"""
        <ir_version: 3, opset_import: ["" : 11]>
        g (float[N, 32] x) => (float[N, 24] y)
        {{ w = Constant <value = float[32, 24] {values(W0)}> ()  y = MatMul(x, w) }}
    """)
    shared = run_pass("share-weights", model, bits=4, min_size=0).model
    ran = run_pass("materialize", shared)
    proto = ran.model.to_proto()
    assert not proto.graph.initializer
    assert [n.op_type for n in proto.graph.node] == ["Constant", "MatMul"]
    onnx.checker.check_model(proto, full_check=True)
    assert_identical_outputs(shared, ran.model, feeds())


def test_materializes_inside_subgraphs():
    w = RNG.standard_normal((32, 32)).astype(np.float32)
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (bool c, float[N, 32] x) => (float[N, 32] y)
        <float[32, 32] outer = {values(w)}>
        {{
            y = If(c) <
                then_branch = t () => (float[N, 32] a) <float[32, 32] inner = {values(w * 2)}>
                    {{ m = MatMul(x, inner)  a = MatMul(m, outer) }},
                else_branch = e () => (float[N, 32] b) {{ b = Neg(x) }}
            >
        }}
    """)
    shared = run_pass("share-weights", model, bits=3, min_size=0).model
    ran = run_pass("materialize", shared)
    assert ran.stats["layers_materialized"] == 2 and decoder_nodes(ran.model) == 0
    x = RNG.standard_normal((2, 32)).astype(np.float32)
    for c in (True, False):
        assert_identical_outputs(shared, ran.model, {"c": np.array(c), "x": x})


@pytest.mark.parametrize("name", REAL_MODEL_NAMES)
def test_real_models_materialize_exactly(name):
    """On compressed real models (the plain ones give materialize nothing to do): the
    conformance contract, and outputs bit-identical to the compressed model's."""
    model = Model.load(real_model(name))
    small = run_pass("prune-magnitude", model, sparsity=0.3).model
    small = run_pass("share-weights", small, bits=6).model
    checked = check_pipeline_on(small.to_proto(), ocr_feeds(name)[0], pipeline="materialize")
    assert checked["result"].modified and decoder_nodes(checked["model"]) == 0
    assert io_signature(checked["model"]) == io_signature(model)
    assert_identical(checked["reference"], checked["outputs"])
