"""Passes that follow passes that changed nothing share one shape inference; a change,
a second question within a pass, or the end of the run makes it compute again."""

from __future__ import annotations

import pytest

import onnxopt.shapes
from onnxopt import PassManager, framework
from onnxopt.framework import Pass, PassResult
from onnxopt.shapes import infer_shapes
from tests.helpers import parse

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[?, ?] y)
{ r = Relu(x)  y = Sigmoid(r) }
"""

seen: list[tuple] = []


class _Asks(Pass):
    name = "test-asks"
    summary = "asks for shapes, changes nothing"

    def run(self, model, ctx):
        seen.append(("asks", infer_shapes(model)["y"].shape))
        return PassResult(False)


class _Widens(Pass):
    name = "test-widens"
    summary = "asks, widens the input, asks again"

    def run(self, model, ctx):
        seen.append(("widens before", infer_shapes(model)["y"].shape))
        model.graph.inputs[0].shape = [2, model.graph.inputs[0].shape[1] + 1]
        seen.append(("widens after", infer_shapes(model)["y"].shape))
        return PassResult(True)


@pytest.fixture()
def counted(monkeypatch):
    calls = []
    real = onnxopt.shapes.shape_inference.infer_shapes

    def infer(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxopt.shapes.shape_inference, "infer_shapes", infer)
    for cls in (_Asks, _Widens):
        framework.register(cls)
    seen.clear()
    yield calls
    for cls in (_Asks, _Widens):
        framework._PASSES.pop(cls.name, None)


def test_passes_after_unchanging_passes_share_one_inference(counted):
    model = parse(MODEL)
    PassManager("test-asks,test-asks,test-asks").run(model)
    assert len(counted) == 1
    assert seen == [("asks", (2, 3))] * 3


def test_a_change_and_a_second_question_compute_again(counted):
    model = parse(MODEL)
    PassManager("test-asks,test-widens,test-asks").run(model)
    # asks: computes; widens: its first question is answered, its second (after the change)
    # computes; the pass after the change computes
    assert len(counted) == 3
    assert seen == [("asks", (2, 3)), ("widens before", (2, 3)), ("widens after", (2, 4)), ("asks", (2, 4))]


def test_nothing_is_shared_outside_a_run(counted):
    model = parse(MODEL)
    PassManager("test-asks").run(model)
    assert not {"_state", "_asked", "_analyses"} & set(vars(model))
    infer_shapes(model)
    infer_shapes(model)
    assert len(counted) == 3
