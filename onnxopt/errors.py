"""The exception hierarchy: every failure a user can cause has a class and an exit code.

The CLI turns any :class:`OnnxoptError` into one line on stderr and its ``exit_code``;
anything else is a bug and exits with :data:`EXIT_INTERNAL` (the traceback is shown
with ``--debug``).

Exit codes:

* ``0`` — success
* ``1`` — the candidate model failed validation (:class:`ValidationFailed`)
* ``2`` — bad input or usage: a file that is not ONNX, an unknown pass, feeds that do
  not match the model, an unavailable provider, an unwritable output ...
* ``3`` — a pass failed internally (:class:`PassFailed`) or another unexpected error
"""

from __future__ import annotations

__all__ = [
    "EXIT_OK",
    "EXIT_VALIDATION",
    "EXIT_USAGE",
    "EXIT_INTERNAL",
    "OnnxoptError",
    "UsageError",
    "PipelineError",
    "ModelLoadError",
    "UnsafePathError",
    "ModelSaveError",
    "FeedError",
    "CalibrationError",
    "ProviderUnavailable",
    "PassFailed",
    "OutOfTime",
    "ValidationFailed",
]

EXIT_OK = 0
EXIT_VALIDATION = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3


class OnnxoptError(Exception):
    """Base class of every error onnxopt raises on purpose."""

    exit_code = EXIT_USAGE


class UsageError(OnnxoptError):
    """The command line or an API argument is wrong."""


class PipelineError(UsageError):
    """A pipeline string names an unknown pass, preset or option, or an ill-typed value."""


class ModelLoadError(OnnxoptError):
    """The model cannot be read: missing file, not ONNX, truncated protobuf ..."""


class UnsafePathError(ModelLoadError):
    """An external-data location is absolute or leaves the model's folder."""


class ModelSaveError(OnnxoptError):
    """The output cannot be written (unwritable folder, same path as the input ...)."""


class FeedError(OnnxoptError):
    """Input feeds do not match the model (names, dtypes, shapes)."""


class CalibrationError(FeedError):
    """Calibration data is missing or does not match the model's inputs."""


class ProviderUnavailable(OnnxoptError):
    """An execution provider was asked for that this onnxruntime cannot use."""


class PassFailed(OnnxoptError):
    """A pass raised while rewriting; carries the pass name."""

    exit_code = EXIT_INTERNAL

    def __init__(self, pass_name: str, message: str):
        super().__init__(f"pass '{pass_name}' failed: {message}")
        self.pass_name = pass_name
        self.message = message

    def __reduce__(self):
        # pickled with its two arguments: an error raised in a worker process (a process
        # pool, a Ray task) must arrive whole, not break the pool that unpickles it
        return (type(self), (self.pass_name, self.message))


class OutOfTime(PassFailed):
    """A pass given a deadline (``PassContext.deadline``) could not finish by it. It
    stops rather than return a shorter run's result, which its pipeline would not rebuild."""

    def __reduce__(self):
        return (type(self), (self.pass_name, self.message))


class ValidationFailed(OnnxoptError):
    """The candidate's outputs are not within the bound set for the reference's.

    ``model`` and ``report`` (when set) hold the rejected candidate and its report.
    """

    exit_code = EXIT_VALIDATION

    def __init__(self, message: str, *, model=None, report=None):
        super().__init__(message)
        self.model = model
        self.report = report
