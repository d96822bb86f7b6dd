"""The fuzz campaign: cases through the command line, each held to the contract.

The contract for every case, whatever the model: the command ends with exit 0, 1 or 2
within the time limit; stderr holds no traceback and nothing but our own one-line
messages (no onnxruntime log, no stray warnings); when it fails, exactly one
``onnxopt: error:`` line; the input files are unchanged; the output exists only after
success (or ``--force``) and then loads; no temporary file is left behind.

Cases run in worker processes (:mod:`tests.fuzz.worker`) that call ``main`` in-process;
every ``fresh_every``-th case runs the console entry point in a new process instead.
A case past its time limit kills its worker (a hang); a worker that dies is a crash.
Each failure gets a signature (the function that raised, the kind of stray output ...);
the first case of each signature is saved as a reproducer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests.fuzz.cases import Case, make_case, seed_corpus

__all__ = ["Finding", "Campaign", "check_case", "run_campaign"]

ROOT = Path(__file__).resolve().parents[2]
#: Files a case may leave in its model folder besides the inputs.
_OUTPUTS = {"out.onnx", "out.onnx.data", "report.json"}
_OURS = re.compile(r"^onnxopt: ")


@dataclass
class Finding:
    """A broken promise: its signature, the case that showed it first, and how many did."""

    signature: str
    detail: str
    case: str
    argv: list[str]
    count: int = 1


@dataclass
class Campaign:
    cases: int = 0
    seconds: float = 0.0
    exits: dict[str, int] = field(default_factory=dict)
    findings: dict[str, Finding] = field(default_factory=dict)
    slowest: tuple[float, str] = (0.0, "")
    #: failures on models that are not valid ONNX, turned into exit 2 by the command line
    invalid_input_failures: dict[str, int] = field(default_factory=dict)
    #: cases whose validation failed (exit 1): (case, the error line)
    validation_failures: list[tuple[str, str]] = field(default_factory=list)

    def add(self, signature: str, detail: str, case: Case) -> bool:
        """Record a failure; True if its signature is new."""
        f = self.findings.get(signature)
        if f is not None:
            f.count += 1
            return False
        self.findings[signature] = Finding(signature, detail, case.describe(), case.argv)
        return True

    def summary(self) -> dict:
        return {"cases": self.cases, "seconds": round(self.seconds, 1), "exits": dict(sorted(self.exits.items())),
                "distinct_failures": len(self.findings),
                "invalid_input_failures": dict(sorted(self.invalid_input_failures.items())),
                "validation_failures": self.validation_failures, "slowest": [round(self.slowest[0], 2), self.slowest[1]],
                "findings": [f.__dict__ for f in self.findings.values()]}


class Worker:
    """One worker process; ``run`` returns its reply, or None after a hang or crash
    (with ``why`` set)."""

    def __init__(self, memory_mb: int, log_path: Path):
        self.memory_mb = memory_mb
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.why = ""
        self._buf = b""

    def _start(self) -> None:
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED="0")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz.worker", str(self.memory_mb)],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env)
        log.close()
        self._buf = b""
        ready = self._read_line(120)
        if ready is None:
            raise RuntimeError(f"fuzz worker did not start: {self.why}")

    def _read_line(self, timeout: float) -> dict | None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.why = f"no answer within {timeout:.0f} s"
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                code = self.proc.wait()
                self.why = f"worker died (exit {code}{', signal ' + str(-code) if code < 0 else ''})"
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def run(self, folder: Path, argv: list[str], timeout: float) -> dict | None:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps({"folder": str(folder), "argv": argv}) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.why = "worker died before the case"
            self.stop()
            return None
        reply = self._read_line(timeout)
        if reply is None:
            self.stop()
        return reply

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None


def run_fresh(folder: Path, argv: list[str], timeout: float) -> dict | None:
    """The case through the console entry point in a new process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    try:
        with open(folder / "stdout.txt", "wb") as out, open(folder / "stderr.txt", "wb") as err:
            proc = subprocess.run([sys.executable, "-m", "onnxopt.cli", *argv], cwd=folder, stdout=out,
                                  stderr=err, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    rc = proc.returncode
    return {"rc": rc if rc >= 0 else f"signal {-rc}", "seconds": time.perf_counter() - t0, "signature": ""}


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "m").iterdir())
            if p.is_file() and not p.is_symlink()}


def _normalize(line: str) -> str:
    line = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", line)
    line = re.sub(r"\d+", "#", line)
    return line[:90]


def check_case(case: Case, reply: dict, before: dict[str, str]) -> list[tuple[str, str]]:
    """The broken promises of one finished case, as (signature, detail) pairs."""
    problems: list[tuple[str, str]] = []
    rc = reply["rc"]
    stderr = (case.folder / "stderr.txt").read_text(errors="replace")
    stdout = (case.folder / "stdout.txt").read_text(errors="replace")
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if rc not in (0, 1, 2):
        sig = reply.get("signature") or f"exit {rc}"
        problems.append((f"exit {rc}: {sig}", lines[-1][:300] if lines else ""))
    if "Traceback" in stderr + stdout:
        problems.append(("traceback", stderr[-300:]))
    foreign = [ln for ln in lines if not _OURS.match(ln)]
    if foreign and rc in (0, 1, 2):
        problems.append((f"stray stderr: {_normalize(foreign[0])}", "\n".join(foreign[:5])[:300]))
    errors = [ln for ln in lines if ln.startswith("onnxopt: error: ")
              or ln.startswith("onnxopt: validation failed")]
    if rc in (1, 2) and len(errors) != 1:
        problems.append((f"exit {rc} with {len(errors)} error lines", stderr[-300:]))
    if rc == 0 and errors:
        problems.append(("exit 0 with an error line", errors[0][:300]))
    if rc == 1 and case.argv[0] == "optimize" and _exact_pipeline(case.argv) and errors \
            and not _random_ops(case):
        what = "wrong output" if "output '" in errors[0] else "a result onnxruntime cannot run"
        problems.append((f"exact pipeline: {what}", errors[0][:300]))
    hidden = [ln for ln in lines if re.search(r"pass \S+ raised \(", ln)]
    if hidden and not _invalid(case):  # a pass that raises on a valid model is a bug, rolled back or not
        problems.append((f"pass raised under --verify-each: {_normalize(hidden[0])}", hidden[0][:300]))
    after = _hashes(case.folder)
    for name, digest in before.items():
        if after.get(name) != digest:
            problems.append((f"input {name} modified", ""))
    leftovers = sorted(set(after) - set(before) - _OUTPUTS)
    if leftovers:
        problems.append(("files left behind", ", ".join(leftovers)))
    out = case.folder / "m" / "out.onnx"
    forced = "--force" in case.argv and rc == 1
    if case.argv[0] == "optimize":
        if rc == 0 or forced:
            problem = _output_problem(out)
            if problem:
                problems.append((f"output unreadable: {_normalize(problem)}", problem[:300]))
        elif out.exists():
            problems.append((f"output written although exit {rc}", ""))
    return problems


_LOSSY = ("prune", "share-weights", "fp16", "quantize", "int8", "int4", "merge-neurons", "reconstruct", "distill")


def _exact_pipeline(argv: list[str]) -> bool:
    for flag in ("-p", "--preset"):
        if flag in argv:
            text = argv[argv.index(flag) + 1]
            return not any(word in text for word in _LOSSY)
    return True


def _random_ops(case: Case) -> bool:
    """Whether the model draws random numbers (two runs differ: validation cannot match)."""
    import onnx

    from tests.fuzz.mutate import graphs_of

    try:
        proto = onnx.load(case.folder / case.argv[1], load_external_data=False)
    except Exception:
        return False
    return any(n.op_type.startswith("Random") or n.op_type in ("Bernoulli", "Multinomial")
               for g in graphs_of(proto.graph) for n in g.node)


def _invalid(case: Case) -> bool:
    from onnxopt.diagnose import why_invalid

    return bool(why_invalid(case.folder / case.argv[1]))


def _invalid_input_failure(case: Case) -> str:
    """What failed on an invalid model, when the command line said so (exit 2)."""
    path = case.folder / "stderr.txt"
    text = path.read_text(errors="replace") if path.exists() else ""
    m = re.search(r"not a valid ONNX model \((\S+?)[: ].*; on it, (.*)$", text, re.M)
    if not m:
        return ""
    what = re.sub(r"failed: .*", "failed", m.group(2))
    return f"{m.group(1)} / {_normalize(what)[:60]}"


def _output_problem(out: Path) -> str:
    if not out.exists():
        return "no output file after success"
    try:
        from onnxopt import Model

        Model.load(out)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def run_campaign(numbers: range | list[int], *, root: Path, workers: int = 2, timeout: float = 60.0,
                 memory_mb: int = 4096, fresh_every: int = 25, lossy: bool = True, real: list[str] | None = None,
                 node_cases: int = 60,
                 on_finding: Callable[[Finding, Case], None] | None = None, verbose: bool = False) -> Campaign:
    """Run cases ``numbers`` and return the tally. Reproducers of new findings are saved
    under ``root/findings``."""
    root.mkdir(parents=True, exist_ok=True)
    corpus = seed_corpus(real=real, node_cases=node_cases)
    campaign = Campaign()
    lock = threading.Lock()
    started = time.perf_counter()
    pool = [Worker(memory_mb, root / f"worker-{i}.log") for i in range(workers)]
    free = list(pool)

    def one(number: int) -> None:
        with lock:
            worker = free.pop()
        try:
            case = make_case(corpus, number, root / "cases", lossy=lossy)
            case.write()
            before = _hashes(case.folder)
            fresh = fresh_every > 0 and number % fresh_every == 0
            reply = run_fresh(case.folder, case.argv, timeout) if fresh else worker.run(case.folder, case.argv, timeout)
            if reply is None:
                why = "hang" if fresh or worker.why.startswith("no answer") else worker.why
                problems = [(f"{why.split(' (')[0]}: {case.argv[0]} on {case.seed_name.split(':')[0]}",
                             f"{why}; {case.describe()}")]
                rc = "hang" if why == "hang" or why.startswith("no answer") else "crash"
            else:
                problems = check_case(case, reply, before)
                rc = str(reply["rc"])
            net = _invalid_input_failure(case)
            if reply is not None and reply["rc"] == 1 and case.argv[0] == "optimize":
                err = (case.folder / "stderr.txt").read_text(errors="replace").strip().splitlines()
                with lock:
                    campaign.validation_failures.append((case.describe(), err[-1][:300] if err else ""))
            with lock:
                if net:
                    campaign.invalid_input_failures[net] = campaign.invalid_input_failures.get(net, 0) + 1
                campaign.cases += 1
                campaign.exits[rc] = campaign.exits.get(rc, 0) + 1
                if reply is not None and reply["seconds"] > campaign.slowest[0]:
                    campaign.slowest = (reply["seconds"], case.describe())
                for sig, detail in problems:
                    if campaign.add(sig, detail, case):
                        case.save_reproducer(root / "findings" / f"{len(campaign.findings):03d}")
                        shutil.copy(case.folder / "stderr.txt", root / "findings" / f"{len(campaign.findings):03d}")
                        if (case.folder / "debug.txt").exists():
                            shutil.copy(case.folder / "debug.txt",
                                        root / "findings" / f"{len(campaign.findings):03d}")
                        if on_finding:
                            on_finding(campaign.findings[sig], case)
                if verbose:
                    print(f"[{campaign.cases}] {case.describe()[:150]} -> {rc}", flush=True)
            if not problems:
                shutil.rmtree(case.folder, ignore_errors=True)
        finally:
            with lock:
                free.append(worker)

    try:
        with ThreadPoolExecutor(workers) as ex:
            for fut in [ex.submit(one, n) for n in numbers]:
                fut.result()
    finally:
        for w in pool:
            w.stop()
    campaign.seconds = time.perf_counter() - started
    return campaign
