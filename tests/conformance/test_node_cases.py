"""Conformance suite (a): every operator test case shipped in the onnx package that
onnxruntime can run still runs after the pipeline and gives the same outputs."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from tests.conformance.conformance import PIPELINES, check_pipeline_on


def _cases():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            from onnx.backend.test.case.node import collect_testcases

            return collect_testcases(None)


CASES = _cases()


def _feed(value):
    """The case's input as onnxruntime takes it (arrays; lists of arrays for sequences)."""
    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    if isinstance(value, (list, tuple)):
        return [_feed(v) for v in value]
    if value is None:
        return None
    return np.asarray(value)


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_node_case(case, pipeline):
    if not case.data_sets:
        pytest.skip("the case ships no data")
    inputs, _expected = case.data_sets[0]
    graph_inputs = [i.name for i in case.model.graph.input
                    if i.name not in {t.name for t in case.model.graph.initializer}]
    feeds = {name: _feed(value) for name, value in zip(graph_inputs, inputs)}
    check_pipeline_on(case.model, feeds, pipeline=pipeline, rtol=max(case.rtol, 1e-4), atol=max(case.atol, 1e-5))
