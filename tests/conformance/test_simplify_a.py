"""The three conformance suites under the lossless simplification passes of part A:
``[dead-nodes,fold-constants,eliminate-noops,fuse]`` keeps every model that onnxruntime
runs running, with the same outputs and the same graph inputs and outputs, and a second
run changes nothing."""

from __future__ import annotations

import onnx
import pytest

from models.fetch import light_models
from onnxopt import Model
from onnxopt.data import random_feeds
from tests.conformance.conformance import check_pipeline_on
from tests.conformance.test_node_cases import CASES, _feed
from tests.conformance.test_real_models import PPOCR_SHAPES
from tests.helpers import REAL_MODEL_NAMES, real_model

PIPELINE = "[dead-nodes,fold-constants,eliminate-noops,fuse]"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_node_case(case):
    if not case.data_sets:
        pytest.skip("the case ships no data")
    inputs, _expected = case.data_sets[0]
    graph_inputs = [i.name for i in case.model.graph.input
                    if i.name not in {t.name for t in case.model.graph.initializer}]
    feeds = {name: _feed(value) for name, value in zip(graph_inputs, inputs)}
    check_pipeline_on(case.model, feeds, pipeline=PIPELINE, rtol=max(case.rtol, 1e-4),
                      atol=max(case.atol, 1e-5))


@pytest.mark.parametrize("path", light_models(), ids=lambda p: p.stem)
def test_light_architecture(path):
    proto = onnx.load(path)
    feeds, _ = random_feeds(Model.from_proto(proto), seed=0)
    check_pipeline_on(proto, feeds, pipeline=PIPELINE, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", REAL_MODEL_NAMES)
def test_ppocr_model(name):
    proto = onnx.load(real_model(name))
    feeds, _ = random_feeds(Model.from_proto(proto), {"x": PPOCR_SHAPES[name]}, seed=0)
    check_pipeline_on(proto, feeds, pipeline=PIPELINE, rtol=1e-3, atol=1e-4)
