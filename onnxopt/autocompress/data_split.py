"""How a search divides its data: what passes calibrate on, what probes and trials are
measured on, and what the chosen model is validated on at the end.

The calibration samples are shuffled (by the seed) and split three ways: samples held
out for the trials' fidelity, samples held back for the final validation (unless the user
gives feeds for it), and the rest for the passes to calibrate on; probes measure on the
first few calibration samples. No sample is in two parts, so the final figure is on data
the search never saw.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import check_feeds, load_feeds, open_calibration
from ..errors import CalibrationError
from ..model import Model

__all__ = ["DataSplit", "split_data", "final_feeds"]

MAX_HOLDOUT = 16
MAX_FINAL = 32
MIN_SAMPLES = 6


@dataclass
class DataSplit:
    calibration: list[dict[str, np.ndarray]]
    probe: list[dict[str, np.ndarray]]
    holdout: list[dict[str, np.ndarray]]
    final: list[dict[str, np.ndarray]]
    final_source: str

    def describe(self) -> dict:
        return {"calibration": len(self.calibration), "probe": len(self.probe), "holdout": len(self.holdout),
                "final": len(self.final), "final_source": self.final_source}


def final_feeds(feeds, model: Model) -> tuple[list[dict[str, np.ndarray]], str]:
    """User-given validation feeds: a ``.npz``/``.npy`` (one feed), a folder of ``.npz``
    (one feed each), a feed dict, or a list of them."""
    if isinstance(feeds, (str, os.PathLike)):
        path = Path(feeds)
        if path.is_dir():
            return list(open_calibration(path, model)), str(path)
        return [load_feeds(path, model)], str(path)
    if isinstance(feeds, dict):
        check_feeds(model, feeds)
        return [dict(feeds)], "given"
    items = [dict(f) for f in feeds]
    for f in items:
        check_feeds(model, f)
    if not items:
        raise CalibrationError("the validation feeds hold no sample")
    return items, f"{len(items)} given feeds"


def split_data(model: Model, calibration, feeds=None, *, seed: int = 0, probe_samples: int = 4) -> DataSplit:
    """Split the calibration data (see the module doc); raise :class:`CalibrationError`
    when there are too few samples to hold any out."""
    samples = list(open_calibration(calibration, model))
    final, source = final_feeds(feeds, model) if feeds is not None else ([], "")
    need = MIN_SAMPLES if feeds is None else MIN_SAMPLES - 2
    if len(samples) < need:
        raise CalibrationError(f"a search needs at least {need} calibration samples (some are held out to "
                               f"measure candidates on data they were not calibrated on); got {len(samples)}")
    order = np.random.default_rng(seed).permutation(len(samples))
    shuffled = [samples[i] for i in order]
    n = len(shuffled)
    n_hold = min(MAX_HOLDOUT, max(2, n // 3))  # a third: fidelity on few samples is optimistic
    n_final = 0 if feeds is not None else min(MAX_FINAL, max(2, n // 5))
    holdout = shuffled[:n_hold]
    if feeds is None:
        final = shuffled[n_hold:n_hold + n_final]
        source = f"{n_final} calibration samples held back"
    rest = shuffled[n_hold + n_final:]
    return DataSplit(rest, rest[:max(1, probe_samples)], holdout, final, source)
