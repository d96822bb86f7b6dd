"""The pass framework: ``Pass``, its options as data, ``PassResult``, ``PassContext``,
the registry of named passes and presets, and the pipeline language.

A pipeline string is a comma-separated list of items::

    dead-nodes,fold-constants(size_limit=1048576),[cse,dead-nodes],default

* ``name`` or ``name(key=value,...)`` runs one pass once;
* ``[a,b,...]`` is a group, run again and again until no pass in it changes the model
  (bounded by ``max_rounds``); groups hold exact passes only;
* a preset name expands to that preset's pipeline.

List-valued options separate their items with ``;`` (``exclude=Conv;Gemm``). Everything
is parsed and checked before any pass runs: an unknown pass, preset or option, or a value
of the wrong type, raises :class:`~onnxopt.errors.PipelineError` naming what is valid.
"""

from __future__ import annotations

import abc
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import CalibrationError, PipelineError

__all__ = [
    "Opt",
    "Pass",
    "PassResult",
    "PassContext",
    "Progress",
    "PassStep",
    "Group",
    "register",
    "register_preset",
    "declare_passes",
    "get_pass",
    "registered_passes",
    "presets",
    "parse_pipeline",
    "load_builtin_passes",
    "pass_source",
]

log = logging.getLogger(__name__)

_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True,
               "false": False, "0": False, "no": False, "off": False}


@dataclass(frozen=True)
class Opt:
    """One pass option: its type, default and a one-line description.

    ``type`` is ``int``, ``float``, ``bool``, ``str`` or ``list`` (of strings, ``;``
    separated on the command line). ``choices`` restricts a ``str`` option. ``minimum``
    and ``maximum`` bound numbers. A default of ``None`` means "not set".
    """

    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None

    def describe(self) -> str:
        kind = "|".join(self.choices) if self.choices else self.type.__name__
        return f"{kind}, default {self.default!r}"

    def convert(self, value: Any, where: str) -> Any:
        """Check ``value`` (from a pipeline string or the API) and convert it."""
        if value is None:
            return None
        t = self.type
        try:
            if t is bool:
                if isinstance(value, bool):
                    out: Any = value
                elif str(value).lower() in _BOOL_WORDS:
                    out = _BOOL_WORDS[str(value).lower()]
                else:
                    raise ValueError
            elif t is int:
                if isinstance(value, bool):
                    raise ValueError
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                out = int(value) if not isinstance(value, str) else _parse_int(value)
            elif t is float:
                if isinstance(value, bool):
                    raise ValueError
                out = float(value)
            elif t is list:
                if isinstance(value, str):
                    out = [v.strip() for v in value.split(";") if v.strip()]
                elif isinstance(value, (list, tuple)):
                    out = [str(v) for v in value]
                else:
                    raise ValueError
            else:
                out = str(value)
        except (ValueError, TypeError):
            raise PipelineError(f"{where} expects {self.describe()}; got {value!r}") from None
        if self.choices and out not in self.choices:
            raise PipelineError(f"{where} must be one of {', '.join(self.choices)}; got {value!r}")
        if self.minimum is not None and out < self.minimum:
            raise PipelineError(f"{where} must be >= {self.minimum}; got {value!r}")
        if self.maximum is not None and out > self.maximum:
            raise PipelineError(f"{where} must be <= {self.maximum}; got {value!r}")
        return out


def _parse_int(text: str) -> int:
    text = text.strip().replace("_", "")
    m = re.fullmatch(r"(\d+)\s*([kKmMgG]i?[bB]?)?", text)
    if m:
        scale = {"k": 2**10, "m": 2**20, "g": 2**30}.get((m.group(2) or " ")[0].lower(), 1)
        return int(m.group(1)) * scale
    f = float(text)
    if not f.is_integer():
        raise ValueError(text)
    return int(f)


@dataclass
class PassResult:
    """What a pass did. ``modified`` is true only if the model changed (the fixed-point
    loop relies on it); ``stats`` holds the pass's own figures for the report."""

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Progress:
    """Progress reporting for long work. The default does nothing; the CLI installs one
    that draws a progress bar.

    ``task`` yields ``advance(n=1, note=None)``: ``n`` steps done, and ``note`` (when
    given) a short text shown beside the description, such as a training loss.
    """

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        yield lambda n=1, note=None: None


@dataclass
class PassContext:
    """What a pass may need and must not fetch itself.

    ``reference``: the original model (the teacher for reconstruction and distillation).
    ``calibration``: a re-iterable of feed dicts (see :mod:`onnxopt.data`) or None.
    ``providers``: onnxruntime providers to use (``cpu``, ``cuda``).
    ``shapes``: values for dynamic dimensions given by the user (input name -> shape).
    ``feeds``: the validation feeds (input name -> array) when the caller has them — a pass
    that re-checks a rewrite on onnxruntime runs it on these; None when validation will
    generate its feeds from the signature (``shapes``, ``seed``).
    ``map_shards``/``shards``: ``map_shards(fn, items) -> results`` runs a plain function
    over plain data, possibly in parallel (Ray tasks); a pass may cut data-parallel work
    such as calibration statistics into ``shards`` parts with it. None: it runs here.
    ``deadline``: a wall-clock time (``time.time()``) by which a long pass must be done;
    one that cannot finish by then raises :class:`~onnxopt.errors.OutOfTime` rather than
    return a shorter run (a search's time budget). None: no limit.
    """

    reference: Any = None
    calibration: Any = None
    providers: tuple[str, ...] = ("cpu",)
    shapes: Mapping[str, tuple] = field(default_factory=dict)
    feeds: Mapping[str, Any] | None = None
    progress: Progress = field(default_factory=Progress)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("onnxopt.passes"))
    seed: int = 0
    map_shards: Callable[[Callable, list], list] | None = None
    shards: int = 0
    deadline: float | None = None

    def require_calibration(self, pass_name: str):
        """The calibration data, or a clear error naming the pass that needs it."""
        if self.calibration is None:
            raise CalibrationError(
                f"pass '{pass_name}' needs calibration data: give --calib FILE.npz or a folder "
                "of .npz files (API: calibration=...)")
        return self.calibration


class Pass(abc.ABC):
    """Base class of a rewrite pass.

    Subclasses set ``name`` (lowercase-hyphenated, as the CLI spells it), ``summary``
    (one line), ``exact`` (outputs identical up to float rounding) or not (lossy: held to
    a fidelity bound), and ``options`` (name -> :class:`Opt`); they implement
    :meth:`run`. Option values are in ``self.opts`` (attribute access).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    options: ClassVar[dict[str, Opt]] = {}

    def __init__(self, **values: Any):
        unknown = sorted(set(values) - set(self.options))
        if unknown:
            raise PipelineError(
                f"pass '{self.name}' has no option {', '.join(repr(u) for u in unknown)}; "
                f"valid options: {_option_list(self)}")
        resolved = {}
        for key, opt in self.options.items():
            if key in values:
                resolved[key] = opt.convert(values[key], f"option '{key}' of pass '{self.name}'")
            else:
                resolved[key] = opt.default
        self.opts = _Options(resolved)
        self.given = {k: resolved[k] for k in values}

    @abc.abstractmethod
    def run(self, model, ctx: PassContext) -> PassResult:
        """Rewrite ``model`` in place; say truthfully whether it changed."""

    def spec(self) -> str:
        """The pass as a pipeline item, with the options that were given."""
        if not self.given:
            return self.name
        parts = []
        for k, v in self.given.items():
            parts.append(f"{k}={';'.join(v) if isinstance(v, list) else v}")
        return f"{self.name}({','.join(parts)})"

    def __repr__(self) -> str:
        return f"<pass {self.spec()}>"


class _Options(dict):
    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _option_list(p: type[Pass] | Pass) -> str:
    if not p.options:
        return "(none)"
    return "; ".join(f"{k} ({o.describe()})" for k, o in p.options.items())


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

_PASSES: dict[str, type[Pass]] = {}
_PRESETS: dict[str, tuple[str, str]] = {}
_MODULES: dict[str, str] = {}  # pass name -> the module that registers it, not imported yet
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``name``."""
    if not _NAME.match(cls.name or ""):
        raise ValueError(f"pass name {cls.name!r} is not lowercase-hyphenated")
    if not cls.summary:
        raise ValueError(f"pass {cls.name!r} has no summary")
    for key, opt in cls.options.items():
        if opt.default is not None and opt.type is not list:
            opt.convert(opt.default, f"default of option '{key}' of pass '{cls.name}'")
    existing = _PASSES.get(cls.name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"two passes are named {cls.name!r}")
    declared = _MODULES.get(cls.name)
    if declared is not None and existing is None and declared != cls.__module__:
        raise ValueError(f"two passes are named {cls.name!r} (one in {declared})")
    _PASSES[cls.name] = cls
    return cls


def register_preset(name: str, pipeline: str, summary: str) -> None:
    """Name a pipeline (``--preset NAME``, or NAME as a pipeline item)."""
    if not _NAME.match(name):
        raise ValueError(f"preset name {name!r} is not lowercase-hyphenated")
    _PRESETS[name] = (pipeline, summary)


def declare_passes(package: str, modules: Mapping[str, str]) -> None:
    """Name the passes of a package and the module (relative to ``package``) that defines
    each; a module is imported when one of its passes is first asked for."""
    for name, module in modules.items():
        if not _NAME.match(name):
            raise ValueError(f"pass name {name!r} is not lowercase-hyphenated")
        _MODULES[name] = f"{package}.{module}"


def _import_pass(name: str) -> None:
    module = _MODULES.get(name)
    if module is not None and name not in _PASSES:
        import importlib

        importlib.import_module(module)
        if name not in _PASSES:
            raise RuntimeError(f"module {module} does not register the pass {name!r} it is declared for")


_loaded = False


def load_builtin_passes() -> None:
    """Import the pass library (and any plugin registered under the ``onnxopt.passes``
    entry-point group) so that its passes and presets are registered."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    importlib.import_module("onnxopt.passes")
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="onnxopt.passes"):
            if ep.value != "onnxopt.passes":
                ep.load()
    except Exception as exc:  # a broken plugin must not break the built-in passes
        log.warning("could not load onnxopt pass plugins: %s", exc)


def registered_passes() -> dict[str, type[Pass]]:
    load_builtin_passes()
    for name in list(_MODULES):
        _import_pass(name)
    return dict(sorted(_PASSES.items()))


def presets() -> dict[str, tuple[str, str]]:
    load_builtin_passes()
    return dict(sorted(_PRESETS.items()))


def pass_source(cls: type[Pass]) -> str:
    """Where a pass is written: ``passes/<module>.py`` (or ``passes/<package>/__init__.py``)
    for a built-in pass, as the repository lays it out; the module name for a plugin."""
    import sys
    from pathlib import Path

    library = sys.modules.get("onnxopt.passes")
    module = sys.modules.get(cls.__module__)
    if library is None or module is None or not getattr(module, "__file__", None):
        return cls.__module__
    root = Path(library.__file__).resolve().parent
    try:
        return (Path("passes") / Path(module.__file__).resolve().relative_to(root)).as_posix()
    except ValueError:
        return cls.__module__


def get_pass(name: str) -> type[Pass]:
    load_builtin_passes()
    _import_pass(name)
    try:
        return _PASSES[name]
    except KeyError:
        raise PipelineError(
            f"unknown pass '{name}'; valid passes: {', '.join(sorted(set(_PASSES) | set(_MODULES)))}; "
            f"presets: {', '.join(sorted(_PRESETS))}") from None


# --------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------


@dataclass
class PassStep:
    """One pass, run once."""

    pass_: Pass


@dataclass
class Group:
    """Exact passes run in turn until a whole round changes nothing."""

    steps: list[PassStep]
    source: str = ""


Step = PassStep | Group


def parse_pipeline(text: str | Iterable[str]) -> list[Step]:
    """Parse a pipeline string (or a list of items) into steps, checking everything."""
    load_builtin_passes()
    if not isinstance(text, str):
        text = ",".join(text)
    if not text.strip():
        raise PipelineError("empty pipeline; give pass names or a preset "
                            f"(presets: {', '.join(sorted(_PRESETS))})")
    return _Parser(text).parse()


class _Parser:
    def __init__(self, text: str, depth: int = 0):
        self.text = text
        self.i = 0
        self.depth = depth

    def error(self, msg: str) -> PipelineError:
        return PipelineError(f"pipeline {self.text!r}: {msg} (at character {self.i + 1})")

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.i] if self.i < len(self.text) else ""

    def skip_ws(self) -> None:
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def parse(self) -> list[Step]:
        steps = self.items(in_group=False)
        if self.peek():
            raise self.error(f"unexpected {self.peek()!r}")
        return steps

    def items(self, in_group: bool) -> list[Step]:
        steps: list[Step] = []
        while True:
            ch = self.peek()
            if ch == "[":
                if in_group:
                    raise self.error("groups cannot be nested")
                self.i += 1
                start = self.i
                inner = self.items(in_group=True)
                if self.peek() != "]":
                    raise self.error("missing ']'")
                source = self.text[start:self.i]
                self.i += 1
                steps.append(Group([s for s in inner if isinstance(s, PassStep)], source.strip()))
            else:
                steps.extend(self.item(in_group))
            if self.peek() == ",":
                self.i += 1
                continue
            return steps

    def item(self, in_group: bool) -> list[Step]:
        self.skip_ws()
        m = re.compile(r"[A-Za-z0-9_\-.]+").match(self.text, self.i)
        if not m:
            raise self.error("expected a pass name" if self.peek() else "pipeline ends early")
        name = m.group(0)
        self.i = m.end()
        options: dict[str, str] = {}
        if self.peek() == "(":
            self.i += 1
            options = self.options()
        if name not in _PASSES and name not in _MODULES and name in _PRESETS:
            if options:
                raise self.error(f"preset '{name}' takes no options")
            if self.depth > 4:
                raise self.error(f"preset '{name}' expands into itself")
            expanded = _Parser(_PRESETS[name][0], self.depth + 1).parse()
            if in_group:
                flat: list[Step] = []
                for s in expanded:
                    flat.extend(s.steps if isinstance(s, Group) else [s])
                expanded = flat
            return _checked(expanded, in_group)
        cls = get_pass(name)
        step = PassStep(cls(**options))
        return _checked([step], in_group)

    def options(self) -> dict[str, str]:
        opts: dict[str, str] = {}
        if self.peek() == ")":
            self.i += 1
            return opts
        while True:
            self.skip_ws()
            m = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*").match(self.text, self.i)
            if not m:
                raise self.error("expected key=value")
            key = m.group(1)
            self.i = m.end()
            if key in opts:
                raise self.error(f"option '{key}' given twice")
            opts[key] = self.value()
            ch = self.peek()
            self.i += 1
            if ch == ",":
                continue
            if ch == ")":
                return opts
            raise self.error("expected ',' or ')'")

    def value(self) -> str:
        self.skip_ws()
        if self.i < len(self.text) and self.text[self.i] in "\"'":
            quote = self.text[self.i]
            end = self.text.find(quote, self.i + 1)
            if end < 0:
                raise self.error("unterminated quote")
            value = self.text[self.i + 1:end]
            self.i = end + 1
            return value
        start = self.i
        while self.i < len(self.text) and self.text[self.i] not in ",)":
            self.i += 1
        return self.text[start:self.i].strip()


def _checked(steps: list[Step], in_group: bool) -> list[Step]:
    if in_group:
        for s in steps:
            if isinstance(s, PassStep) and not s.pass_.exact:
                raise PipelineError(
                    f"pass '{s.pass_.name}' is lossy and cannot run in a fixed-point group "
                    "'[...]': it would compound; list it outside the brackets")
    return steps


def describe_pipeline(steps: list[Step]) -> str:
    """The canonical pipeline string for ``steps``."""
    parts = []
    for s in steps:
        if isinstance(s, Group):
            parts.append("[" + ",".join(p.pass_.spec() for p in s.steps) + "]")
        else:
            parts.append(s.pass_.spec())
    return ",".join(parts)
