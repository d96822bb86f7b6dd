"""A user's fidelity metric: ``module:function``, called on the reference's and the
candidate's outputs, higher is better.

The function receives two lists, one entry per held-out sample, each a dict of output
name -> array: ``metric(reference, candidate)``; a function taking a third parameter also
gets the samples' feeds, for metrics that need labels looked up from the inputs. It
returns a number. A metric that does not import, or raises, or returns something that is
not a finite number, stops the search with one clear line.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence

from ..errors import UsageError

__all__ = ["Metric", "load_metric"]


class Metric:
    """A loaded metric function and its spec (``module:function``)."""

    def __init__(self, spec: str, fn: Callable):
        self.spec = spec
        self.fn = fn
        try:
            params = [p for p in inspect.signature(fn).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            self.with_feeds = len(params) >= 3
        except (TypeError, ValueError):
            self.with_feeds = False

    def __call__(self, reference: Sequence[dict], candidate: Sequence[dict], feeds: Sequence[dict]) -> float:
        try:
            value = self.fn(reference, candidate, feeds) if self.with_feeds else self.fn(reference, candidate)
        except Exception as exc:
            line = " ".join(str(exc).split())[:200]
            raise UsageError(f"--metric {self.spec} raised {type(exc).__name__}: {line}") from exc
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"--metric {self.spec} returned {type(value).__name__}, not a number") from None
        if not math.isfinite(number):
            raise UsageError(f"--metric {self.spec} returned {number}, not a finite number")
        return number


def load_metric(spec: str | Callable | None) -> Metric | None:
    """Import ``module:function`` (or wrap a callable); raise :class:`UsageError` with one
    line when it cannot be imported or is not callable."""
    if spec is None:
        return None
    if callable(spec):
        return Metric(getattr(spec, "__qualname__", repr(spec)), spec)
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--metric {spec}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        line = " ".join(str(exc).split())[:200]
        raise UsageError(f"--metric {spec}: cannot import {module_name} ({type(exc).__name__}: {line})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise UsageError(f"--metric {spec}: {module_name} has no {attr}")
    if not callable(fn):
        raise UsageError(f"--metric {spec}: {attr} is not a function")
    return Metric(str(spec), fn)
