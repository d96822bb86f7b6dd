"""onnxopt search with the ``finetune`` family: candidates trained again, the training
preset as a reference point, and training stopped at the search's deadline."""

from __future__ import annotations

import time

import pytest

from onnxopt.autocompress import search
from onnxopt.autocompress.jobs import preset_jobs
from onnxopt.autocompress.space import FINETUNE, Config, pipeline
from onnxopt.autocompress.tasks import Shared, run_job, run_outputs
from tests.search_helpers import feeds, small_mlp

torch = pytest.importorskip("torch", reason="the finetune family needs the 'train' extra")


def test_training_preset_is_measured_only_with_finetune_in_the_space():
    jobs, notes = preset_jobs(["int8", "share"])
    assert "compress" not in {j["preset"] for j in jobs} and {"int8", "fp16"} <= {j["preset"] for j in jobs}
    assert len(notes) == 1 and "compress" in notes[0] and "finetune is not in the space" in notes[0]
    jobs, notes = preset_jobs(["share", "finetune"])
    assert "compress" in {j["preset"] for j in jobs} and not notes


def test_a_finetuned_candidate_trains_before_it_is_stored_in_float16():
    text = pipeline(Config("dc", share=(("w0", 3),), fp16=True, finetune=True))
    assert text.endswith(f",{FINETUNE},fp16")


def _shared(model_bytes: bytes) -> Shared:
    calib, hold = feeds(16), feeds(4, seed=5)
    return Shared(models={"original": model_bytes}, calibration=calib, probe=calib[:2],
                  probe_reference=run_outputs(model_bytes, calib[:2]), holdout=hold,
                  holdout_reference=run_outputs(model_bytes, hold), latency_feed=hold[0], latency_seconds=0.05)


def test_training_that_cannot_finish_by_the_deadline_is_cut_not_shortened():
    shared = _shared(small_mlp().SerializeToString())
    job = {"kind": "trial", "pipeline": "share-weights(bits=2),finetune(steps=1000000,patience=0)",
           "start": "original", "deadline": time.time() + 3}
    started = time.perf_counter()
    result = run_job(job, shared)
    assert time.perf_counter() - started < 60
    assert result["cut"] is True and result["error"].startswith("OutOfTime") and "steps run" in result["error"]
    assert "bytes" not in result or result.get("cosine") is None
    done = run_job({**job, "pipeline": "share-weights(bits=2),finetune(steps=20)", "deadline": time.time() + 600},
                   shared)
    assert "error" not in done and "cut" not in done and done["cosine"] > 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search-ft")
    calls = []

    def counting(job, shared):
        calls.append(job["pipeline"])
        return run_job(job, shared)

    args = dict(calibration=feeds(32), objective="size", space="share,finetune", backend="local", seed=0,
                cache_dir=tmp / "cache", time_budget=None, min_cosine=0.9995)
    result = search(small_mlp(), tmp / "best.onnx", job_fn=counting, **args)
    return result, calls, args, tmp


def test_finetune_family_trains_the_candidates_that_missed_the_floor(trained):
    result, calls, _, _ = trained
    trials = result.report["search"]["trials"]
    tuned = [t for t in trials if t["pipeline"].endswith("," + FINETUNE)]
    assert tuned and all(t["label"].endswith(" + finetune") for t in tuned)
    untuned = {t["pipeline"]: t for t in trials}
    improved = 0
    for t in tuned:
        before = untuned[t["pipeline"][:-len("," + FINETUNE)]]
        assert not before["meets_floor"] and t["cosine"] >= before["cosine"] - 1e-6  # trained or left alone
        improved += t["cosine"] > before["cosine"] + 1e-5
        assert t["bytes"] <= before["bytes"] * 1.01  # and kept the codebooks' size
    assert improved >= 1
    assert any(t["preset"] == "compress" for t in trials)  # the training preset is a reference point


def test_cut_training_is_not_cached_and_runs_again(trained, tmp_path):
    _, _, args, _ = trained
    ran: list[str] = []

    def out_of_time(job, shared):
        ran.append(job["pipeline"])
        if "finetune" in job["pipeline"] or job["pipeline"] == "compress":  # the preset trains too
            job = {**job, "deadline": time.time() - 1}
        return run_job(job, shared)

    cache = tmp_path / "cache"
    first = search(small_mlp(), None, job_fn=out_of_time, **{**args, "cache_dir": cache})
    cut = [t for t in first.report["search"]["trials"] if "finetune" in t["pipeline"] or t["preset"] == "compress"]
    assert cut and all(t["error"] and "OutOfTime" in t["error"] for t in cut)
    ran.clear()
    search(small_mlp(), None, job_fn=out_of_time, **{**args, "cache_dir": cache})
    assert "compress" in ran and all("finetune" in p or p == "compress" for p in ran)
