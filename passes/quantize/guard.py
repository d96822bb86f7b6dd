"""The accuracy guard of the ``quantize`` pass: compare a quantized candidate with the
float model on calibration samples and find the fewest layers to keep in float so that
the bounds hold.

Each output is judged by its cosine to the float output over all samples, and
class-score outputs (rank 2 or 3, at least two classes on the last axis) also by top-1
agreement; the worst output decides. When the quantized model falls short, each layer's
sensitivity is measured by quantizing it alone, and the most sensitive layers are kept in
float: the fewest that meet the bounds, found by a doubling then a bisection search.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import numpy as np

from onnxopt.framework import PassContext
from onnxopt.model import Model
from onnxopt.validate import make_session

__all__ = ["AccuracyGuard"]


class AccuracyGuard:
    """The accuracy guard: compares candidates with the float model on calibration
    samples and searches the fewest float layers that meet the bounds."""

    def __init__(self, original: Model, calibration, samples: int, min_cosine: float | None,
                 min_top1: float | None, ctx: PassContext):
        self.feeds = list(itertools.islice(iter(calibration), samples))
        self.min_cosine = min_cosine
        self.min_top1 = min_top1
        self.ctx = ctx
        sess = make_session(original)
        self.names = [o.name for o in sess.get_outputs()]
        self.reference = [sess.run(self.names, dict(f)) for f in self.feeds]
        self.evaluations = 0

    def measure(self, model: Model) -> dict:
        self.evaluations += 1
        sess = make_session(model)
        dots = np.zeros(len(self.names))
        na = np.zeros(len(self.names))
        nb = np.zeros(len(self.names))
        agree = np.zeros(len(self.names))
        total = np.zeros(len(self.names))
        for feeds, ref in zip(self.feeds, self.reference):
            got = sess.run(self.names, dict(feeds))
            for k, (r, c) in enumerate(zip(ref, got)):
                r = np.asarray(r)
                c = np.asarray(c)
                if r.dtype.kind != "f" or r.shape != c.shape:
                    continue
                r64 = np.nan_to_num(r.astype(np.float64).ravel(), posinf=0.0, neginf=0.0)
                c64 = np.nan_to_num(c.astype(np.float64).ravel(), posinf=0.0, neginf=0.0)
                dots[k] += r64 @ c64
                na[k] += r64 @ r64
                nb[k] += c64 @ c64
                if r.ndim in (2, 3) and r.shape[-1] >= 2:
                    agree[k] += float((r.argmax(-1) == c.argmax(-1)).sum())
                    total[k] += r.argmax(-1).size
        cos = []
        for k in range(len(self.names)):
            if na[k] == 0 and nb[k] == 0:
                cos.append(1.0)
            elif na[k] == 0 or nb[k] == 0:
                cos.append(0.0)
            else:
                cos.append(float(dots[k] / np.sqrt(na[k] * nb[k])))
        top1 = [float(agree[k] / total[k]) for k in range(len(self.names)) if total[k] > 0]
        return {"cosine": min(cos) if cos else 1.0, "top1": min(top1) if top1 else None}

    def ok(self, m: dict) -> bool:
        if self.min_cosine is not None and m["cosine"] < self.min_cosine:
            return False
        if self.min_top1 is not None and m["top1"] is not None and m["top1"] < self.min_top1:
            return False
        return True

    def search(self, build: Callable[[Iterable[str]], Model], layers: list[str], *, ops: dict[str, str],
               current: Model) -> tuple[list[str], dict]:
        """The fewest layers to keep in float (most sensitive first) so that the model meets
        the bounds, and a report."""
        before = self.measure(current)
        report: dict = {"min_cosine": self.min_cosine, "min_top1": self.min_top1,
                        "cosine_before": round(before["cosine"], 6),
                        "top1_before": None if before["top1"] is None else round(before["top1"], 4),
                        "samples": len(self.feeds)}
        if self.ok(before):
            report.update(met=True, float_layers=[], cosine=report["cosine_before"],
                          top1=report["top1_before"], evaluations=self.evaluations)
            return [], report
        sensitivity: dict[str, float] = {}
        with self.ctx.progress.task("quantize: layer sensitivity", len(layers)) as advance:
            for name in layers:
                alone = build([x for x in layers if x != name])
                m = self.measure(alone)
                # the loss in the bounded metrics: cosine, top-1 agreement, or both
                s = 1.0 - m["cosine"] if self.min_cosine is not None else 0.0
                if self.min_top1 is not None and m["top1"] is not None:
                    s = max(s, 1.0 - m["top1"])
                sensitivity[name] = s
                advance(1)
        order = sorted(layers, key=lambda n: (-sensitivity[n], n))
        cache: dict[int, dict] = {}

        def meets(k: int) -> bool:
            if k not in cache:
                cache[k] = self.measure(build(order[:k]))
            return self.ok(cache[k])

        lo, hi = 0, 1  # meets(lo) is false, or lo is 0
        while not meets(hi) and hi < len(order):
            lo, hi = hi, min(hi * 2, len(order))
        if meets(hi):
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if meets(mid):
                    hi = mid
                else:
                    lo = mid
        chosen = order[:hi]
        final = cache[hi]
        report.update(
            met=self.ok(final), cosine=round(final["cosine"], 6),
            top1=None if final["top1"] is None else round(final["top1"], 4),
            float_layers=[{"name": n, "op": ops.get(n, "?"), "sensitivity": round(sensitivity[n], 6)}
                          for n in chosen],
            evaluations=self.evaluations)
        return chosen, report
