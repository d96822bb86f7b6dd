"""onnxopt: a graph-rewriting compiler for ONNX models.

A pass manager applies named rewrite passes to a model and every result is checked
against the original on onnxruntime. Start with :func:`optimize`; compose your own with
:class:`Model`, :class:`PassManager` and :func:`validate`; let :func:`search` find the
pipeline for an objective under a fidelity floor.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

from .api import load, optimize  # noqa: E402
from .errors import OnnxoptError, ValidationFailed  # noqa: E402
from .framework import (  # noqa: E402
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
from .manager import PassManager  # noqa: E402
from .model import Model  # noqa: E402
from .report import Report  # noqa: E402
from .validate import validate  # noqa: E402

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

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str):
    # ``search`` lives in the autocompress sub-package, imported on first use only (it
    # stays light: Ray is imported when a search runs on it, never here)
    if name == "search":
        from .autocompress import search

        return search
    raise AttributeError(f"module 'onnxopt' has no attribute {name!r}")
