"""PassManager: fixed points, figures per pass, verify-each with rollback."""

from __future__ import annotations

import pytest

from models import builders
from onnxopt import Model, PassManager, framework
from onnxopt.errors import PassFailed
from onnxopt.framework import Pass, PassContext, PassResult, register
from tests.helpers import assert_same_outputs


class _CountDown(Pass):
    """Reports a change for its first ``times`` runs (per instance)."""

    name = "test-countdown"
    summary = "reports modified a fixed number of times (tests only)"
    options = {"times": framework.Opt(int, 2, "how many runs report a change")}

    def run(self, model, ctx):
        self.__dict__.setdefault("left", self.opts.times)
        if self.left > 0:
            self.left -= 1
            return PassResult(True, {"left": self.left})
        return PassResult(False)


class _Breaker(Pass):
    """Claims to be exact but turns the first Add into a Sub."""

    name = "test-breaker"
    summary = "breaks the model on purpose (tests only)"
    options = {}

    def run(self, model, ctx):
        node = next(n for n in model.graph.nodes if n.op == "Add")
        node.op = "Sub"
        return PassResult(True)


class _FeedSpy(Pass):
    """Reports the names of the feeds its context carries (None when it has none)."""

    name = "test-feed-spy"
    summary = "reports the context's feeds (tests only)"
    options = {}

    def run(self, model, ctx):
        return PassResult(False, {"feeds": None if ctx.feeds is None else sorted(ctx.feeds)})


class _Raiser(Pass):
    name = "test-raiser"
    summary = "raises half-way (tests only)"
    options = {}

    def run(self, model, ctx):
        model.graph.nodes.pop()
        raise RuntimeError("boom")


@pytest.fixture(autouse=True)
def _test_passes():
    for cls in (_CountDown, _Breaker, _Raiser, _FeedSpy):
        register(cls)
    yield
    for cls in (_CountDown, _Breaker, _Raiser, _FeedSpy):
        framework._PASSES.pop(cls.name, None)


def test_group_runs_until_a_round_changes_nothing():
    model = Model.from_proto(builders.mlp())
    result = PassManager("[test-countdown(times=2),dead-nodes]").run(model)
    assert result.converged
    assert result.groups == [{"pipeline": "[test-countdown(times=2),dead-nodes]", "rounds": 3, "converged": True}]
    assert [r.round for r in result.records] == [1, 1, 2, 2, 3, 3]


def test_group_that_never_settles_is_reported_not_converged():
    model = Model.from_proto(builders.mlp())
    result = PassManager("[test-countdown(times=100)]", max_rounds=4).run(model)
    assert not result.converged
    assert result.groups[0]["rounds"] == 4


def test_records_carry_figures():
    model = Model.from_proto(builders.dead_branches())
    result = PassManager("dead-nodes").run(model)
    (rec,) = result.records
    assert rec.name == "dead-nodes" and rec.modified and rec.exact
    assert rec.nodes_before > rec.nodes_after
    assert rec.bytes_before > rec.bytes_after
    assert rec.seconds >= 0 and rec.stats["nodes_removed"] == rec.nodes_before - rec.nodes_after


def test_verify_each_rolls_back_a_pass_that_changes_outputs():
    original = Model.from_proto(builders.mlp())
    model = original.copy()
    result = PassManager("test-breaker,dead-nodes", verify_each=True).run(
        model, PassContext(reference=original))
    breaker = result.records[0]
    assert breaker.rolled_back and "differ" in breaker.error
    assert not result.records[1].rolled_back
    assert_same_outputs(original, model)


def test_verify_each_rolls_back_a_pass_that_raises():
    original = Model.from_proto(builders.mlp())
    model = original.copy()
    result = PassManager("test-raiser", verify_each=True).run(model, PassContext(reference=original))
    assert result.records[0].rolled_back and "boom" in result.records[0].error
    assert len(model.graph.nodes) == len(original.graph.nodes)


def test_a_raising_pass_without_verify_names_itself():
    model = Model.from_proto(builders.mlp())
    with pytest.raises(PassFailed, match="pass 'test-raiser' failed: boom"):
        PassManager("test-raiser").run(model)


def test_the_manager_gives_its_feeds_to_the_passes_unless_the_context_has_its_own():
    import numpy as np

    model = Model.from_proto(builders.mlp())
    feeds = {"input": np.zeros((1, 64), np.float32)}
    assert PassManager("test-feed-spy").run(model).records[0].stats["feeds"] is None
    assert PassManager("test-feed-spy", feeds=feeds).run(model).records[0].stats["feeds"] == ["input"]
    own = PassContext(feeds={"other": np.zeros(1)})
    assert PassManager("test-feed-spy", feeds=feeds).run(model, own).records[0].stats["feeds"] == ["other"]


def test_optimize_gives_the_validation_feeds_to_the_passes():
    import numpy as np

    import onnxopt

    feeds = {"input": np.zeros((2, 64), np.float32)}
    _, report = onnxopt.optimize(builders.mlp(), "test-feed-spy", feeds=feeds, runs=0)
    assert report.passes[0]["stats"]["feeds"] == ["input"]
    _, report = onnxopt.optimize(builders.mlp(), "test-feed-spy", runs=0)
    assert report.passes[0]["stats"]["feeds"] is None  # validation generates its own
