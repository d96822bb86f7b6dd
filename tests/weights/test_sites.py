"""onnxopt.weights.sites: which weights are found, and the selection errors."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.errors import PipelineError
from onnxopt.weights.sites import check_selection, check_targets, find_weights
from tests.helpers import parse
from tests.passes.compress_helpers import values


def test_find_weights_skips_what_it_must_not_touch(rng):
    w = rng.standard_normal((8, 8)).astype(np.float32)
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8] x, float[8, 8] fed) => (float[N, 8] y, float[8, 8] w_out)
        <float[8, 8] w_data = {values(w)}, float[8, 8] w_out = {values(w)}, float[8, 8] w_ok = {values(w)}>
        {{
            a = MatMul(x, w_data)
            b = Add(a, w_data)
            c = MatMul(b, w_out)
            d = MatMul(c, fed)
            y = MatMul(d, w_ok)
        }}
    """)
    sites, skipped = find_weights(model)
    assert [s.name for s in sites] == ["w_ok"]
    assert sites[0].axis == 0 and sites[0].ops == ["MatMul"]
    assert skipped == {"also read as data by another node": 1, "graph output": 1}


def test_selection_errors_name_the_problem():
    with pytest.raises(PipelineError, match="ops must be among"):
        check_selection("p", ["Relu"], [])
    with pytest.raises(PipelineError, match="bad name pattern"):
        check_selection("p", ["Conv"], ["("])
    with pytest.raises(PipelineError, match="not PATTERN=VALUE"):
        check_targets("p", ["fc0"], float, 0, 1)
    with pytest.raises(PipelineError, match="must be in"):
        check_targets("p", ["fc0=1.5"], float, 0, 1)
