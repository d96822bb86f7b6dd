"""Two ways to run the same job function: in this process one job at a time, or as Ray
tasks.

Both offer :meth:`share` (put what every job reads somewhere once) and
:meth:`map_unordered` (run jobs, yield each result as it is ready, stop at a deadline;
a job holding ``until`` is not started after that time).
:class:`RayExecutor` starts a local Ray in-process with this machine's cores, or joins a
running cluster (``address="auto"`` or ``ray://HOST:PORT``) without changing it; the
shared data goes into the object store once and every task reads it from there. A worker
that dies mid-task costs only that task: Ray runs it again (``max_retries``). Ray is
imported here only, when a Ray executor is made — never when onnxopt is imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from urllib.parse import urlparse

from ..errors import UsageError

__all__ = ["InProcessExecutor", "RayExecutor", "make_executor", "ray_available", "check_reachable",
           "ray_map_shards", "join_or_start_ray", "CONNECT_TIMEOUT"]

log = logging.getLogger(__name__)

#: Seconds within which an unreachable cluster is reported (the TCP check and ray.init).
CONNECT_TIMEOUT = 25.0
TASK_RETRIES = 3


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


class InProcessExecutor:
    """Runs each job in this process, one after another."""

    backend = "in-process"

    def __init__(self):
        self.workers = 1

    def describe(self) -> dict:
        return {"backend": self.backend, "workers": 1, "address": None, "nodes": 1}

    def share(self, value):
        return value

    def map_unordered(self, fn: Callable, jobs: Sequence[dict], shared, deadline: float | None = None
                      ) -> Iterator[tuple[dict, dict]]:
        for job in jobs:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            if _expired(job, now):
                continue
            yield job, fn(job, shared)

    def close(self) -> None:
        pass


class RayExecutor:
    """Runs jobs as Ray tasks (one CPU each) on a local Ray or a cluster."""

    backend = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None):
        import ray

        self._ray = ray
        self.address = address
        self.started = False
        if ray.is_initialized():
            log.info("search: using the Ray instance already initialised in this process")
        elif address:
            _connect(address)
        else:
            cpus = workers or os.cpu_count() or 1
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR, configure_logging=True)
            self.started = True
        total = int(ray.cluster_resources().get("CPU", 1))
        self.workers = max(1, min(workers, total) if workers else total)
        self._remote_cache: dict[int, object] = {}

    def describe(self) -> dict:
        try:
            nodes = len([n for n in self._ray.nodes() if n.get("Alive")])
        except Exception:  # not every client can list nodes
            nodes = None
        return {"backend": self.backend, "workers": self.workers, "address": self.address, "nodes": nodes}

    def share(self, value):
        return self._ray.put(value)

    def _remote(self):
        if "task" not in self._remote_cache:
            self._remote_cache["task"] = self._ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(_on_ray)
        return self._remote_cache["task"]

    def map_unordered(self, fn: Callable, jobs: Sequence[dict], shared, deadline: float | None = None
                      ) -> Iterator[tuple[dict, dict]]:
        ray = self._ray
        remote = self._remote()
        queue = list(jobs)
        pending: dict = {}
        try:
            while queue or pending:
                # one task per worker in flight: the rest wait here, in order, so that
                # ``workers`` bounds the parallelism even on a larger cluster
                while queue and len(pending) < self.workers:
                    job = queue.pop(0)
                    if not _expired(job, time.monotonic()):
                        pending[remote.remote(fn, job, shared)] = job
                if not pending:
                    continue
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                if timeout == 0.0:
                    return
                done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
                for ref in done:
                    job = pending.pop(ref)
                    yield job, self._result(ref, job)
        finally:
            for ref in pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # already finished or gone
                    pass

    def _result(self, ref, job: dict) -> dict:
        try:
            return self._ray.get(ref)
        except Exception as exc:  # the task failed even after its retries
            line = " ".join(str(exc).split())[:300]
            return {"pipeline": job.get("pipeline"), "kind": job.get("kind"),
                    "error": f"task failed after {TASK_RETRIES} retries: {type(exc).__name__}: {line}"}

    def close(self) -> None:
        if self.started:
            self._ray.shutdown()


def _expired(job: dict, now: float) -> bool:
    """A job that may start only before ``job["until"]`` (a phase's end) and has not."""
    return job.get("until") is not None and now >= job["until"]


def ray_map_shards(fn: Callable, items: Sequence) -> list:
    """``[fn(item) for item in items]`` as Ray tasks, in order: what a
    :class:`~onnxopt.framework.PassContext` takes as ``map_shards`` (calibration
    statistics per shard, merged by the pass). Uses the Ray initialised in this process, or
    starts a local one."""
    import ray

    join_or_start_ray()
    remote = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(fn)
    return ray.get([remote.remote(item) for item in items])


def join_or_start_ray(cpus: int | None = None) -> bool:
    """Use the Ray initialised in this process, or start a local one (with ``cpus`` CPUs,
    default this machine's); True when this call started it (its caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    return True


def _on_ray(fn: Callable, job: dict, shared) -> dict:
    """A Ray task: ``fn(job, shared)`` with onnxruntime held to the CPUs Ray gave the task,
    and the node it ran on."""
    import ray

    from ..validate import session_threads

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    with session_threads(max(1, int(cpus))):
        result = fn(job, shared)
    result["node"] = ray.get_runtime_context().get_node_id()[:12]
    return result


def check_reachable(address: str) -> None:
    """A TCP connection to HOST:PORT (plain or ``ray://``) within the time limit, or a
    clear error."""
    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise UsageError(f"--address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host, port), timeout=min(10.0, CONNECT_TIMEOUT)):
            pass
    except OSError as exc:
        raise UsageError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _native_stderr_muted():
    """Send what native code writes to file descriptor 2 to /dev/null for a while (Python's
    own ``sys.stderr`` is left alone)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _connect(address: str) -> None:
    import ray

    check_reachable(address)
    outcome: dict = {}

    def init():
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
            outcome["ok"] = True
        except BaseException as exc:  # reported in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=init, name="onnxopt-ray-connect", daemon=True)
    with _native_stderr_muted():  # Ray's C++ client logs every failed attempt to stderr
        thread.start()
        thread.join(CONNECT_TIMEOUT)
    if thread.is_alive():
        raise UsageError(f"cannot reach the Ray cluster at {address}: no answer within {CONNECT_TIMEOUT:.0f} s")
    if "error" in outcome:
        exc = outcome["error"]
        line = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UsageError(f"cannot join the Ray cluster at {address}: {line}") from None


def make_executor(backend: str = "auto", workers: int | None = None, address: str | None = None):
    """``local`` (in-process), ``ray``, or ``auto`` (Ray when it is installed)."""
    if backend not in ("auto", "ray", "local"):
        raise UsageError(f"unknown backend '{backend}'; valid: auto, ray, local")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1; got {workers}")
    if backend == "local":
        if address:
            raise UsageError("--address joins a Ray cluster; it does not go with the in-process backend")
        return InProcessExecutor()
    if not ray_available():
        if backend == "ray" or address:
            raise UsageError("Ray is not installed: pip install 'onnxopt[search]'")
        log.info("search: Ray is not installed; jobs run in this process, one at a time")
        return InProcessExecutor()
    if backend == "auto" and workers == 1 and not address:
        return InProcessExecutor()
    return RayExecutor(workers, address)
