"""onnxopt.weights.compression_pass: the shared option block, the find -> select -> decide
-> write -> report run, and the order in which options are checked."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt import PassContext
from onnxopt.errors import PipelineError
from onnxopt.framework import get_pass
from onnxopt.weights.compression_pass import Decision, WeightCompressionPass, selection_options
from tests.helpers import with_weights
from tests.passes.compress_helpers import assert_identical_outputs, storages, weights
from tests.weights.helpers import mlp


class _Halve(WeightCompressionPass):
    """Rounds every selected weight to a multiple of 0.5 (a few distinct values, so an
    indexed storage), or writes nothing when ``write`` is false."""

    name = "halve"
    summary = "test pass"
    options = {**selection_options("halved", "targets PATTERN=STEP")}
    lead_columns = ("layer", "params", "step")

    def __init__(self, write: bool = True, **values):
        super().__init__(**values)
        self.write = write

    def decide(self, model, sites, skipped, ctx):
        writes, rows = [], []
        for site in sites:
            step = self.target(site) or 0.5
            if self.write:
                writes.append((site, (np.round(site.value / step) * step).astype(site.value.dtype)))
            rows.append({"layer": site.name, "params": site.size, "step": step, "extra": 1})
        return Decision(writes, rows, {"layers_halved": len(writes)})


def test_selection_options_are_the_block_both_passes_list():
    block = selection_options("pruned", "targets PATTERN=SPARSITY")
    assert list(block) == ["layers", "ops", "include", "exclude", "min_size"]
    assert block["ops"].help == "op types whose weight operand may be pruned"
    assert block["layers"].help.startswith("per-layer targets PATTERN=SPARSITY")
    prune, share = get_pass("prune-magnitude").options, get_pass("share-weights").options
    for key in block:
        assert (prune[key].type, prune[key].default) == (share[key].type, share[key].default)
    assert prune["include"] == share["include"] and prune["min_size"] == share["min_size"]


def test_run_writes_the_decided_values_and_reports_per_layer(rng):
    w0 = rng.standard_normal((32, 48)).astype(np.float32)
    w1 = rng.standard_normal((48, 16)).astype(np.float32)
    model = mlp(w0, w1)
    out = model.copy()
    result = _Halve(min_size=0, layers=["w1=0.25"]).run(out, PassContext(reference=model))
    assert result.modified
    halves = {"w0": np.round(w0 * 2) / 2, "w1": np.round(w1 * 4) / 4}
    got = weights(out)
    assert all(np.array_equal(got[k], v) for k, v in halves.items())
    assert set(storages(out).values()) == {"dense-idx"}
    stats = result.stats
    assert list(stats) == ["layers_halved", "storages", "skipped", "layers", "total"]
    assert stats["storages"] == {"dense-idx": 2} and stats["skipped"] == {}
    rows = {r["layer"]: r for r in stats["layers"]}
    assert rows["w1"]["step"] == 0.25 and rows["w0"]["step"] == 0.5
    assert list(rows["w0"])[:8] == ["layer", "params", "step", "storage", "bits_per_weight", "bytes",
                                    "gzip_bytes", "ratio"]
    assert rows["w0"]["extra"] == 1 and rows["w0"]["storage"] == "dense-idx"
    assert stats["total"]["original_file_bytes"] == len(model.to_bytes())
    feeds = {"x": rng.standard_normal((3, 32)).astype(np.float32)}
    assert_identical_outputs(out, with_weights(model, **halves), feeds)


def test_run_without_writes_changes_nothing(rng):
    model = mlp(rng.standard_normal((32, 48)).astype(np.float32), rng.standard_normal((48, 16)).astype(np.float32))
    before = model.to_bytes()
    result = _Halve(write=False, min_size=10_000).run(model, PassContext())
    assert not result.modified and model.to_bytes() == before
    assert result.stats == {"layers_halved": 0, "storages": {}, "skipped": {"smaller than min_size": 2}}


def test_a_pass_checks_its_own_options_before_the_selection():
    with pytest.raises(PipelineError, match="give one of sparsity, threshold or pattern"):
        get_pass("prune-magnitude")(sparsity=0.5, threshold=0.1, ops=["Relu"])
    with pytest.raises(PipelineError, match="ops must be among"):
        get_pass("prune-magnitude")(sparsity=0.5, ops=["Relu"], layers=["("])
    with pytest.raises(PipelineError, match="must be in"):
        get_pass("share-weights")(layers=["fc.*=9"])
