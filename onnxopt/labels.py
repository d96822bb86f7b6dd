"""Class labels for the passes that can use them (``distill``, ``finetune``).

Calibration files carry model inputs only, so labels come from a file of their own: a
``.npy`` of integer classes, or a ``.npz`` holding an array ``labels`` (or a single
array), one class per row of logits in calibration order — a calibration sample holding
a batch of 64 inputs takes 64 labels, a sequence model's ``[N, T, classes]`` logits take
``N*T``. Every problem is a :class:`~onnxopt.errors.CalibrationError` naming the pass
and the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import CalibrationError

__all__ = ["read_labels"]


def read_labels(path: str, rows: int, classes: int, *, what: str) -> np.ndarray:
    """The first ``rows`` labels of ``path`` as int64, each in ``[0, classes)``.

    ``what`` names the pass in the messages. More labels than rows are allowed (the
    first ones are used); fewer, non-integer or out-of-range labels are errors.
    """
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"{what}: labels file {path}: no such file")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                key = "labels" if "labels" in z.files else (z.files[0] if len(z.files) == 1 else None)
                if key is None:
                    raise CalibrationError(f"{what}: {path} holds no array 'labels'")
                y = z[key]
        else:
            y = np.load(p, allow_pickle=False)
    except CalibrationError:
        raise
    except Exception as exc:
        raise CalibrationError(f"{what}: cannot read labels from {path} ({exc})") from exc
    y = np.asarray(y).reshape(-1)
    if y.dtype.kind not in "iu":
        raise CalibrationError(f"{what}: labels in {path} must be integers, got {y.dtype}")
    if y.size < rows:
        raise CalibrationError(f"{what}: {path} has {y.size} labels for {rows} rows of logits")
    y = y[:rows].astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise CalibrationError(f"{what}: labels in {path} must lie in [0, {classes})")
    return y
