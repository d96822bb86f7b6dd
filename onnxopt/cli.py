"""The ``onnxopt`` command line: ``passes``, ``inspect``, ``optimize``, ``search``, ``validate``,
``report``.

Every failure a user can cause ends in one line on stderr (``onnxopt: error: ...``) and
the exit code of its :mod:`onnxopt.errors` class; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .errors import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, EXIT_VALIDATION, OnnxoptError, UsageError

__all__ = ["main", "build_parser"]

log = logging.getLogger("onnxopt")


class _OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _providers(text: str) -> list[str]:
    return [p for p in text.split(",") if p.strip()]


def _number(kind: type, low: float, high: float | None = None):
    """An argparse type: ``kind`` within ``[low, high]`` (a bad value is a usage error)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not (value >= low and (high is None or value <= high)):  # NaN fails both
            bound = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {bound}")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineArgumentParser(prog="onnxopt", description="A graph-rewriting compiler for ONNX models; "
                "every rewrite is checked against the original on onnxruntime.")
    p.add_argument("--version", action="version", version=f"onnxopt {__version__}")
    _common_args(p, None)
    common = _OneLineArgumentParser(add_help=False)
    _common_args(common, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineArgumentParser)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    sp = add("passes", "list the registered passes, their options and the presets")
    fmt = sp.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--markdown", action="store_true", help="print the README's pass table")

    si = add("inspect", "describe a model: inputs/outputs, opsets, ops, sizes")
    si.add_argument("model")
    si.add_argument("--json", action="store_true", help="print JSON")
    si.add_argument("--channel-groups", action="store_true",
                    help="also show the channel groups (the channels structured pruning may remove together)")

    so = add("optimize", "run a pipeline of passes, validate, write the result")
    so.add_argument("model")
    so.add_argument("-o", "--output", required=True, help="where to write the optimized model")
    group = so.add_mutually_exclusive_group()
    group.add_argument("-p", "--pipeline", help="passes to run, e.g. 'dead-nodes,fold-constants(size_limit=1M)'")
    group.add_argument("--preset", help="a named pipeline (default: 'default')")
    _feeds_args(so)
    so.add_argument("--calib", help="calibration data: a .npz (first axis = samples) or a folder of .npz")
    so.add_argument("--no-validate", action="store_true", help="do not compare with the original")
    so.add_argument("--force", action="store_true", help="write the output even if validation fails")
    so.add_argument("--verify-each", action="store_true",
                    help="check the model after every pass; roll back a pass that breaks it")
    so.add_argument("--max-rounds", type=_number(int, 1), default=None, help="bound on rounds of a fixed-point group (8)")
    so.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                    help="store tensors in a .data file beside the model (auto: above 2 GB)")
    so.add_argument("--report", help="write the JSON report here")
    so.add_argument("--html", help="write the HTML report here (needs the 'report' extra)")

    _search_args(add("search", "find the best compressed model for an objective under a fidelity floor"))

    sv = add("validate", "compare a candidate model with a reference on onnxruntime")
    sv.add_argument("reference")
    sv.add_argument("candidate")
    _feeds_args(sv)
    sv.add_argument("--report", help="write the JSON result here")

    sr = add("report", "turn a JSON report into a self-contained HTML page")
    sr.add_argument("report", help="a JSON report written by --report")
    sr.add_argument("-o", "--output", required=True, help="where to write the HTML page")
    return p


def _search_args(ss: argparse.ArgumentParser) -> None:
    ss.add_argument("model")
    ss.add_argument("-o", "--output", required=True, help="where to write the chosen model")
    ss.add_argument("--calib", required=True,
                    help="calibration data: a .npz (first axis = samples) or a folder of .npz; part is held out")
    ss.add_argument("--inputs", help="feeds for the final validation, never used in the search "
                    "(.npz, .npy or a folder of .npz; default: calibration samples held back)")
    ss.add_argument("--objective", required=True, choices=("latency", "size"),
                    help="what to minimise: onnxruntime CPU latency (1 thread) or file bytes")
    ss.add_argument("--min-cosine", type=float, default=None,
                    help="fidelity floor: every output's cosine to the original on held-out samples (0.99)")
    ss.add_argument("--metric", help="module:function(reference, candidate[, feeds]) -> float, higher is better")
    ss.add_argument("--min-metric", type=float, default=None, help="floor of --metric")
    ss.add_argument("--time-budget", type=float, default=None,
                    help="seconds; when they run out the best so far is written (600)")
    ss.add_argument("--space", help="families to search, comma-separated: int8,int4,fp16,prune,share,channels,"
                    "finetune (default: all that can move the objective, except finetune, which trains)")
    ss.add_argument("--workers", type=int, default=None, help="parallel jobs (default: this machine's cores)")
    ss.add_argument("--address", help="join a Ray cluster: auto or ray://HOST:PORT (default: a local Ray)")
    ss.add_argument("--backend", choices=("auto", "ray", "local"), default="auto",
                    help="where jobs run: auto (Ray when installed), ray, or local (this process)")
    ss.add_argument("--report", help="write the JSON report here")
    ss.add_argument("--html", help="write the HTML report here (the Pareto plot; needs the 'report' extra)")
    ss.add_argument("--seed", type=int, default=0, help="seed of the data split and of the passes")
    ss.add_argument("--force", action="store_true", help="write the closest model even if none meets the floor")
    ss.add_argument("--cache-dir", help="where probe and trial results are kept (default: ~/.cache/onnxopt/search)")
    ss.add_argument("--no-cache", action="store_true", help="measure everything again; keep nothing")
    ss.add_argument("--all", action="store_true", help="list every model measured, not only the front")


def _common_args(p: argparse.ArgumentParser, default) -> None:
    """Flags accepted before and after the command name."""
    kw = {} if default is None else {"default": default}
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs", **kw)
    p.add_argument("-v", "--verbose", action="store_true", help="log what each pass does", **kw)
    p.add_argument("-q", "--quiet", action="store_true", help="print no tables or progress", **kw)


def _feeds_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--inputs", help="feeds for validation: .npz (keys = input names) or .npy")
    sp.add_argument("--shape", action="append", default=[], metavar="NAME=DIMS",
                    help="fix a dynamic input shape, e.g. images=1x3x640x640 (repeatable)")
    sp.add_argument("--providers", type=_providers, default=["cpu"],
                    help="execution providers, comma-separated: cpu, cuda (default cpu)")
    sp.add_argument("--rtol", type=_number(float, 0.0), default=None, help="relative tolerance for exact passes (1e-3)")
    sp.add_argument("--atol", type=_number(float, 0.0), default=None, help="absolute tolerance for exact passes (1e-4)")
    sp.add_argument("--min-cosine", type=_number(float, -1.0, 1.0), default=None,
                    help="fidelity bound for lossy passes (0.99); for 'validate' it selects the fidelity mode")
    sp.add_argument("--runs", type=_number(int, 0), default=10, help="timed runs for latency (0: none)")
    sp.add_argument("--threads", type=_number(int, 0), default=None, help="onnxruntime intra-op threads")


class _RichProgress:
    """Progress on stderr: a spinner per pass, a bar where the total is known."""

    def __init__(self, console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                                  transient=True)

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc):
        self._progress.stop()

    @contextmanager
    def task(self, description: str, total: int | None = None):
        task = self._progress.add_task(description, total=total)

        def advance(n=1, note=None):
            text = description if note is None else f"{description} {note}"
            self._progress.update(task, advance=n, description=text)

        try:
            yield advance
        finally:
            self._progress.remove_task(task)


def _shapes(items: list[str]) -> dict:
    from .data import parse_shape

    out = {}
    for item in items:
        name, shape = parse_shape(item)
        if name in out:
            raise UsageError(f"--shape given twice for '{name}'")
        out[name] = shape
    return out


def _cmd_passes(args, console) -> int:
    from .framework import pass_source, presets, registered_passes

    passes = registered_passes()
    if args.markdown:
        print(pass_table_markdown())
        return EXIT_OK
    if args.json:
        data = {"passes": [{"name": n, "summary": c.summary, "exact": c.exact, "source": pass_source(c),
                            "options": {k: {"type": o.type.__name__, "default": o.default, "help": o.help,
                                            **({"choices": list(o.choices)} if o.choices else {})}
                                        for k, o in c.options.items()}}
                           for n, c in passes.items()],
                "presets": {n: {"pipeline": p, "summary": s} for n, (p, s) in presets().items()}}
        print(json.dumps(data, indent=2))
        return EXIT_OK
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="passes", title_justify="left")
    for col in ("name", "kind", "summary", "options"):
        t.add_column(col)
    for name, cls in passes.items():
        opts = "\n".join(f"{k}: {o.describe()} — {o.help}" for k, o in cls.options.items())
        t.add_row(f"{name}\n[dim]{escape(pass_source(cls))}[/dim]", "exact" if cls.exact else "lossy",
                  escape(cls.summary), escape(opts) or "-")
    console.print(t)
    pt = Table(title="presets", title_justify="left")
    for col in ("name", "pipeline", "summary"):
        pt.add_column(col)
    for name, (pipeline, summary) in presets().items():
        pt.add_row(name, escape(pipeline), escape(summary))
    console.print(pt)
    return EXIT_OK


def pass_table_markdown() -> str:
    """The pass table of the README, generated from the registry."""
    from .framework import pass_source, presets, registered_passes

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| pass | kind | what it does | options |", "| --- | --- | --- | --- |"]
    for name, cls in registered_passes().items():
        opts = "<br>".join(f"`{k}` ({cell(o.describe())}): {cell(o.help)}" for k, o in cls.options.items())
        kind = "exact" if cls.exact else "lossy"
        lines.append(f"| [`{name}`]({pass_source(cls)}) | {kind} | {cell(cls.summary)} | {opts or '—'} |")
    lines += ["", "| preset | pipeline | what it is for |", "| --- | --- | --- |"]
    for name, (pipeline, summary) in presets().items():
        lines.append(f"| `{name}` | `{cell(pipeline)}` | {cell(summary)} |")
    return "\n".join(lines)


def _cmd_inspect(args, console) -> int:
    from .model import Model
    from .report import inspect_model, render_inspect

    model = Model.load(args.model)
    info = inspect_model(model, args.model)
    groups = None
    if args.channel_groups:
        from .channels import analyze

        found = analyze(model)
        groups = {"summary": found.stats(), "groups": found.describe()}
    if args.json:
        if groups is not None:
            info["channel_groups"] = groups
        print(json.dumps(info, indent=2))
    else:
        render_inspect(info, console)
        if groups is not None:
            _render_groups(groups, console)
    return EXIT_OK


def _render_groups(groups: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    s = groups["summary"]
    t = Table(title=f"channel groups: {s['prunable']} of {s['groups']} prunable "
                    f"({s['prunable_channels']:,} of {s['channels']:,} channels)", title_justify="left")
    for col in ("id", "channels", "prunable", "created by", "members", "why not"):
        t.add_column(col)
    for g in groups["groups"]:
        sources = ", ".join(g["sources"][:2]) + (f" +{len(g['sources']) - 2}" if len(g["sources"]) > 2 else "")
        members = " ".join(f"{k}:{v}" for k, v in g["members"].items())
        t.add_row(str(g["id"]), str(g["channels"]), "yes" if g["prunable"] else "no", escape(sources),
                  escape(members), escape("; ".join(g["reasons"][:2])))
    console.print(t)
    if s["layers_skipped"]:
        console.print("layers left out: " + ", ".join(f"{n} ({why})" for why, n in s["layers_skipped"].items()))


def _tolerances(args) -> dict:
    from .validate import DEFAULT_ATOL, DEFAULT_MIN_COSINE, DEFAULT_RTOL

    return {"rtol": DEFAULT_RTOL if args.rtol is None else args.rtol,
            "atol": DEFAULT_ATOL if args.atol is None else args.atol,
            "min_cosine": DEFAULT_MIN_COSINE if args.min_cosine is None else args.min_cosine}


def _check_report_path(path: str | None, flag: str = "--report") -> None:
    if path is None:
        return
    from .errors import ModelSaveError

    folder = Path(path).parent if str(Path(path).parent) else Path(".")
    if not folder.is_dir():
        raise ModelSaveError(f"{flag} {path}: folder {folder} does not exist")
    if Path(path).is_dir():
        raise ModelSaveError(f"{flag} {path}: is a folder")


def _check_html(path: str | None) -> None:
    """Fail before the run, not after it, when the page cannot be made or written; then
    let the plotting library load while the run goes on."""
    if path is not None:
        from .plots import preload, require

        _check_report_path(path, "--html")
        require()
        preload()


def _cmd_optimize(args, console) -> int:
    from .api import optimize
    from .errors import ValidationFailed
    from .manager import DEFAULT_MAX_ROUNDS
    from .report import render_report, write_json

    pipeline = args.pipeline or args.preset or "default"
    shapes = _shapes(args.shape)
    _check_report_path(args.report)
    _check_html(args.html)
    external = {"auto": None, "always": True, "never": False}[args.external_data]
    progress = _RichProgress(_stderr_console(args)) if not args.quiet else None
    try:
        with progress or _null():
            _, report = optimize(
                args.model, pipeline, output=args.output, feeds=args.inputs, shapes=shapes,
                calibration=args.calib, providers=args.providers,
                validate_output=not args.no_validate, runs=args.runs, threads=args.threads,
                verify_each=args.verify_each,
                max_rounds=args.max_rounds or DEFAULT_MAX_ROUNDS, force=args.force,
                external_data=external, progress=progress, **_tolerances(args))
    except ValidationFailed as exc:
        if exc.report is not None:
            if not args.quiet:
                render_report(exc.report, console)
            if args.report:
                write_json(exc.report.to_json(), args.report)
            if args.html:
                exc.report.write_html(args.html)
        raise
    if not args.quiet:
        render_report(report, console)
        console.print(f"wrote {args.output}")
    if args.report:
        write_json(report.to_json(), args.report)
    if args.html:
        report.write_html(args.html)
    if report.passed is False:  # --force wrote it anyway
        print("onnxopt: validation failed; output written because of --force", file=sys.stderr)
        return EXIT_VALIDATION
    return EXIT_OK


def _cmd_validate(args, console) -> int:
    from .data import load_feeds
    from .model import Model
    from .report import Report, model_figures, render_report, write_json
    from .validate import validate

    _check_report_path(args.report)
    reference = Model.load(args.reference)
    candidate = Model.load(args.candidate)
    feeds = load_feeds(args.inputs, reference) if args.inputs else None
    tol = _tolerances(args)
    v = validate(reference, candidate, feeds, shapes=_shapes(args.shape), providers=args.providers,
                 exact=args.min_cosine is None, runs=args.runs, threads=args.threads,
                 feeds_source=args.inputs or "", **tol)
    report = Report(pipeline="(validate)", input=model_figures(reference, args.reference),
                    output=model_figures(candidate, args.candidate), passes=[], converged=True,
                    groups=[], validation=v.as_dict()["providers"], validation_mode=v.mode,
                    validation_bound=v.bound, feeds=v.feeds)
    if not args.quiet:
        render_report(report, console)
    if args.report:
        write_json(report.to_json(), args.report)
    if not v.passed:
        print("onnxopt: error: validation failed: " + "; ".join(v.failures())[:600], file=sys.stderr)
        return EXIT_VALIDATION
    return EXIT_OK


def _cmd_search(args, console) -> int:
    from .autocompress import DEFAULT_TIME_BUDGET, search
    from .autocompress.summary import render_search
    from .errors import ValidationFailed
    from .html_report import write_html
    from .validate import DEFAULT_MIN_COSINE

    _check_report_path(args.report)
    _check_html(args.html)
    progress = _RichProgress(_stderr_console(args)) if not args.quiet else None
    cache = None if args.no_cache else (args.cache_dir or True)
    try:
        with progress or _null():
            result = search(
                args.model, args.output, calibration=args.calib, feeds=args.inputs, objective=args.objective,
                min_cosine=DEFAULT_MIN_COSINE if args.min_cosine is None else args.min_cosine,
                metric=args.metric, min_metric=args.min_metric,
                time_budget=DEFAULT_TIME_BUDGET if args.time_budget is None else args.time_budget,
                space=args.space, workers=args.workers, address=args.address, backend=args.backend,
                report=args.report, seed=args.seed, force=args.force, cache_dir=cache, progress=progress)
    except ValidationFailed as exc:
        if exc.report is not None and not args.quiet:
            render_search(exc.report, console, all_trials=args.all)
        if exc.report is not None and args.html:
            write_html(exc.report, args.html)
        raise
    if args.html:
        write_html(result.report, args.html)
    if not args.quiet:
        render_search(result.report, console, all_trials=args.all)
        console.print(f"wrote {args.output}" + (" (the time budget cut the search)" if result.cut else ""))
    return EXIT_OK


def _cmd_report(args, console) -> int:
    from .html_report import load_report, write_html

    _check_html(args.output)
    write_html(load_report(args.report), args.output)
    if not args.quiet:
        console.print(f"wrote {args.output}")
    return EXIT_OK


@contextmanager
def _null():
    yield None


class _Console:
    """rich's console on stdout, imported and made when first printed to: a command that
    prints no table (``-q``, ``--json``) never imports rich."""

    def __init__(self):
        self._console = None

    def __getattr__(self, name: str):
        if self._console is None:
            from rich.console import Console

            self._console = Console()
            if not self._console.is_terminal:  # piped or logged: wide enough for the report tables
                self._console = Console(width=120)
        return getattr(self._console, name)


def _stderr_console(args):
    from rich.console import Console

    return Console(stderr=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``onnxopt`` command; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    args = None
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO if args.verbose
                            else logging.WARNING, format="onnxopt: %(levelname)s: %(message)s",
                            stream=sys.stderr)
        console = _Console()
        if args.command is None:
            build_parser().print_help()
            return EXIT_USAGE
        handler = {"passes": _cmd_passes, "inspect": _cmd_inspect, "optimize": _cmd_optimize,
                   "search": _cmd_search, "validate": _cmd_validate, "report": _cmd_report}[args.command]
        return handler(args, console)
    except OnnxoptError as exc:
        if debug:
            raise
        if exc.exit_code == EXIT_INTERNAL:
            return _internal(args, exc)
        print(f"onnxopt: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxopt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, unless --debug
        if debug:
            raise
        return _internal(args, exc)


def _internal(args, exc: Exception) -> int:
    """One line for a failure that is not the user's — unless an input model turns out
    not to be valid ONNX, which makes it bad input after all (exit 2)."""
    from .diagnose import why_invalid

    what = _one_line(exc) if isinstance(exc, OnnxoptError) else f"{type(exc).__name__}: {_one_line(exc)}"
    for name in ("model", "reference", "candidate"):
        path = getattr(args, name, None)
        reason = why_invalid(path) if path and Path(path).is_file() else ""
        if reason:
            print(f"onnxopt: error: {path}: not a valid ONNX model ({_one_line(Exception(reason))}); "
                  f"on it, {what}"[:1000], file=sys.stderr)
            return EXIT_USAGE
    prefix = "error" if isinstance(exc, OnnxoptError) else "internal error"
    print(f"onnxopt: {prefix}: {what} (run with --debug for the traceback)", file=sys.stderr)
    return EXIT_INTERNAL


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
