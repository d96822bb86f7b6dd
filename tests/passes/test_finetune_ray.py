"""finetune(workers=N): data-parallel training on Ray Train gives what one worker gives —
holdout fidelity and test accuracy within TOLERANCE, the same steps, the same zeros and
codebooks, the same nodes and file size — and joins the Ray already running; the guards:
Ray Train missing (one line naming the extra, exit 2, before training) and bad options.

One local Ray is shared by the module (start-up is slow on a small machine), and the two
trainings (one worker, two workers) are run once and read by several tests."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

from models.digits import accuracy, digits_mlp, digits_split  # noqa: E402
from onnxopt import Model, PassContext, PassManager  # noqa: E402
from onnxopt.errors import PipelineError, UsageError  # noqa: E402
from onnxopt.framework import get_pass  # noqa: E402
from onnxopt.validate import run_model  # noqa: E402
from onnxopt.weights.sites import find_weights  # noqa: E402
from tests.helpers import io_signature, run_pass  # noqa: E402

try:
    import ray.train.torch  # noqa: F401

    RAY_TRAIN = None
except ImportError as exc:  # ray missing, or ray without its train extra (pandas, pyarrow)
    RAY_TRAIN = f"Ray Train is not importable ({exc.__class__.__name__}: {str(exc)[:80]})"

needs_ray_train = pytest.mark.skipif(RAY_TRAIN is not None, reason=RAY_TRAIN or "")

#: |workers=2 - workers=1| allowed for holdout fidelity (mean cosine) and test accuracy:
#: the same steps on the same batches, only the order of float additions differs.
TOLERANCE = 0.01
OPTIONS = {"threads": 1, "batch": 32, "lr": 0.003, "steps": 150}
COMPRESS = "prune-magnitude(sparsity=0.9,scope=global),share-weights(bits=3)"


@pytest.fixture(scope="module")
def digits():
    model = Model.from_proto(digits_mlp())
    x_train, x_test, _, y_test = digits_split()
    calib = [{"input": x_train[i:i + 4]} for i in range(0, 800, 4)]
    student = model.copy()
    PassManager(COMPRESS).run(student, PassContext(reference=model, calibration=calib))
    return model, student, calib, x_test, y_test


@pytest.fixture(scope="module")
def local_ray():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def trained(digits, local_ray):
    model, student, calib, *_ = digits
    ctx = PassContext(reference=model, calibration=calib)
    one = run_pass("finetune", student, ctx, **OPTIONS)
    two = run_pass("finetune", student, ctx, workers=2, **OPTIONS)
    return one, two


def _layer_values(model: Model) -> dict[str, np.ndarray]:
    sites, _ = find_weights(model)
    return {s.name: s.value for s in sites}


@pytest.mark.slow
@needs_ray_train
def test_without_a_running_ray_a_local_one_is_started_and_shut_down(digits):
    import ray

    if ray.is_initialized():  # first in the module: the module's shared Ray is not up yet
        pytest.skip("a Ray is running in this process")
    model, student, calib, *_ = digits
    ran = run_pass("finetune", student, PassContext(reference=model, calibration=calib),
                   workers=2, **{**OPTIONS, "steps": 10})
    assert ran.stats["workers"] == 2 and ran.stats["steps_run"] == 10
    assert not ray.is_initialized()


@needs_ray_train
def test_two_workers_reach_what_one_reaches_within_the_tolerance(digits, trained, local_ray):
    model, student, calib, x_test, y_test = digits
    one, two = trained
    a, b = one.stats, two.stats
    assert (a["workers"], a["worker_batch"]) == (1, 32) and (b["workers"], b["worker_batch"]) == (2, 16)
    assert b["ray_seconds"] > 0 and "ray_seconds" not in a
    assert one.modified and two.modified and a["kept"] and b["kept"]
    assert b["fidelity_after"] > b["fidelity_before"] + 0.02 and b["fidelity_before"] == a["fidelity_before"]
    assert abs(b["fidelity_after"] - a["fidelity_after"]) <= TOLERANCE
    acc_one, acc_two = accuracy(one.model, x_test, y_test), accuracy(two.model, x_test, y_test)
    assert acc_two > accuracy(student, x_test, y_test) + 0.02
    assert abs(acc_two - acc_one) <= TOLERANCE
    # the same schedule: the same steps, evaluations, and (to float rounding) the same curve
    assert b["steps_run"] == a["steps_run"] and b["best_step"] == a["best_step"]
    assert b["history"]["holdout_step"] == a["history"]["holdout_step"]
    assert np.allclose(b["history"]["loss"], a["history"]["loss"], rtol=1e-3, atol=1e-5)
    # onnxruntime on both written models, on unseen rows: the same predictions, nearly the same logits
    feeds = {"input": np.ascontiguousarray(x_test[:64])}
    y1, y2 = run_model(one.model, feeds)["logits"], run_model(two.model, feeds)["logits"]
    assert np.array_equal(y1.argmax(-1), y2.argmax(-1))
    assert np.max(np.abs(y1 - y2)) <= 1e-3 * np.max(np.abs(y1))
    assert local_ray.is_initialized()  # the running Ray was joined, not shut down


@needs_ray_train
def test_two_workers_keep_zeros_codebooks_nodes_and_file_size(digits, trained):
    _, student, *_ = digits
    one, two = trained
    before, after, single = _layer_values(student), _layer_values(two.model), _layer_values(one.model)
    for name, old in before.items():
        new = after[name]
        assert np.array_equal(old == 0, new == 0), f"{name}: zeros moved"
        pairs = {(float(x), float(y)) for x, y in zip(old.ravel(), new.ravel())}
        assert len(pairs) == len(np.unique(old)) == len(np.unique(new)) <= 8, f"{name}: clusters changed"
        assert not np.array_equal(old, new)
        assert np.allclose(new, single[name], atol=1e-4), f"{name}: far from the one-worker result"
    assert [(n.op, n.name) for n in two.model.graph.nodes] == [(n.op, n.name) for n in one.model.graph.nodes]
    assert io_signature(two.model) == io_signature(student)
    assert len(two.model.to_bytes()) == len(one.model.to_bytes())


def test_options_are_checked_at_construction():
    with pytest.raises(PipelineError, match="workers"):
        get_pass("finetune")(workers=0)
    with pytest.raises(PipelineError, match="workers=3 is more than batch=2"):
        get_pass("finetune")(workers=3, batch=2)
    assert get_pass("finetune")(workers=4, batch=0).opts.workers == 4  # batch=0: every sample


def test_without_ray_train_one_line_names_the_extra_before_training(digits, monkeypatch):
    model, student, calib, *_ = digits
    monkeypatch.setitem(sys.modules, "ray.train.torch", None)
    ctx = PassContext(reference=model, calibration=calib)
    with pytest.raises(UsageError, match=r"workers=2 needs Ray Train .*pip install 'onnxopt\[search\]'") as err:
        run_pass("finetune", student, ctx, workers=2, **OPTIONS)
    assert "\n" not in str(err.value) and err.value.exit_code == 2


def test_without_ray_train_the_command_line_exits_2(digits, monkeypatch, tmp_path, capsys):
    from onnxopt.cli import main

    model, _, calib, *_ = digits
    src, out, npz = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "c.npz"
    model.save(src)
    np.savez(npz, input=np.concatenate([c["input"] for c in calib[:20]]))
    monkeypatch.setitem(sys.modules, "ray.train.torch", None)
    code = main(["optimize", str(src), "-o", str(out), "--calib", str(npz), "-q",
                 "-p", "finetune(workers=2,batch=4,steps=1)"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert len(err.splitlines()) == 1 and "onnxopt[search]" in err


@needs_ray_train
def test_more_workers_than_the_cluster_has_cpus_is_one_line_not_a_wait(digits, local_ray):
    model, student, calib, *_ = digits
    cpus = int(local_ray.cluster_resources().get("CPU", 0))
    with pytest.raises(UsageError, match=f"workers={cpus + 1} needs {cpus + 1} CPUs in the Ray cluster; it has {cpus}"):
        run_pass("finetune", student, PassContext(reference=model, calibration=calib), workers=cpus + 1, **OPTIONS)


@pytest.mark.slow
@needs_ray_train
def test_ragged_samples_one_by_one_on_two_workers_match_one_worker(local_ray):
    from models.transformer import token_feeds, transformer

    model = Model.from_proto(transformer())
    calib = token_feeds(10, vocab=128, low=5, seed=0)  # sequences of different lengths: no stacking
    student = model.copy()
    PassManager("prune-magnitude(sparsity=0.6)").run(student, PassContext(reference=model, calibration=calib))
    ctx = PassContext(reference=model, calibration=calib)
    options = {"threads": 1, "steps": 6, "batch": 4, "lr": 0.002}
    one = run_pass("finetune", student, ctx, **options)
    two = run_pass("finetune", student, ctx, workers=2, **options)
    assert not two.stats["batched"] and two.stats["worker_batch"] == 2 and two.modified
    assert abs(two.stats["fidelity_after"] - one.stats["fidelity_after"]) <= TOLERANCE
    assert two.stats["fidelity_after"] > two.stats["fidelity_before"]
    old, a, b = _layer_values(student), _layer_values(one.model), _layer_values(two.model)
    for name, value in old.items():
        assert np.array_equal(value == 0, b[name] == 0) and np.allclose(a[name], b[name], atol=1e-4)
