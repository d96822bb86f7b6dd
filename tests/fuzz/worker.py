"""A long-lived process that runs fuzz cases through ``onnxopt.cli.main`` in-process.

The runner starts it (``python -m tests.fuzz.worker``), sends one JSON line per case
(``{"folder": ..., "argv": [...]}``) and reads one JSON line back (``{"rc": ...,
"signature": ...}``); it kills the worker when a case runs past its time limit or the
worker dies, and starts a new one. Running in-process saves the interpreter start-up
and imports of a fresh process per case; the process boundary still catches hangs and
crashes.

For each case the worker moves into the case's folder and points file descriptors 1
and 2 at files there, so that everything reaching the terminal — onnxruntime's own
C++ log included — is what the oracle reads. When a case exits 3 it is run again with
``--debug`` to name the function that raised: that name is the case's signature, so
that a thousand cases that hit one bug count as one failure.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _reset_logging() -> None:
    """Each case starts as a fresh process would: no handlers, level WARNING."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.WARNING)


def _innermost(exc: BaseException) -> BaseException:
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        exc = nxt
    return exc


def signature_of(exc: BaseException) -> str:
    """``Type at file:function`` of the innermost frame of our code that raised."""
    exc = _innermost(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    code = (str(ROOT / "onnxopt"), str(ROOT / "passes"))
    ours = [f for f in frames if f.filename.startswith(code)]
    where = ours[-1] if ours else (frames[-1] if frames else None)
    place = f"{os.path.relpath(where.filename, ROOT)}:{where.name}" if where else "?"
    if ours and frames and frames[-1] is not ours[-1]:  # raised inside a library we call
        place += f" (in {Path(frames[-1].filename).name}:{frames[-1].name})"
    return f"{type(exc).__name__} at {place}"


def run_case(folder: str, argv: list[str]) -> dict:
    from onnxopt.cli import main

    os.chdir(folder)
    _reset_logging()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    t0 = time.perf_counter()
    with open("stdout.txt", "wb") as out, open("stderr.txt", "wb") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            rc = main(list(argv))
        except SystemExit as exc:  # argparse --help/--version
            rc = exc.code if isinstance(exc.code, int) else 0
        except BaseException as exc:  # main itself let something through: that is a finding
            rc = -1
            err.write(f"escaped main: {signature_of(exc)}\n".encode())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    seconds = time.perf_counter() - t0
    signature = ""
    if rc == 3:
        signature = _debug_signature(argv)
    return {"rc": rc, "seconds": seconds, "signature": signature}


def _debug_signature(argv: list[str]) -> str:
    from onnxopt.cli import main

    _reset_logging()
    with open("debug.txt", "wb") as f, open(os.devnull, "wb") as null:
        saved = os.dup(1), os.dup(2)
        os.dup2(null.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            main(list(argv) + ["--debug", "-q"])
            found = "exit 3 (no exception under --debug)"
        except BaseException as exc:
            found = signature_of(exc)
            f.write("".join(traceback.format_exception(exc)).encode())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    return found


def serve(memory_mb: int) -> None:
    if memory_mb > 0:
        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # nothing else may write on the channel: fd 1 goes to the worker's log
    import onnxopt.cli  # noqa: F401  (imported once, before the first case is timed)

    channel.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = run_case(request["folder"], request["argv"])
        finally:
            os.chdir(ROOT)
        channel.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
