"""The simplification benchmark's own pieces (no timing is asserted): generated models,
the child-process runner, output comparison and the tables."""

from __future__ import annotations

import os
import time

import numpy as np
import onnx

from benchmarks.simplify import (
    PASSES_B,
    big_model,
    chain_model,
    figures,
    process_targets,
    same_outputs,
    tables,
    targets,
)
from benchmarks.simplify_tools import interpreter_rss, isolated, run_tool, whole_process
from onnxopt import Model
from tests.helpers import assert_same_outputs


def test_generated_chain_has_work_for_every_pass(tmp_path):
    path = tmp_path / "chain.onnx"
    assert chain_model(5, path) == 45
    onnx.checker.check_model(str(path))
    result = run_tool("onnxopt", str(path), str(tmp_path / "out.onnx"), PASSES_B)
    assert result["converged"]
    after = figures(str(tmp_path / "out.onnx"))
    # per block both Constants and a Mul go (one Constant stays for all); the BN becomes an Add
    assert after["nodes_total"] == 45 - 5 * 3 + 1
    assert_same_outputs(Model.load(path), Model.load(tmp_path / "out.onnx"), shapes={"x": (3, 16)})


def test_generated_big_model_uses_external_data(tmp_path):
    path = big_model(tmp_path / "big", width=1024, layers=3)
    assert (tmp_path / "big" / "big.onnx.data").stat().st_size == 3 * 1024 * 1024 * 4
    model = Model.load(path)
    assert model.has_external_data()
    out = tmp_path / "out" / "big.onnx"
    out.parent.mkdir()
    result = run_tool("onnxopt", str(path), str(out), PASSES_B)
    assert result["converged"]
    assert figures(str(out))["initializers"] < figures(str(path))["initializers"]  # tied weight, folded BN
    x = {"x": np.random.default_rng(0).standard_normal((1, 1024)).astype(np.float32)}
    assert_same_outputs(model, Model.load(out), x, rtol=1e-3, atol=1e-4)


def test_a_crash_and_a_timeout_are_row_entries():
    crashed = isolated(os._exit, (3,), timeout=60)
    assert not crashed["ok"] and "exit code 3" in crashed["error"]
    t0 = time.monotonic()
    slow = isolated(time.sleep, (60,), timeout=1)
    assert not slow["ok"] and "timed out" in slow["error"]
    assert time.monotonic() - t0 < 50
    raised = isolated(int, ("not a number",), timeout=60)
    assert not raised["ok"] and raised["error"].startswith("ValueError")


def test_same_outputs_tells_apart_wrong_results():
    a = [np.array([1.0, 2.0], np.float32)]
    assert same_outputs(a, [a[0] + 1e-6])[0]
    assert not same_outputs(a, [a[0] + 1.0])[0]
    assert not same_outputs(a, [a[0].astype(np.float64)])[0]
    assert not same_outputs(a, [np.array([1.0, np.nan], np.float32)])[0]


def test_tables_render_failures_and_targets():
    ok = {"ok": True, "equal": True, "signature_kept": True, "nodes": 3, "nodes_total": 3, "initializers": 1,
          "bytes": 100, "seconds": 0.5, "peak_rss": 2**20, "peak_above_baseline": 10, "latency_ratio": 1.0}
    data = {
        "machine_line": "cpu", "date": "today", "revision": "abc", "quick": True, "default_pipeline": "[dead-nodes]",
        "columns": [("onnxopt default", "onnxopt", "default"), ("onnxoptimizer", "onnxoptimizer", None),
                    ("onnxsim", "onnxsim", None), ("onnxslim", "onnxslim", None)],
        "models": [{"model": "m", "original": {"nodes": 5, "nodes_total": 5, "initializers": 2, "bytes": 120,
                                               "latency_ms": 1.0},
                    "noise_ratio": 1.01, "latency_runs": 3,
                    "tools": {"onnxopt default": ok,
                              "onnxoptimizer": {**ok, "nodes_total": 4, "equal": False},
                              "onnxsim": {"ok": False, "error": "crashed (exit code -11)"},
                              "onnxslim": {**ok, "nodes_total": 4, "seconds": 0.1}}}],
    }
    data["targets"] = targets(data)
    text = tables(data)
    assert "4 ✗" in text and "crashed (exit code -11)" in text
    assert "nodes ≤ the best correct peer on 1/1, strictly fewer on 1/1" in text
    assert "wall time ≤ the fastest correct peer on 0/1; slower on m 500 vs 100 ms" in text


def test_a_tool_runs_as_a_whole_process_of_its_own(tmp_path):
    path = tmp_path / "chain.onnx"
    chain_model(5, path)
    res = whole_process("onnxopt", str(path), str(tmp_path / "out.onnx"), PASSES_B, timeout=300)
    assert res["ok"] and res["converged"]
    assert res["process_seconds"] >= res["seconds"] and res["process_cpu"] > 0  # imports included
    assert res["peak_rss"] >= res["baseline_rss"] > 0
    failed = whole_process("no-such-tool", str(path), str(tmp_path / "x.onnx"), None, timeout=300)
    assert not failed["ok"] and failed["error"].startswith("ValueError")
    slow = whole_process("onnxopt", str(path), str(tmp_path / "y.onnx"), PASSES_B, timeout=0.01)
    assert not slow["ok"] and "timed out" in slow["error"]
    assert interpreter_rss() > 0


def test_whole_process_targets_judge_time_and_memory():
    def tool(seconds, cpu, peak):
        return {"ok": True, "equal": True, "signature_kept": True, "process_seconds": seconds, "process_cpu": cpu,
                "peak_rss": peak * 2**20}

    size = 60 * 2**20
    data = {
        "interpreter_rss": 64 * 2**20,
        "columns": [("onnxopt default", "onnxopt", "default"), ("onnxoptimizer", "onnxoptimizer", None),
                    ("onnxsim", "onnxsim", None), ("onnxslim", "onnxslim", None)],
        "models": [
            {"model": "minilm", "original": {"bytes": size},
             "tools": {"onnxopt default": tool(2.0, 1.2, 200), "onnxoptimizer": tool(2.5, 1.8, 480),
                       "onnxsim": {"ok": False}, "onnxslim": tool(3.0, 2.0, 600)}},
            {"model": "ppocr-cls", "original": {"bytes": 2**19},
             "tools": {"onnxopt default": tool(1.3, 1.0, 70), "onnxoptimizer": tool(1.0, 0.9, 53),
                       "onnxsim": {**tool(0.5, 0.5, 40), "equal": False}, "onnxslim": tool(2.0, 1.9, 90)}},
        ],
    }
    lines = "\n".join(process_targets(data))
    assert "whole-process wall time ≤ 1.1× the fastest correct peer (≥ 1 MiB) or ≤ +0.25 s (smaller) on 1/2 " \
           "real models; above on ppocr-cls 1.30 vs 1.00 s" in lines  # onnxsim's wrong result does not count
    assert "whole-process CPU time" in lines and "on 2/2 real models." in lines
    assert "≤ 3× the model's bytes on 1/1 models of 50 MiB or more." in lines  # (200 - 64) / 60 < 3
    assert "leanest correct peer's on 1/2 models; above on ppocr-cls 70 vs 53 MiB" in lines
