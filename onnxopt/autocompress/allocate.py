"""Allocation: from per-layer sensitivity probes to candidate configurations along the
trade-off between the objective and fidelity.

Each probe measured the output error (``1 - cosine``) of one transform on one layer
alone. The error of a configuration is predicted as the sum of its layers' errors (a
first-order model; the trials measure the truth), and its gain as the sum of the layers'
gains (multiply-accumulates moved to int8 for latency, bytes saved for size). For a
ladder of error budgets around the floor the allocator proposes the configuration with
the largest gain within each budget:

* quantization (one choice per layer, float or quantized): a greedy knapsack — layers by
  error per unit of gain, the longest prefix within the budget; the trials then bisect
  between the longest prefix that met the floor and the shortest that did not;
* Deep Compression (a choice among several sparsities and codebook widths per layer): a
  Lagrangian relaxation of the multiple-choice knapsack — for each multiplier ``lam`` every
  layer takes the option maximising ``gain - lam * error`` independently, and sweeping
  ``lam`` traces the trade-off curve;
* channel groups: a greedy knapsack over groups at a few pruning ratios.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .space import ComputeLayer, PrunableGroup, WeightLayer

__all__ = [
    "BUDGET_STEPS",
    "QuantLadder",
    "quant_ladder",
    "DCOption",
    "dc_options",
    "dc_candidates",
    "channel_candidates",
    "pruned_groups",
    "PRUNE_PROBES",
    "SHARE_PROBE_BITS",
    "CHANNEL_PROBE_RATIO",
]

#: Error budgets, as multiples of the floor's allowance ``1 - min_cosine``.
BUDGET_STEPS = (0.5, 1.0, 2.0, 4.0)
PRUNE_PROBES = (0.5, 0.8)
SHARE_PROBE_BITS = 4
SHARE_BITS = (8, 6, 5, 4, 3)
CHANNEL_PROBE_RATIO = 0.25
CHANNEL_RATIOS = (0.1, 0.2, 0.3)
#: Fewer budgets for channel groups: each candidate is refitted (reconstruct), which is dear.
CHANNEL_STEPS = (1.0, 4.0)


@dataclass
class QuantLadder:
    """Quantizable layers in the order they are best quantized in (least error per gain
    first), with the predicted error of quantizing each prefix."""

    order: list[str]
    errors: list[float]

    def float_layers(self, k: int) -> tuple[str, ...]:
        """The layers kept in float when the first ``k`` are quantized."""
        return tuple(sorted(self.order[k:]))

    def predicted(self, k: int) -> float:
        return float(sum(self.errors[:k]))

    def prefixes(self, allowance: float) -> list[int]:
        """The longest prefix within each budget of the ladder, and the whole list."""
        cumulative = np.cumsum([0.0] + list(self.errors))
        ks = []
        for step in BUDGET_STEPS:
            budget = step * allowance
            k = int(np.searchsorted(cumulative, budget, side="right")) - 1
            ks.append(max(0, min(k, len(self.order))))
        ks.append(len(self.order))
        return sorted({k for k in ks if k > 0})


def quant_ladder(layers: Sequence[ComputeLayer], errors: Mapping[str, float | None], objective: str) -> QuantLadder:
    """Order the layers a quantizing probe changed by error per unit of gain."""
    eligible = [layer for layer in layers if errors.get(layer.name) is not None]

    def gain(layer: ComputeLayer) -> float:
        return float(layer.macs if objective == "latency" else layer.weight_bytes) + 1.0

    order = sorted(eligible, key=lambda layer: (max(errors[layer.name], 0.0) / gain(layer), layer.name))
    return QuantLadder([layer.name for layer in order], [max(errors[layer.name], 0.0) for layer in order])


# --------------------------------------------------------------------------------------
# Deep Compression: per-layer sparsity and codebook width
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DCOption:
    """One choice for one weight: a sparsity and a codebook width (0: not shared), its
    predicted error and bytes saved."""

    sparsity: float
    bits: int
    error: float
    saved: float


def dc_options(layer: WeightLayer, probes: Mapping[tuple[str, float | int], tuple[float, int] | None],
               base_bytes: int) -> list[DCOption]:
    """The options of one layer, from its probes (``("prune", s)`` and ``("share", bits)``
    -> (error, model bytes), None where the probe changed nothing or failed).

    Measured: pruning at :data:`PRUNE_PROBES`, sharing at :data:`SHARE_PROBE_BITS` bits.
    Other widths scale the shared error by 4 per bit (uniform quantization noise) and
    the bytes by the index width; pruned-and-shared layers add both errors, the shared
    part on the surviving weights only, and store the pruned positions plus the indices.
    """
    options = [DCOption(0.0, 0, 0.0, 0.0)]
    share = probes.get(("share", SHARE_PROBE_BITS))
    n = layer.size
    overhead = 0.0
    if share is not None:
        e4, bytes4 = share
        overhead = (base_bytes - bytes4) - (layer.nbytes - _indexed_bytes(n, SHARE_PROBE_BITS))
        for b in SHARE_BITS:
            e = max(e4, 0.0) * 4.0 ** (SHARE_PROBE_BITS - b)
            saved = layer.nbytes - _indexed_bytes(n, b) + overhead
            options.append(DCOption(0.0, b, e, saved))
    for s in PRUNE_PROBES:
        pruned = probes.get(("prune", s))
        if pruned is None:
            continue
        ep, bytes_p = pruned
        saved_p = base_bytes - bytes_p
        options.append(DCOption(s, 0, max(ep, 0.0), saved_p))
        if share is None:
            continue
        nz = n * (1.0 - s)
        positions = max(layer.nbytes - saved_p - nz * 4.0, 0.0)  # what the pruned storage adds
        for b in SHARE_BITS:
            e = max(ep, 0.0) + max(share[0], 0.0) * 4.0 ** (SHARE_PROBE_BITS - b) * (1.0 - s)
            stored = positions + _indexed_bytes(nz, b)
            options.append(DCOption(s, b, e, layer.nbytes - stored + overhead))
    return [o for o in options if o.saved > 0 or (o.sparsity == 0 and o.bits == 0)]


def _indexed_bytes(count: float, bits: int) -> float:
    """Bytes of ``count`` bit-packed ``bits``-bit indices and a float32 codebook."""
    return count * bits / 8.0 + 4.0 * 2**bits


def dc_candidates(options: Mapping[str, list[DCOption]], allowance: float
                  ) -> list[tuple[dict[str, DCOption], float, float]]:
    """Per budget of the ladder, the choice per layer that saves most within it: a list of
    (choice by layer, predicted error, predicted bytes saved), best savings first."""
    if not options:
        return []
    curve = _lagrangian_curve(options)
    found = []
    seen = set()
    for step in BUDGET_STEPS:
        budget = step * allowance
        best = None
        for choice, err, saved in curve:
            if err <= budget and (best is None or saved > best[2]):
                best = (choice, err, saved)
        if best is None:
            continue
        key = tuple(sorted((k, (o.sparsity, o.bits)) for k, o in best[0].items()))
        if key in seen or not any(o.bits or o.sparsity for o in best[0].values()):
            continue
        seen.add(key)
        found.append(best)
    return sorted(found, key=lambda c: -c[2])


def _lagrangian_curve(options: Mapping[str, list[DCOption]]) -> list[tuple[dict[str, DCOption], float, float]]:
    total_saved = sum(max(o.saved for o in opts) for opts in options.values()) or 1.0
    curve = []
    # lam converts error into bytes: from "errors are free" to "errors cost everything"
    for lam in np.geomspace(total_saved * 1e-3, total_saved * 1e7, 81):
        choice = {name: max(opts, key=lambda o: (o.saved - lam * o.error, -o.error))
                  for name, opts in options.items()}
        err = sum(o.error for o in choice.values())
        saved = sum(o.saved for o in choice.values())
        curve.append((choice, err, saved))
    return curve


# --------------------------------------------------------------------------------------
# Channel groups
# --------------------------------------------------------------------------------------


def pruned_groups(groups: Sequence[PrunableGroup], exclude: set[str]) -> list[PrunableGroup]:
    """The groups prune-channels still prunes when the layers ``exclude`` are named in its
    ``exclude`` option (a group stays whole when any layer touching it is named)."""
    return [g for g in groups if not exclude.intersection(g.touching)]


def channel_candidates(groups: Sequence[PrunableGroup], errors: Mapping[int, float | None], allowance: float,
                       ) -> list[tuple[float, tuple[str, ...], float]]:
    """(ratio, layers to exclude, predicted error before reconstruction) per ratio and
    budget: the groups with the least error per parameter pruned, the others named by
    their producing layers. Errors scale with the square of the ratio."""
    eligible = [g for g in groups if errors.get(g.id) is not None]
    if not eligible:
        return []
    order = sorted(eligible, key=lambda g: (max(errors[g.id], 0.0) / (g.params + 1.0), g.id))
    found = []
    seen = set()
    for ratio in CHANNEL_RATIOS:
        scale = (ratio / CHANNEL_PROBE_RATIO) ** 2
        for step in CHANNEL_STEPS:
            # reconstruct recovers most of what pruning loses: the budget before it is wider
            budget = step * allowance * 10.0
            chosen: list[PrunableGroup] = []
            total = 0.0
            for g in order:
                e = max(errors[g.id], 0.0) * scale
                if total + e > budget:
                    break
                chosen.append(g)
                total += e
            if not chosen:
                continue
            keep = {g.id for g in chosen}
            exclude = sorted({name for g in groups if g.id not in keep for name in g.producers})
            actual = pruned_groups(groups, set(exclude))
            if not actual:
                continue
            key = (ratio, frozenset(g.id for g in actual))  # two exclusions may prune the same groups
            if key in seen:
                continue
            seen.add(key)
            predicted = sum(max(errors.get(g.id) or 0.0, 0.0) * scale for g in actual)
            found.append((ratio, tuple(exclude), predicted))
    return found

