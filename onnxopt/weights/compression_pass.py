"""The shape that the weight-compression passes share: one block of options that chooses
the layers, and one run — find the weights, select them, decide each layer's new values
(the pass's own criterion), write them in their cheapest storage, report per layer.

A compression pass subclasses :class:`WeightCompressionPass`, builds its options with
:func:`selection_options` and implements :meth:`WeightCompressionPass.decide`; nothing in
the graph changes before ``decide`` has returned.
"""

from __future__ import annotations

import abc
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..framework import Opt, Pass, PassContext, PassResult
from ..model import Model
from .report import compression_report
from .sites import (
    WEIGHT_OPS,
    WeightSite,
    check_selection,
    check_targets,
    find_weights,
    pattern_value,
    select_weights,
)
from .writer import StorageWriter

__all__ = ["Decision", "WeightCompressionPass", "selection_options"]

#: The storage figures of a layer's stats row, right after the pass's leading columns.
_FIGURES = ("storage", "bits_per_weight", "bytes", "gzip_bytes", "ratio")


def selection_options(verb: str, targets: str) -> dict[str, Opt]:
    """The options that choose the layers a compression pass rewrites, in the order the
    passes list them: ``layers`` (per-layer ``targets``, e.g. ``targets PATTERN=SPARSITY``),
    ``ops``, ``include``, ``exclude``, ``min_size``. ``verb`` says what the pass does to a
    weight (``pruned``, ``shared``)."""
    return {
        "layers": Opt(list, [], f"per-layer {targets} (regex on weight or node name; first match)"),
        "ops": Opt(list, list(WEIGHT_OPS), f"op types whose weight operand may be {verb}"),
        "include": Opt(list, [], "only weights whose name or node name matches one of these regexes"),
        "exclude": Opt(list, [], "never weights whose name or node name matches one of these regexes"),
        "min_size": Opt(int, 512, "leave layers with fewer weights than this alone", minimum=0),
    }


@dataclass
class Decision:
    """What a compression pass decided before anything is written: the layers to write
    and their new values, one stats row per layer considered, and the pass's own totals
    (the first entries of its stats)."""

    writes: list[tuple[WeightSite, np.ndarray]]
    rows: list[dict]
    totals: dict


class WeightCompressionPass(Pass):
    """A lossy pass that gives selected weight layers new values and stores them compactly.

    Subclasses set ``target_type`` and ``target_range`` (how a ``layers`` entry's value is
    read and bounded), ``lead_columns`` (the columns of a stats row that come before the
    storage figures: the terminal shows the first few) and implement :meth:`decide`.
    """

    exact = False
    target_type: ClassVar[type] = float
    target_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    lead_columns: ClassVar[tuple[str, ...]] = ("layer", "params")

    def __init__(self, **values: Any):
        super().__init__(**values)
        self.check_options()
        check_selection(self.name, self.opts.ops, self.opts.include + self.opts.exclude)
        low, high = self.target_range
        self.targets = check_targets(self.name, self.opts.layers, self.target_type, low, high)

    def check_options(self) -> None:
        """Check the pass's own options (before the selection options are checked)."""

    @property
    def dense_storage(self) -> bool:
        """Whether the new values are written as plain tensors instead of compact storage."""
        return False

    def target(self, site: WeightSite):
        """The layer's own target from ``layers`` (first matching pattern), or None."""
        return pattern_value(self.targets, site, self.target_type) if self.targets else None

    @abc.abstractmethod
    def decide(self, model: Model, sites: list[WeightSite], skipped: Counter, ctx: PassContext) -> Decision:
        """Each selected layer's new value; count in ``skipped`` the layers left alone."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        memo: dict = {}
        found, skipped = find_weights(model, self.opts.ops, memo)
        sites, not_selected = select_weights(found, min_size=self.opts.min_size,
                                             include=self.opts.include, exclude=self.opts.exclude)
        skipped.update(not_selected)
        # Match: decide every layer's new values before anything changes.
        decision = self.decide(model, sites, skipped, ctx)
        # Mutate: place the new storages, drop what they replaced.
        writer = StorageWriter(model, memo)
        for site, value in decision.writes:
            writer.write(site, value, dense=self.dense_storage)
        storages = writer.commit()

        stats = dict(decision.totals)
        stats["storages"] = storages
        stats["skipped"] = dict(sorted(skipped.items()))
        if decision.rows:
            stats["layers"], stats["total"] = self._with_figures(model, ctx, decision.rows)
        return PassResult(modified=bool(decision.writes), stats=stats)

    def _with_figures(self, model: Model, ctx: PassContext, rows: list[dict]) -> tuple[list[dict], dict]:
        """Per-layer rows with the compression report's figures after the leading columns,
        and the report's totals."""
        report = compression_report(model, ctx.reference, ops=self.opts.ops, names=[r["layer"] for r in rows])
        by_name = {r["layer"]: r for r in report["layers"]}
        merged = []
        for r in rows:
            fig = by_name.get(r["layer"], {})
            head = {k: r[k] for k in self.lead_columns}
            head.update({k: fig.get(k) for k in _FIGURES})
            head.update({k: v for k, v in r.items() if k not in head})
            head.update({k: v for k, v in fig.items() if k not in head})
            merged.append(head)
        return merged, report["total"]
