"""onnxopt search on Ray: the same job function as in-process, a worker killed mid-task,
the same choice as in-process, an unreachable cluster, and Ray never imported by onnxopt
itself. One local Ray (2 CPUs) is started for the whole test session."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from onnxopt.autocompress import search
from onnxopt.autocompress.executors import InProcessExecutor, RayExecutor, check_reachable
from onnxopt.autocompress.tasks import Shared, run_job, run_outputs
from onnxopt.errors import UsageError
from onnxopt.manager import PassManager
from onnxopt.model import Model
from tests.search_helpers import feeds, small_mlp

ROOT = Path(__file__).resolve().parent.parent
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'onnxopt[search]')")


@pytest.fixture(scope="session")
def ray_session():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()


def _shared() -> Shared:
    original = Model.from_proto(small_mlp())
    clean = original.copy()
    PassManager("default").run(clean)
    data = feeds(10)
    ref = run_outputs(original.to_bytes(), data[6:])
    return Shared(models={"original": original.to_bytes(), "clean": clean.to_bytes()}, calibration=data[:6],
                  probe=data[:2], probe_reference=run_outputs(original.to_bytes(), data[:2]), holdout=data[6:],
                  holdout_reference=ref, latency_feed=data[6], latency_seconds=0.05)


JOBS = [{"kind": "probe", "pipeline": "quantize(mode=static,exclude=fc1;fc2)", "start": "clean"},
        {"kind": "trial", "pipeline": "default,share-weights(bits=4)", "start": "original"}]


def test_one_function_two_executors_same_results(ray_session):
    shared = _shared()
    local = InProcessExecutor()
    remote = RayExecutor(workers=2)
    here = {j["pipeline"]: r for j, r in local.map_unordered(run_job, JOBS, local.share(shared))}
    there = {j["pipeline"]: r for j, r in remote.map_unordered(run_job, JOBS, remote.share(shared))}
    assert set(here) == set(there) == {j["pipeline"] for j in JOBS}
    for key in here:
        assert not here[key].get("error") and not there[key].get("error")
        assert here[key]["sha"] == there[key]["sha"] and here[key]["bytes"] == there[key]["bytes"]
        assert here[key]["cosines"] == pytest.approx(there[key]["cosines"])
    assert remote.describe()["workers"] == 2


def test_a_worker_killed_mid_task_costs_only_that_task(ray_session, tmp_path):
    marker = tmp_path / "killed-once"

    def dies_once(job, shared):
        if job["kind"] == "trial" and not marker.exists():
            marker.write_text("x")
            os._exit(1)  # the worker process dies in the middle of the trial
        return run_job(job, shared)

    remote = RayExecutor(workers=2)
    results = dict((j["pipeline"], r) for j, r in remote.map_unordered(dies_once, JOBS, remote.share(_shared())))
    assert marker.exists()
    assert all(not r.get("error") for r in results.values()) and len(results) == 2


def test_search_on_ray_chooses_as_in_process(ray_session, tmp_path):
    args = dict(calibration=feeds(24), objective="size", space="int8,fp16,share", seed=0, time_budget=None)
    here = search(small_mlp(), tmp_path / "a.onnx", backend="local", cache_dir=None, **args)
    there = search(small_mlp(), tmp_path / "b.onnx", backend="ray", workers=2, cache_dir=tmp_path / "cache", **args)
    assert there.report["search"]["executor"]["backend"] == "ray" and there.report["search"]["workers"] == 2
    assert there.pipeline == here.pipeline
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_unreachable_cluster_is_one_line_within_30_seconds(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(small_mlp().SerializeToString())
    np.savez(tmp_path / "calib.npz", x=np.stack([f["x"] for f in feeds(12)]))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "onnxopt.cli", "search", str(model), "-o", str(tmp_path / "o.onnx"),
                           "--calib", str(tmp_path / "calib.npz"), "--objective", "size", "--address",
                           "ray://127.0.0.1:9", "--no-cache"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Ray cluster at ray://127.0.0.1:9" in lines[0]
    assert not (tmp_path / "o.onnx").exists()
    with pytest.raises(UsageError, match="expected auto, HOST:PORT"):
        check_reachable("ray://nohost")


def test_onnxopt_never_imports_ray_by_itself():
    code = ("import sys, onnxopt, onnxopt.cli, onnxopt.autocompress; onnxopt.search; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_calibration_statistics_per_shard_as_ray_tasks(ray_session):
    from onnxopt.autocompress.executors import ray_map_shards
    from onnxopt.framework import PassContext

    def quantized(**ctx) -> bytes:
        model = Model.from_proto(small_mlp())
        PassManager("quantize(mode=static,method=minmax)").run(
            model, PassContext(reference=model.copy(), calibration=feeds(16), **ctx))
        return model.to_bytes()

    assert quantized(map_shards=ray_map_shards, shards=4) == quantized()


def _session_threads(job, shared):
    from onnxopt.validate import make_session

    sess = make_session(shared.models["original"])
    return {"threads": sess.get_session_options().intra_op_num_threads}


def test_a_ray_task_runs_onnxruntime_on_the_cpus_it_was_given(ray_session):
    # a session per core in each of two one-CPU tasks would put four spinning threads on
    # two cores: a task's sessions get the one CPU Ray gave it
    remote = RayExecutor(workers=2)
    results = [r for _, r in remote.map_unordered(_session_threads, JOBS, remote.share(_shared()))]
    assert [r["threads"] for r in results] == [1, 1]
