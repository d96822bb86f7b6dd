"""Coverage-guided fuzzing with atheris (libFuzzer for Python), an optional extra.

Inputs are model files. libFuzzer keeps an input when it reaches code of ``onnxopt``
that no earlier input reached; the custom mutator mutates the structure of the model
(:mod:`tests.fuzz.mutate`) most of the time and its bytes otherwise, so that the
campaign explores what the mutators can express, guided by coverage. Each input runs
``onnxopt optimize`` in-process (or ``inspect`` for one input in eight); an exit code
other than 0, 1 or 2 raises, and libFuzzer saves the input as ``crash-*`` in the
working folder. Hangs are libFuzzer's ``-timeout``.

    pip install atheris
    python -m tests.fuzz atheris -- -max_total_time=600 -timeout=60
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import sys
import tempfile
from pathlib import Path

__all__ = ["run_atheris"]


def _instrumented_imports(atheris) -> None:
    """Import every module of onnxopt (passes included) under atheris' instrumentation;
    lazily imported modules would otherwise run unobserved."""
    import pkgutil

    with atheris.instrument_imports(include=["onnxopt"]):
        import onnxopt.passes

        import onnxopt
        import onnxopt.cli

        for pkg in (onnxopt, onnxopt.passes):
            for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                if info.name.endswith(("html_report", "plots")):
                    continue
                with contextlib.suppress(Exception):
                    __import__(info.name)


def run_atheris(libfuzzer_args: list[str], *, root: Path) -> int:
    try:
        import atheris
    except ImportError:
        print("atheris is not installed: `pip install atheris` (an optional extra) for coverage-guided fuzzing",
              file=sys.stderr)
        return 2
    from tests.fuzz.cases import seed_corpus
    from tests.fuzz.mutate import mutate, mutate_bytes

    root.mkdir(parents=True, exist_ok=True)
    corpus_dir = root / "atheris-corpus"
    corpus_dir.mkdir(exist_ok=True)
    seeds = seed_corpus(node_cases=40, real=["ppocr-cls"])
    for i, s in enumerate(seeds):
        (corpus_dir / f"seed-{i:03d}").write_bytes(s.data)
    work = Path(tempfile.mkdtemp(prefix="atheris-", dir=root))
    _instrumented_imports(atheris)
    import onnx

    from onnxopt.cli import main

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.25:
            return atheris.Mutate(data, max_size)
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(data)
        except Exception:
            proto.ParseFromString(rng.choice(seeds).data)
        if rng.random() < 0.8:
            mutate(proto, rng)
            out = proto.SerializeToString()
        else:
            out, _ = mutate_bytes(proto.SerializeToString(), rng)
        return out[:max_size]

    counter = [0]

    def one_input(data: bytes) -> None:
        counter[0] += 1
        model = work / "model.onnx"
        model.write_bytes(data)
        out = work / "out.onnx"
        if out.exists():
            out.unlink()
        argv = ["inspect", str(model)] if counter[0] % 8 == 0 else \
            ["optimize", str(model), "-o", str(out), "--runs", "0", "-q"]
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = main(argv)
        if rc not in (0, 1, 2):
            raise RuntimeError(f"exit {rc}: {err.getvalue().strip()[-500:]}")
        if "Traceback" in err.getvalue():
            raise RuntimeError(f"traceback on stderr: {err.getvalue()[-500:]}")

    args = [sys.argv[0], str(corpus_dir), f"-artifact_prefix={root}{os.sep}", "-rss_limit_mb=6144",
            "-timeout=60", *libfuzzer_args]
    atheris.Setup(args, one_input, custom_mutator=mutator)
    atheris.Fuzz()
    return 0
