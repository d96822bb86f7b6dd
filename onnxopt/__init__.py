"""onnxopt: a graph-rewriting compiler for ONNX models.

A pass manager applies named rewrite passes to a model and every result is checked
against the original on onnxruntime. Start with :func:`optimize`; compose your own with
:class:`Model`, :class:`PassManager` and :func:`validate`; let :func:`search` find the
pipeline for an objective under a fidelity floor.

The public names below are imported on first use (module ``__getattr__``), so that a
command that needs neither onnxruntime nor the report's tables does not pay for them:
``import onnxopt`` itself loads nothing but this file.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "optimize": ".api",
    "search": ".autocompress",
    "load": ".api",
    "Model": ".model",
    "PassManager": ".manager",
    "Pass": ".framework",
    "PassContext": ".framework",
    "PassResult": ".framework",
    "Opt": ".framework",
    "register": ".framework",
    "register_preset": ".framework",
    "registered_passes": ".framework",
    "presets": ".framework",
    "get_pass": ".framework",
    "parse_pipeline": ".framework",
    "validate": ".validate",
    "Report": ".report",
    "OnnxoptError": ".errors",
    "ValidationFailed": ".errors",
}

__all__ = [
    "__version__",
    "optimize",
    "search",
    "load",
    "Model",
    "PassManager",
    "Pass",
    "PassContext",
    "PassResult",
    "Opt",
    "register",
    "register_preset",
    "registered_passes",
    "presets",
    "get_pass",
    "parse_pipeline",
    "validate",
    "Report",
    "OnnxoptError",
    "ValidationFailed",
]

if TYPE_CHECKING:  # what type checkers and IDEs see
    from .api import load, optimize
    from .autocompress import search
    from .errors import OnnxoptError, ValidationFailed
    from .framework import (
        Opt,
        Pass,
        PassContext,
        PassResult,
        get_pass,
        parse_pipeline,
        presets,
        register,
        register_preset,
        registered_passes,
    )
    from .manager import PassManager
    from .model import Model
    from .report import Report
    from .validate import validate


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'onnxopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """``onnxopt.validate`` names the function, although a submodule has the same name:
    the import system binds a submodule to its package when it is first imported (here,
    by whichever module needs it first), and that binding is ignored."""

    @property
    def validate(self):
        from .validate import validate

        return validate

    @validate.setter
    def validate(self, value) -> None:
        pass


sys.modules[__name__].__class__ = _Package

logging.getLogger(__name__).addHandler(logging.NullHandler())
