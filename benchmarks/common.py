"""Shared pieces of the benchmarks: machine facts, onnxruntime latency, peak memory in a
child process, markdown tables, and regenerating a README section.

Benchmarks measure ratios side by side in one run and report medians; they are never
tests. Every benchmark prints :func:`machine` first: the CPU model and the flags that
decide int8 speed (avx2, avx512_vnni, amx).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"

__all__ = ["ROOT", "RESULTS", "machine", "ort_latency", "session_seconds", "peak_rss_of", "markdown_table",
           "update_readme", "save_results", "median"]


def machine() -> dict:
    """CPU model, core count and the int8-relevant flags, plus library versions."""
    model, flags = platform.processor() or "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.M)
        model = m.group(1).strip() if m else model
        m = re.search(r"^flags\s*:\s*(.+)$", text, flags=re.M)
        flags = set(m.group(1).split()) if m else set()
    except OSError:
        pass
    import onnx
    import onnxruntime

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "avx2": "avx2" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "amx": any(f.startswith("amx") for f in flags),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "python": platform.python_version(),
    }


def machine_line(info: dict | None = None) -> str:
    info = info or machine()
    flags = ", ".join(f"{k}={'yes' if info[k] else 'no'}" for k in ("avx2", "avx512_vnni", "amx"))
    return (f"{info['cpu']} ({info['cores']} cores; {flags}); onnxruntime {info['onnxruntime']}, "
            f"onnx {info['onnx']}")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _session(model, threads: int, level: str = "all"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    if hasattr(model, "to_bytes"):
        model = model.to_bytes()
    elif hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def ort_latency(models: Mapping[str, object], feeds: Mapping[str, np.ndarray], *, threads: int = 1,
                runs: int = 30, warmup: int = 5) -> dict[str, float]:
    """Median latency (ms) of each model on the same feeds, runs interleaved round-robin so
    that machine noise hits every model alike. ``models`` maps a label to a path, bytes,
    ``ModelProto`` or onnxopt ``Model``."""
    sessions = {k: _session(m, threads) for k, m in models.items()}
    for _ in range(warmup):
        for s in sessions.values():
            s.run(None, dict(feeds))
    times: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions)
    for r in range(runs):
        # Rotate who goes first: the model run right after another one pays for (or gains
        # from) the cache state it left, which skewed fixed-order medians.
        for k in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            sessions[k].run(None, dict(feeds))
            times[k].append((time.perf_counter() - t0) * 1000)
    return {k: median(v) for k, v in times.items()}


def session_seconds(model, *, repeat: int = 5) -> float:
    """Median seconds to create an onnxruntime CPU session (ORT_ENABLE_ALL)."""
    values = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        _session(model, 1)
        values.append(time.perf_counter() - t0)
    return median(values)


def _peak_rss() -> int:
    """This process's peak resident memory in bytes. Linux keeps ``ru_maxrss`` across
    exec, so a spawned child would report at least its parent's peak: VmHWM (per address
    space) is read instead where /proc has it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(fn, args, queue):
    try:
        t0 = time.perf_counter()
        result = fn(*args)
        seconds = time.perf_counter() - t0
        queue.put(("ok", result, seconds, _peak_rss()))
    except BaseException as exc:  # report, do not hang the parent
        queue.put(("error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                   0.0, _peak_rss()))


def peak_rss_of(fn: Callable, *args, timeout: float = 1800) -> dict:
    """Run ``fn(*args)`` in a fresh process; return its result (must pickle), wall
    seconds, peak resident memory in bytes, or the error it raised."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    try:
        status, result, seconds, rss = queue.get(timeout=timeout)
    except Exception:
        proc.kill()
        return {"ok": False, "error": "timed out", "seconds": timeout, "peak_rss": None, "result": None}
    proc.join()
    return {"ok": status == "ok", "error": None if status == "ok" else result,
            "result": result if status == "ok" else None, "seconds": seconds, "peak_rss": rss}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v):
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def update_readme(section: str, text: str, readme: Path = ROOT / "README.md") -> None:
    """Replace the README between ``<!-- bench:SECTION:begin -->`` and ``...:end -->``
    (appending a new section at the end if the markers are absent)."""
    begin, end = f"<!-- bench:{section}:begin -->", f"<!-- bench:{section}:end -->"
    content = readme.read_text()
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in content and end in content:
        content = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, content, flags=re.S)
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    readme.write_text(content)


def save_results(name: str, data: dict) -> Path:
    """Write raw figures to ``benchmarks/results/NAME.json`` (kept in git, small)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "unknown"
