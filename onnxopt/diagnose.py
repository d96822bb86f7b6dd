"""Why a model is not valid ONNX: asked only after something failed on it.

Loading checks what onnxopt itself needs (a parseable file, text that is UTF-8, safe
external data) and stays lenient otherwise: exporters write models that ``onnx.checker``
frowns at and onnxruntime runs all the same. When a pass or the report then fails on a
model, the command line asks :func:`why_invalid` before calling it a bug of ours: a
model that ``onnx.checker`` rejects, whose tensors do not hold the data their dims
declare, or that onnxruntime cannot load, is bad input (exit 2) and the user is told
which of these it is. Nothing here raises: every failure is part of the answer.
"""

from __future__ import annotations

import logging
import os

__all__ = ["why_invalid"]

log = logging.getLogger(__name__)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else text)[:300]


def why_invalid(path: str | os.PathLike) -> str:
    """The reason the ONNX file at ``path`` is not a valid model, or ``""`` if onnx's
    checker, a decode of every tensor and onnxruntime all accept it."""
    try:
        return _why_invalid(os.fspath(path))
    except BaseException as exc:  # noqa: BLE001 - a diagnosis must never fail on its own
        if isinstance(exc, KeyboardInterrupt):
            raise
        log.debug("diagnosing %s failed: %s", path, exc)
        return ""


def _why_invalid(path: str) -> str:
    import onnx
    from onnx import numpy_helper

    from .model_files import all_tensor_protos

    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:
        return f"it cannot be parsed ({_first_line(exc)})"
    try:
        onnx.checker.check_model(path if proto.ByteSize() >= 2**31 else proto)
    except Exception as exc:
        return f"onnx.checker: {_first_line(exc)}"
    base = os.path.dirname(os.path.abspath(path))
    for tensor in all_tensor_protos(proto):
        try:
            arr = numpy_helper.to_array(tensor, base_dir=base)
        except Exception as exc:
            return f"tensor '{tensor.name}' does not hold the data it declares ({_first_line(exc)})"
        if tuple(arr.shape) != tuple(tensor.dims):
            return f"tensor '{tensor.name}' holds {arr.size} values for dims {list(tensor.dims)}"
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        return f"onnxruntime cannot load it ({_first_line(exc)})"
    return ""
