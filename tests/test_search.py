"""onnxopt search: the space, the allocation, the front, the cache, the data split, the
metric, and whole searches in this process (the Ray executor: test_search_ray.py)."""

from __future__ import annotations

import json
import re
import shlex

import numpy as np
import pytest

import onnxopt
from onnxopt import Model
from onnxopt.autocompress import driver, executors, search, summary
from onnxopt.autocompress.allocate import DCOption, dc_candidates, dc_options, quant_ladder
from onnxopt.autocompress.cache import ResultCache, data_digest, digest
from onnxopt.autocompress.data_split import split_data
from onnxopt.autocompress.metric import load_metric
from onnxopt.autocompress.pareto import pareto_front, ranked
from onnxopt.autocompress.space import ComputeLayer, Config, WeightLayer, exact_pattern, parse_space, pipeline
from onnxopt.autocompress.tasks import run_job
from onnxopt.cli import main
from onnxopt.errors import CalibrationError, UsageError, ValidationFailed
from onnxopt.framework import parse_pipeline
from tests.search_helpers import feeds, small_mlp

SPACE = "int8,int4,fp16,prune,share"
REPORT_KEYS = {"objective", "floor", "trials", "chosen", "cut", "seconds", "workers"}
TRIAL_KEYS = {"id", "pipeline", "kind", "preset", "bytes", "latency_ratio", "cosine", "metric", "meets_floor",
              "pareto", "chosen", "seconds"}


# ---- the space and the pipelines ---------------------------------------------------


def test_space_keeps_what_can_move_the_objective():
    fams, notes = parse_space(None, "size")
    assert fams == ["int8", "int4", "fp16", "prune", "share", "channels"]
    assert any(n.startswith("finetune: not in the default space") for n in notes)  # it trains: opt-in
    fams, notes = parse_space("int8,prune,share", "latency")
    assert fams == ["int8"] and len(notes) == 2 and "prune" in notes[0]


@pytest.mark.parametrize("text", ["int8,int3", "", "quantize"])
def test_unknown_family_is_a_usage_error(text):
    with pytest.raises(UsageError, match="valid: int8, int4, fp16, prune, share, channels, finetune"):
        parse_space(text, "size")


def test_pipeline_of_a_config_names_its_layers_with_pass_options():
    int8 = pipeline(Config("int8", float_layers=("fc2", "a,b")))
    assert int8 == 'default,quantize(mode=static,method=percentile,exclude="a,b;fc2")'
    steps = parse_pipeline(int8)
    assert steps[-1].pass_.opts.exclude == ["a,b", "fc2"]
    dc = pipeline(Config("dc", prune=(("w0", 0.5), ("w.1", 0.8)), share=(("w0", 4), ("w.1", 4), ("w2", 6)),
                         fp16=True))
    prune, share = parse_pipeline(dc)[1].pass_, parse_pipeline(dc)[2].pass_
    assert parse_pipeline(dc)[-1].pass_.name == "fp16"
    targets = dict(spec.rsplit("=", 1) for spec in prune.opts.layers)
    assert {re.search(p, "w.1") is not None for p in targets} == {True, False}
    assert not re.search(exact_pattern(["w.1"]), "wx1")  # the dot is literal
    assert [re.fullmatch(p, "w2") is not None for p in (s.rsplit("=", 1)[0] for s in share.opts.layers)] \
        == [False, True]


# ---- allocation ------------------------------------------------------------------


def test_quant_ladder_quantizes_the_cheapest_layers_first_within_each_budget():
    layers = [ComputeLayer("a", "Conv", 100, 10), ComputeLayer("b", "Conv", 100, 10), ComputeLayer("c", "Conv", 1000, 10),
              ComputeLayer("d", "Conv", 100, 10)]
    ladder = quant_ladder(layers, {"a": 0.004, "b": 0.0001, "c": 0.002, "d": None}, "latency")
    assert ladder.order == ["b", "c", "a"]  # d: the probe changed nothing; c gains ten times more than a
    assert ladder.prefixes(0.001) == [1, 2, 3]
    assert ladder.float_layers(2) == ("a",) and ladder.predicted(2) == pytest.approx(0.0021)


def test_dc_candidates_save_more_bytes_for_a_larger_error_budget():
    w = WeightLayer("w", 4096, 16384)
    probes = {("share", 4): (0.001, 100_000 - 14_000), ("prune", 0.5): (0.002, 100_000 - 7000),
              ("prune", 0.8): (0.02, 100_000 - 11_000)}
    options = dc_options(w, probes, 100_000)
    assert DCOption(0.0, 0, 0.0, 0.0) in options and any(o.sparsity and o.bits for o in options)
    cands = dc_candidates({"w": options, "v": options}, 0.01)
    savings = [saved for _, _, saved in cands]
    errors = [err for _, err, _ in cands]
    assert savings == sorted(savings, reverse=True) and errors == sorted(errors, reverse=True)
    assert all(err <= 4 * 0.01 for err in errors)


def test_pareto_front_and_choice():
    trials = [{"bytes": 100, "cosine": 0.999}, {"bytes": 50, "cosine": 0.995}, {"bytes": 60, "cosine": 0.99},
              {"bytes": 10, "cosine": 0.9}, {"bytes": 5, "cosine": None, "error": "boom"}]
    assert pareto_front(trials, "size") == [0, 1, 3]
    assert ranked(trials, "size", 0.99, None) == [1, 2, 0]


# ---- cache, data, metric -----------------------------------------------------------


def test_cache_keeps_results_by_content(tmp_path):
    cache = ResultCache(tmp_path)
    key = digest(b"model", "default,fp16", data_digest([feeds(2)]))
    assert cache.get(key) is None
    cache.put(key, {"cosine": 0.5, "bytes": 3})
    assert ResultCache(tmp_path).get(key) == {"cosine": 0.5, "bytes": 3}
    assert digest(b"model", "default,fp16", data_digest([feeds(2, seed=9)])) != key
    assert not list(tmp_path.rglob("*.tmp"))
    assert ResultCache(None).get(key) is None


def test_data_split_holds_out_disjoint_samples():
    model = Model.from_proto(small_mlp())
    split = split_data(model, feeds(20), seed=3)
    parts = [split.calibration, split.holdout, split.final]
    ids = [{s["x"].tobytes() for s in p} for p in parts]
    assert sum(len(i) for i in ids) == 20 and len(set.union(*ids)) == 20
    assert split.probe == split.calibration[:4]
    given = split_data(model, feeds(20), feeds=feeds(3, seed=7))
    assert len(given.final) == 3 and len(given.calibration) + len(given.holdout) == 20
    with pytest.raises(CalibrationError, match="at least 6"):
        split_data(model, feeds(5))


def test_metric_errors_are_one_line():
    with pytest.raises(UsageError, match="expected module:function"):
        load_metric("nocolon")
    with pytest.raises(UsageError, match="cannot import no_such_module_xyz"):
        load_metric("no_such_module_xyz:f")
    with pytest.raises(UsageError, match="has no nothing"):
        load_metric("tests.search_helpers:nothing")
    m = load_metric("tests.search_helpers:broken_metric")
    with pytest.raises(UsageError, match="raised ValueError: labels missing"):
        m([], [], [])
    assert load_metric(lambda r, c: float("nan")) is not None
    with pytest.raises(UsageError, match="not a finite number"):
        load_metric(lambda r, c: float("nan"))([], [], [])


# ---- whole searches, in this process -------------------------------------------------


def _search(tmp_path, name="best.onnx", **kw):
    args = dict(calibration=feeds(24), objective="size", space=SPACE, backend="local", seed=0,
                cache_dir=tmp_path / "cache", time_budget=None)
    args.update(kw)
    return search(small_mlp(), tmp_path / name if name else None, **args)


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    result = _search(tmp, report=tmp / "search.json")
    return tmp, result


def test_search_report_has_the_documented_block(found):
    tmp, result = found
    report = json.loads((tmp / "search.json").read_text())
    block = report["search"]
    assert REPORT_KEYS <= set(block) and set(block["floor"]) == {"min_cosine", "min_metric"}
    assert all(TRIAL_KEYS <= set(t) for t in block["trials"])
    kinds = {t["kind"] for t in block["trials"]}
    assert kinds == {"trial", "preset"}
    assert {t["preset"] for t in block["trials"] if t["kind"] == "preset"} >= {"int8", "int4", "fp16", "default"}
    assert [t["id"] for t in block["trials"] if t["chosen"]] == [block["chosen"]]
    assert block["cut"] is False and block["workers"] == 1
    assert {p["family"] for p in block["probes"]} == {"int8", "int4", "prune", "share"}


def test_chosen_model_meets_the_floor_and_beats_the_presets(found):
    tmp, result = found
    trials = result.report["search"]["trials"]
    chosen = next(t for t in trials if t["chosen"])
    assert chosen["meets_floor"] and chosen["cosine"] >= 0.99 and chosen["pareto"]
    presets = [t for t in trials if t["kind"] == "preset" and t["meets_floor"] and t["preset"] != "default"]
    assert presets and all(chosen["bytes"] <= p["bytes"] for p in presets)
    final = next(f for f in result.report["search"]["final"] if f["trial"] == chosen["id"])
    assert final["cosine"] >= 0.99 - 0.005 and final["reproduced"]


def test_printed_command_rebuilds_the_same_model(found, tmp_path, monkeypatch):
    tmp, result = found
    assert result.command.startswith("onnxopt optimize MODEL.onnx -o ")
    original = tmp_path / "model.onnx"
    original.write_bytes(small_mlp().SerializeToString())
    args = result.command.split(" -p ", 1)[1]
    words = shlex.split(args)
    pipe = words[0]
    calib = words[words.index("--calib") + 1] if "--calib" in words else None
    assert calib is None or calib.endswith("best.calib.npz")
    out = tmp_path / "again.onnx"
    cmd = ["optimize", str(original), "-o", str(out), "-p", pipe, "--no-validate", "-q"]
    assert main(cmd + (["--calib", calib] if calib else [])) == 0
    assert out.read_bytes() == (tmp / "best.onnx").read_bytes()


def test_search_resumes_from_its_cache(found, tmp_path):
    """A search that crashed after k jobs redoes only the jobs that had not finished."""
    _, full = found
    total = full.report["search"]["jobs_run"]
    calls = {"n": 0}

    def crashing(job, shared):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt  # the driver dies here
        return run_job(job, shared)

    with pytest.raises(KeyboardInterrupt):
        _search(tmp_path, job_fn=crashing)
    again = _search(tmp_path)
    assert again.report["search"]["jobs_run"] == total - 5
    assert again.report["search"]["cache"]["hits"] >= 5
    assert again.pipeline == full.pipeline


def test_floor_nothing_meets_names_the_limiting_layers(tmp_path):
    with pytest.raises(ValidationFailed, match=r"no candidate meets the floor \(min cosine 1.0\).*limited by fc\d"):
        _search(tmp_path, min_cosine=1.0, space="int8")
    assert not (tmp_path / "best.onnx").exists()
    with pytest.raises(ValidationFailed, match="wrote the closest"):
        _search(tmp_path, min_cosine=1.0, space="int8", force=True)
    assert (tmp_path / "best.onnx").exists()


def test_metric_floor_and_a_metric_that_raises(tmp_path):
    result = _search(tmp_path, space="int8,fp16", metric="tests.search_helpers:top1_agreement", min_metric=0.97)
    block = result.report["search"]
    assert block["metric"] == "tests.search_helpers:top1_agreement" and block["metric_original"] == 1.0
    assert all(t["metric"] is not None for t in block["trials"] if not t.get("error"))
    assert next(t for t in block["trials"] if t["chosen"])["metric"] >= 0.97
    with pytest.raises(UsageError, match="raised ValueError: labels missing"):
        _search(tmp_path, name="other.onnx", space="int8", metric="tests.search_helpers:broken_metric")
    assert not (tmp_path / "other.onnx").exists()


def test_time_budget_cut_writes_the_best_so_far(tmp_path, monkeypatch):
    class Clock:
        offset = 0.0

        def monotonic(self):
            import time

            return time.monotonic() + self.offset

        def time(self):
            import time

            return time.time() + self.offset

    clock = Clock()
    for module in (driver, executors, summary):
        monkeypatch.setattr(module, "time", clock)
    calls = {"n": 0}

    def ticking(job, shared):
        calls["n"] += 1
        if calls["n"] == 6:
            clock.offset = 1e9  # the budget is spent from here on
        return run_job(job, shared)

    result = _search(tmp_path, time_budget=600, job_fn=ticking)
    assert result.cut and result.report["search"]["cut"]
    assert calls["n"] == 6 and (tmp_path / "best.onnx").exists()
    assert any("time budget" in n for n in result.report["search"]["notes"])


def test_cli_search_prints_the_front_and_the_command(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(small_mlp().SerializeToString())
    np.savez(tmp_path / "calib.npz", x=np.stack([f["x"] for f in feeds(24)]))
    out, report = tmp_path / "best.onnx", tmp_path / "s.json"
    rc = main(["search", str(model), "-o", str(out), "--calib", str(tmp_path / "calib.npz"), "--objective", "size",
               "--space", "int8,fp16", "--backend", "local", "--report", str(report), "--cache-dir",
               str(tmp_path / "cache")])
    text = capsys.readouterr().out
    assert rc == 0 and out.exists() and "reproduce with:" in text and "onnxopt optimize" in text
    data = json.loads(report.read_text())
    assert data["search"]["chosen"] and data["pipeline"] == next(t["pipeline"] for t in data["search"]["trials"]
                                                                    if t["chosen"])


def test_search_report_renders_as_html(tmp_path):
    pytest.importorskip("matplotlib", reason="the HTML report needs the 'report' extra")
    from onnxopt.html_report import load_report, render_html

    _search(tmp_path, space="int8,fp16", report=tmp_path / "s.json")
    page = render_html(load_report(tmp_path / "s.json"))
    assert 'id="search"' in page and "chosen" in page and "<svg" in page


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(small_mlp().SerializeToString())
    np.savez(tmp_path / "calib.npz", x=np.stack([f["x"] for f in feeds(24)]))
    base = ["search", str(model), "-o", str(tmp_path / "o.onnx"), "--calib", str(tmp_path / "calib.npz"),
            "--objective", "size", "--backend", "local", "--no-cache"]
    for extra, message in ((["--space", "int8,int9"], "unknown search family 'int9'"),
                           (["--metric", "no_such_mod:f"], "cannot import no_such_mod")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o.onnx").exists()


def test_search_is_exported_lazily():
    assert onnxopt.search is search
    assert "search" in onnxopt.__all__


def test_timings_hold_distinct_cores_and_measure_a_ratio(tmp_path, monkeypatch):
    import os
    import threading

    from onnxopt.autocompress import timing

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: nothing to tell apart")
    monkeypatch.setattr(timing, "LOCK_DIR", tmp_path)  # this machine's other searches hold the real locks
    seen, done = [], threading.Event()

    def second():
        with timing.core_slot() as core:
            seen.append(core)
            done.wait(10)

    with timing.core_slot() as first:
        t = threading.Thread(target=second)
        t.start()
        for _ in range(100):
            if seen:
                break
            threading.Event().wait(0.05)
        done.set()
        t.join(10)
    assert seen and seen[0] != first  # the second timing got the other core, not a shared one
    data = Model.from_proto(small_mlp()).to_bytes()
    result = timing.latency_ratio(data, data, feeds(1)[0], target_seconds=0.2)
    assert 0.5 < result["latency_ratio"] < 2.0 and len(result["round_ratios"]) == 3


def test_weight_probes_cover_the_bulk_of_the_bytes_largest_first():
    from onnxopt.autocompress.jobs import _bulk

    weights = [WeightLayer(f"w{i}", n, n * 4) for i, n in enumerate([10, 5000, 200, 3000, 20])]
    assert [w.name for w in _bulk(weights)] == ["w1", "w3", "w2"]


def test_bisection_measures_the_same_points_whatever_the_number_of_workers():
    # a cluster's worker count must not change which models are measured, or the same seed
    # would choose differently on one node and on two
    from onnxopt.autocompress.allocate import QuantLadder

    names = [f"l{i}" for i in range(12)]
    ladder = QuantLadder(names, [0.0001] * 12)

    def trial(k: int, met: bool) -> dict:
        return {"config": Config("int8", float_layers=ladder.float_layers(k)), "meets_floor": met}

    picked = []
    for workers in (1, 2, 8):
        run = driver._Search.__new__(driver._Search)
        run.trials = [trial(2, True), trial(11, False)]
        run.executor = type("Executor", (), {"workers": workers})()
        run._ladder = lambda family: ladder
        jobs = run._bisect("int8")
        picked.append([j["pipeline"] for j in jobs])
    assert picked[0] == picked[1] == picked[2] and len(picked[0]) == driver.BISECT_POINTS


def test_finetune_family_without_torch_is_left_out_or_one_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    fams, notes = parse_space(None, "size")
    assert "finetune" not in fams and any("needs PyTorch: pip install 'onnxopt[train]'" in n for n in notes)
    with pytest.raises(UsageError, match=r"needs PyTorch: pip install 'onnxopt\[train\]'"):
        parse_space("share,finetune", "size")


def test_final_validation_tries_the_best_then_the_one_with_most_to_spare():
    from onnxopt.autocompress.choose import _final_order

    trials = [{"cosine": c} for c in (0.991, 0.992, 0.999, 0.995, 0.9995, 0.993)]
    order = [0, 1, 2, 3, 4, 5]  # best on the objective first
    assert _final_order(order, trials, 2) == [0, 1, 4]
    assert _final_order(order[:2], trials, 2) == [0, 1]
    assert _final_order(order, trials, 5) == [0, 1, 2, 3, 4, 5]
