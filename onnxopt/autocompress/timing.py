"""Latency of a candidate against the original, measured so that parallel trials do not
disturb each other.

A timing holds one CPU core of this machine for its whole duration — an exclusive lock
file per core, shared by every process of the machine (in-process trials and Ray workers
alike) — and runs pinned to it. Two timings therefore never share a core, whatever the
number of workers. Both models run with one onnxruntime thread, interleaved run by run
(who goes first alternates), in a few rounds; the figure is the median of the rounds'
ratios of medians.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

__all__ = ["core_slot", "latency_ratio"]

log = logging.getLogger(__name__)

LOCK_DIR = Path(tempfile.gettempdir()) / "onnxopt-search-cores"
#: The cores this process may run on, read before any timing pins a thread (a thread
#: started inside a timing would otherwise see only the held core).
CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


@contextlib.contextmanager
def core_slot(poll: float = 0.05) -> Iterator[int | None]:
    """Hold a free core of this machine (waiting for one) and pin the calling thread to it;
    yields the core number, or None where affinity cannot be set."""
    if not hasattr(os, "sched_setaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    cores = CORES or sorted(before)
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    handle = None
    core = None
    while handle is None:
        for c in cores:
            f = open(LOCK_DIR / f"core-{c}.lock", "a+")  # noqa: SIM115 - held until released below
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            handle, core = f, c
            break
        if handle is None:
            time.sleep(poll)
    try:
        os.sched_setaffinity(0, {core})
        yield core
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, before)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def latency_ratio(original: bytes, candidate: bytes, feed: Mapping[str, np.ndarray], *,
                  target_seconds: float = 1.0, min_runs: int = 7, max_runs: int = 500,
                  warmup: int = 2, rounds: int = 3) -> dict:
    """Latency of ``candidate`` over ``original``, both on one onnxruntime thread,
    interleaved, on a core held for the purpose: the median over ``rounds`` rounds of the
    ratio of the two medians (a stall of the machine during one round does not decide the
    figure), and the medians in ms over all runs."""
    from ..validate import make_session

    feed = dict(feed)
    ref = make_session(original, threads=1)
    cand = make_session(candidate, threads=1)
    ratios = []
    times: tuple[list[float], list[float]] = ([], [])
    runs = 0
    with core_slot() as core:
        for _ in range(warmup):
            ref.run(None, feed)
            cand.run(None, feed)
        for _ in range(rounds):
            this: tuple[list[float], list[float]] = ([], [])
            started = time.perf_counter()
            n = 0
            while n < max_runs // rounds and (n < min_runs or time.perf_counter() - started < target_seconds / rounds):
                pair = ((0, ref), (1, cand)) if n % 2 == 0 else ((1, cand), (0, ref))
                for slot, sess in pair:
                    t0 = time.perf_counter()
                    sess.run(None, feed)
                    this[slot].append((time.perf_counter() - t0) * 1000.0)
                n += 1
            runs += n
            ratios.append(float(np.median(this[1]) / max(np.median(this[0]), 1e-9)))
            times[0].extend(this[0])
            times[1].extend(this[1])
    return {"original_ms": float(np.median(times[0])), "candidate_ms": float(np.median(times[1])),
            "latency_ratio": float(np.median(ratios)), "round_ratios": ratios, "runs": runs, "core": core}
