"""``finetune(workers=N)``: the training loop of :mod:`.train`, data-parallel on Ray Train.

Ray Train's ``TorchTrainer`` starts ``N`` worker processes (one CPU each) joined in a
``torch.distributed`` group over gloo. What they need — the student model's bytes, the
names the plan is made from, the samples with the teacher's targets, the settings — goes
into Ray's object store once and every worker reads it from there. Each worker builds the
same student (the model loaded from the bytes, its training plan, the interpreted
module), so masks, codebooks, channel maps and Q/DQ grids are kept by the same code as in
one process, and runs :func:`.train.run` with its :class:`~.train.Shard`. Rank 0 sends
back its outcome (the best state and the figures) as a Ray Train checkpoint; the pass
writes it back through the same write-back and check as in one process.

The Ray initialised in this process is used when there is one (a cluster joined with
``ray.init(address=...)`` included); otherwise a local Ray is started for the run, with
enough CPUs for the workers, and shut down after it. The checkpoint goes through a
temporary folder of this machine, so on a cluster of several machines the workers' rank 0
must share that folder's file system.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from collections.abc import Sequence

import torch

from onnxopt.errors import PassFailed, UsageError
from onnxopt.model import Model

from . import train
from .loss import Term
from .module import GraphModule
from .params import TrainPlan, plan_training

__all__ = ["run"]

_OUTCOME = "outcome.pkl"


def run(model: Model, plan: TrainPlan, options: dict, terms: list[Term], train_set: train.Samples,
        hold_set: train.Samples, settings: train.Settings, workers: int, name: str) -> tuple[train.Outcome, float]:
    """Train on ``workers`` Ray Train workers; rank 0's outcome, and the wall time of the
    Ray Train run (workers' start-up included). ``options`` holds ``include``, ``exclude``,
    ``keep`` (the tensors the module keeps) and ``threads`` (torch threads per worker)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from onnxopt.autocompress.executors import join_or_start_ray

    started = join_or_start_ray(max(os.cpu_count() or 1, workers))
    try:
        cpus = float(ray.cluster_resources().get("CPU", 0))
        if cpus < workers:
            raise UsageError(f"{name}: workers={workers} needs {workers} CPUs in the Ray cluster; it has {cpus:g}")
        job = dict(options, model=model.to_bytes(), terms=terms, train=train_set, hold=hold_set,
                   settings=settings, shapes=[leaf.value.shape for leaf in plan.leaves])
        config = {"job": ray.put(job)}
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="onnxopt-finetune-") as storage:
            trainer = TorchTrainer(
                _worker, train_loop_config=config,
                scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
                torch_config=TorchConfig(backend="gloo"),
                run_config=RunConfig(name="finetune", storage_path=storage,
                                     failure_config=FailureConfig(max_failures=0)))
            try:
                result = trainer.fit()
            except Exception as exc:  # Ray Train wraps the worker's error
                line = " ".join(str(exc).split())[:300] or type(exc).__name__
                raise PassFailed(name, f"data-parallel training on {workers} workers failed: {line}") from None
            if result.checkpoint is None:
                raise PassFailed(name, "data-parallel training returned no state from rank 0")
            with result.checkpoint.as_directory() as folder:
                with open(os.path.join(folder, _OUTCOME), "rb") as f:
                    outcome = pickle.load(f)
        return outcome, time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()


def _student(job: dict) -> GraphModule:
    """The student as the driver built it, from the model's bytes."""
    model = Model.load(job["model"])
    plan = plan_training(model, job["include"], job["exclude"])
    shapes: Sequence[tuple] = [leaf.value.shape for leaf in plan.leaves]
    if list(shapes) != list(job["shapes"]):
        raise RuntimeError("the worker's training plan differs from the driver's (model bytes did not round-trip)")
    return GraphModule(model, plan, keep=job["keep"])


def _worker(config: dict) -> None:
    """One Ray Train worker: build the student, train on this rank's shards; rank 0
    reports the outcome as a checkpoint."""
    import ray
    import ray.train

    job = ray.get(config["job"])
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    module = _student(job)
    context = ray.train.get_context()
    shard = train.Shard(context.get_world_rank(), context.get_world_size())
    outcome = train.run(module, job["terms"], job["train"], job["hold"], job["settings"],
                        lambda n=1, note=None: None, shard)
    with tempfile.TemporaryDirectory(prefix="onnxopt-finetune-rank0-") as folder:
        checkpoint = None
        if shard.rank == 0:
            with open(os.path.join(folder, _OUTCOME), "wb") as f:
                pickle.dump(outcome, f)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({"steps_run": outcome.steps_run}, checkpoint=checkpoint)
