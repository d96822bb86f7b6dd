"""The tools of the simplification benchmark, each run on one file in a fresh child process.

``run_tool`` loads a model, simplifies it with onnxopt (a given pipeline) or one of the
peers (onnxoptimizer, onnxsim, onnxslim, with their defaults) and saves it as a user
would; imports happen before the clock starts and before the memory baseline is read.
``whole_process`` runs it as a process of its own — a fresh interpreter that imports only
the tool, as a user's command would — and measures that whole process too: its wall time
from start to exit and its CPU time, imports included, beside the in-process figures.
``isolated`` runs any function in a spawned process. Either way a crash, an exception or
a hang becomes a row entry of the tables instead of ending the run. Used by
:mod:`benchmarks.simplify`.
"""

from __future__ import annotations

import contextlib
import json
import queue
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

import onnx

__all__ = ["PEERS", "interpreter_rss", "isolated", "run_tool", "whole_process"]

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
        q.put(("error", _error(exc)))


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


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    return (f"{type(exc).__name__}: {text[0][:160] if text else ''}"
            + (f" ({Path(where[0].filename).name}:{where[0].lineno})" if where else ""))


def whole_process(tool: str, src: str, out: str, pipeline: str | None, timeout: float) -> dict:
    """``run_tool`` in a fresh interpreter of its own (``python -m benchmarks.simplify_tools``),
    with ``process_seconds`` (wall, start to exit) and ``process_cpu`` (user + system of the
    whole process, imports included) beside its in-process figures; a crash or a timeout
    is reported, not raised."""
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "benchmarks.simplify_tools", tool, src, out, pipeline or ""]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    seconds = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except ValueError:
        result = None
    if not isinstance(result, dict):
        return {"ok": False, "error": f"crashed (exit code {proc.returncode})"}
    if "error" in result:
        return {"ok": False, "error": result["error"]}
    return {"ok": True, **result, "process_seconds": seconds}


def interpreter_rss() -> int:
    """Peak resident memory of a bare interpreter that imported onnx and onnxruntime: the
    baseline whole-process memory is judged against."""
    code = "import onnx, onnxruntime\nfrom benchmarks.simplify_tools import _peak_rss\nprint(_peak_rss())"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    return int(out.stdout.strip().splitlines()[-1])


def _main(argv: list[str]) -> None:
    tool, src, out, pipeline = argv
    try:
        result = run_tool(tool, src, out, pipeline or None)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result.update(peak_rss=_peak_rss(), process_cpu=usage.ru_utime + usage.ru_stime)
    except BaseException as exc:  # a peer's failure is a row entry
        result = {"error": _error(exc)}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
