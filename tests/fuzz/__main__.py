"""``python -m tests.fuzz``: the fuzz campaigns from the command line.

    python -m tests.fuzz cli --cases 400             # mutated models through the CLI
    python -m tests.fuzz diff --graphs 1000          # random graphs, default vs original
    python -m tests.fuzz atheris -- -max_total_time=600   # coverage-guided (needs atheris)

Each prints a summary (JSON with ``--json``) and exits 1 if any case broke the contract.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _cli(args) -> int:
    from tests.fuzz.runner import run_campaign

    numbers = range(args.start, args.start + args.cases)
    real = None if args.real is None else [r for r in args.real.split(",") if r]
    c = run_campaign(numbers, root=Path(args.root), workers=args.workers, timeout=args.timeout,
                     memory_mb=args.memory_mb, fresh_every=args.fresh_every, lossy=not args.exact_only,
                     real=real, verbose=args.verbose,
                     on_finding=lambda f, case: print(f"NEW: {f.signature}\n     {f.case}\n     "
                                                      f"argv: {' '.join(f.argv)}", flush=True))
    summary = c.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"cli fuzz: {c.cases} cases in {c.seconds:.0f} s, exits {summary['exits']}, "
              f"{len(c.findings)} distinct failures; slowest case {c.slowest[0]:.1f} s")
        for f in c.findings.values():
            print(f"  {f.count:4d}x {f.signature}\n        {f.case[:200]}")
        if c.invalid_input_failures:
            print(f"failures on invalid models, reported as bad input (exit 2): "
                  f"{sum(c.invalid_input_failures.values())} cases, {len(c.invalid_input_failures)} kinds")
        for case, line in c.validation_failures:
            print(f"  validation failed (exit 1): {case[:160]}\n        {line[:200]}")
    return 1 if c.findings else 0


def _diff(args) -> int:
    from tests.fuzz.differential import run_differential

    result = run_differential(range(args.start, args.start + args.graphs), workers=args.workers,
                              root=Path(args.root), verbose=args.verbose)
    if args.json:
        print(json.dumps(result.summary(), indent=2))
    else:
        print(result.text())
    return 1 if result.failures else 0


def _atheris(args, rest: list[str]) -> int:
    from tests.fuzz.coverage import run_atheris

    return run_atheris(rest, root=Path(args.root))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m tests.fuzz")
    p.add_argument("--root", default=os.environ.get("FUZZ_ROOT", f"/tmp/onnxopt-fuzz-{os.getpid()}"),
                   help="where cases and reproducers go")
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cli", help="mutated models through the command line")
    c.add_argument("--cases", type=int, default=400)
    c.add_argument("--start", type=int, default=0, help="number of the first case (the seed of each)")
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as a hang")
    c.add_argument("--memory-mb", type=int, default=4096, help="data-segment limit of a worker")
    c.add_argument("--fresh-every", type=int, default=25, help="every N-th case in a new process")
    c.add_argument("--exact-only", action="store_true", help="pipelines of exact passes only")
    c.add_argument("--real", default=None, help="real models to mutate, comma-separated (default: the quick ones)")
    d = sub.add_parser("diff", help="random valid graphs through the default preset, compared on onnxruntime")
    d.add_argument("--graphs", type=int, default=1000)
    d.add_argument("--start", type=int, default=0)
    d.add_argument("--workers", type=int, default=2)
    sub.add_parser("atheris", help="coverage-guided fuzzing (pip install atheris); libFuzzer flags after --")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    code = {"cli": lambda: _cli(args), "diff": lambda: _diff(args), "atheris": lambda: _atheris(args, rest)}[args.what]()
    if not args.json:
        print(f"({time.perf_counter() - t0:.0f} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
