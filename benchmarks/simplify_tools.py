"""The tools of the simplification benchmark, each run on one file in a fresh child process.

``run_tool`` loads a model, simplifies it with onnxopt (a given pipeline) or one of the
peers (onnxoptimizer, onnxsim, onnxslim, with their defaults) and saves it as a user
would; imports happen before the clock starts and before the memory baseline is read.
``isolated`` runs it in a spawned process so that every tool starts from the same clean
interpreter and a peer's crash, exception or hang becomes a row entry of the tables
instead of ending the run. Used by :mod:`benchmarks.simplify`.
"""

from __future__ import annotations

import contextlib
import queue
import resource
import time
import traceback
from pathlib import Path

import onnx

__all__ = ["PEERS", "isolated", "run_tool"]

PEERS = ("onnxoptimizer", "onnxsim", "onnxslim")
TWO_GB = 2**31


def _status(field: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_now() -> int:
    return _status("VmRSS")


def _peak_rss() -> int:
    """Peak resident memory of this process. VmHWM belongs to the address space that exec
    created; ``ru_maxrss`` would also count the parent's pages at fork time."""
    return _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _save_proto(proto: onnx.ModelProto, out: str) -> None:
    """Save a peer's result as a user would: external data when it must."""
    if proto.ByteSize() >= TWO_GB - 2**27:
        onnx.save(proto, out, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=Path(out).name + ".data")
    else:
        onnx.save(proto, out)


def run_tool(tool: str, src: str, out: str, pipeline: str | None) -> dict:
    """Load ``src``, simplify it with ``tool``, save to ``out``. Runs in a child process;
    imports happen before the clock starts and before the memory baseline is read."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    if tool == "onnxopt":
        from onnxopt import Model, PassManager

        manager = PassManager(pipeline or "default")  # imports the pass library
        baseline = _rss_now()
        t0 = time.perf_counter()
        model = Model.load(src)
        result = manager.run(model)
        model.save(out)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "baseline_rss": baseline, "rounds": [g["rounds"] for g in result.groups],
                "converged": result.converged}
    if tool == "onnxoptimizer":
        import onnxoptimizer

        baseline = _rss_now()
        t0 = time.perf_counter()
        proto = onnx.load(src)
        _save_proto(onnxoptimizer.optimize(proto), out)
    elif tool == "onnxsim":
        import onnxsim

        baseline = _rss_now()
        t0 = time.perf_counter()
        proto = onnx.load(src)
        simplified, ok = onnxsim.simplify(proto)
        if not ok:
            raise RuntimeError("onnxsim: its own check failed")
        _save_proto(simplified, out)
    elif tool == "onnxslim":
        import onnxslim

        baseline = _rss_now()
        t0 = time.perf_counter()
        proto = onnx.load(src)
        _save_proto(onnxslim.slim(proto), out)
    else:
        raise ValueError(tool)
    return {"seconds": time.perf_counter() - t0, "baseline_rss": baseline}


def _child(fn, args, q) -> None:
    try:
        result = fn(*args)
        result["peak_rss"] = _peak_rss()
        q.put(("ok", result))
    except BaseException as exc:  # a peer's failure is a row entry
        text = str(exc).strip().splitlines()
        where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        q.put(("error", f"{type(exc).__name__}: {text[0][:160] if text else ''}"
                        + (f" ({Path(where[0].filename).name}:{where[0].lineno})" if where else "")))


def isolated(fn, args, timeout: float) -> dict:
    """Run ``fn(*args)`` in a spawned process; a crash or a timeout is reported, not raised."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, q))
    proc.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                status, value = q.get(timeout=0.5)
                break
            except queue.Empty:
                if not proc.is_alive():
                    try:
                        status, value = q.get(timeout=1)
                        break
                    except queue.Empty:
                        return {"ok": False, "error": f"crashed (exit code {proc.exitcode})"}
                if time.monotonic() > deadline:
                    proc.kill()
                    return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    if status != "ok":
        return {"ok": False, "error": value}
    return {"ok": True, **value}
