"""The pipeline language, options as data, the registry and presets."""

from __future__ import annotations

import pytest

from onnxopt import framework
from onnxopt.errors import PipelineError
from onnxopt.framework import (
    Group,
    Opt,
    Pass,
    PassResult,
    PassStep,
    describe_pipeline,
    get_pass,
    parse_pipeline,
    presets,
    register,
    registered_passes,
)


class _Knobs(Pass):
    name = "test-knobs"
    summary = "a pass with one option of each type (tests only)"
    exact = True
    options = {
        "size_limit": Opt(int, 1024, "an int", minimum=0),
        "ratio": Opt(float, 0.5, "a float", minimum=0.0, maximum=1.0),
        "enabled": Opt(bool, True, "a bool"),
        "mode": Opt(str, "fast", "a choice", choices=("fast", "slow")),
        "exclude": Opt(list, [], "a list"),
    }

    def run(self, model, ctx):
        return PassResult(False)


class _Lossy(Pass):
    name = "test-lossy"
    summary = "a lossy pass (tests only)"
    exact = False
    options = {}

    def run(self, model, ctx):
        return PassResult(False)


@pytest.fixture(autouse=True)
def _test_passes():
    """Register the test passes for this module only (the registry is global)."""
    for cls in (_Knobs, _Lossy):
        register(cls)
    yield
    for cls in (_Knobs, _Lossy):
        framework._PASSES.pop(cls.name, None)


def test_single_pass_with_typed_options():
    (step,) = parse_pipeline("test-knobs(size_limit=1M, ratio=0.25, enabled=false, mode=slow, exclude=Conv;Gemm)")
    assert isinstance(step, PassStep)
    opts = step.pass_.opts
    assert opts.size_limit == 2**20 and opts.ratio == 0.25 and opts.enabled is False
    assert opts.mode == "slow" and opts.exclude == ["Conv", "Gemm"]


def test_defaults_apply_and_spec_shows_only_given_options():
    (step,) = parse_pipeline("test-knobs(ratio=0.1)")
    assert step.pass_.opts.size_limit == 1024
    assert step.pass_.spec() == "test-knobs(ratio=0.1)"


def test_groups_and_presets_expand():
    steps = parse_pipeline("dead-nodes,[dead-nodes,test-knobs],default")
    assert isinstance(steps[0], PassStep)
    assert isinstance(steps[1], Group) and [s.pass_.name for s in steps[1].steps] == ["dead-nodes", "test-knobs"]
    assert isinstance(steps[2], Group)
    assert describe_pipeline(steps).startswith("dead-nodes,[dead-nodes,test-knobs],[")


def test_default_preset_is_registered_and_runs_to_a_fixed_point():
    assert "default" in presets()
    (step,) = parse_pipeline("default")
    assert isinstance(step, Group)
    assert all(s.pass_.exact for s in step.steps)


@pytest.mark.parametrize("text,match", [
    ("no-such-pass", r"unknown pass 'no-such-pass'; valid passes: .*dead-nodes"),
    ("test-knobs(nope=1)", r"has no option 'nope'; valid options: size_limit \(int"),
    ("test-knobs(size_limit=abc)", r"option 'size_limit' of pass 'test-knobs' expects int"),
    ("test-knobs(ratio=2)", r"must be <= 1.0"),
    ("test-knobs(mode=medium)", r"must be one of fast, slow"),
    ("test-knobs(enabled=maybe)", r"expects bool"),
    ("test-knobs(ratio=0.1,ratio=0.2)", r"given twice"),
    ("[dead-nodes,[dead-nodes]]", r"cannot be nested"),
    ("[dead-nodes", r"missing '\]'"),
    ("[test-lossy]", r"lossy and cannot run in a fixed-point group"),
    ("default(x=1)", r"preset 'default' takes no options"),
    ("", r"empty pipeline"),
    ("dead-nodes,,", r"expected a pass name|pipeline ends early"),
    ("test-knobs(size_limit)", r"expected key=value"),
])
def test_bad_pipelines_are_rejected_with_what_is_valid(text, match):
    with pytest.raises(PipelineError, match=match):
        parse_pipeline(text)


def test_registry_lists_summaries_and_names_are_hyphenated():
    passes = registered_passes()
    assert "dead-nodes" in passes
    for name, cls in passes.items():
        assert cls.name == name and cls.summary
    with pytest.raises(ValueError, match="hyphenated"):
        @register
        class Bad(Pass):
            name = "Bad_Name"
            summary = "x"


def test_api_options_are_checked_like_pipeline_options():
    cls = get_pass("test-knobs")
    assert cls(size_limit=10).opts.size_limit == 10
    with pytest.raises(PipelineError, match="expects int"):
        cls(size_limit="ten")
    with pytest.raises(PipelineError, match="has no option"):
        cls(bogus=1)


def test_every_error_survives_pickling_as_a_worker_process_sends_it():
    import pickle

    from onnxopt import errors

    raised = [errors.PassFailed("finetune", "the converted student disagrees"), errors.UsageError("bad option"),
              errors.ValidationFailed("outside the bound"), errors.CalibrationError("too few samples")]
    for exc in raised:
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
    assert pickle.loads(pickle.dumps(raised[0])).pass_name == "finetune"
