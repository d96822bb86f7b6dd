"""The jobs of a search: the probes of each family, the presets measured beside the
candidates, and the candidates themselves — each a pipeline string and where it starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..framework import presets, registered_passes
from .allocate import CHANNEL_PROBE_RATIO, PRUNE_PROBES, SHARE_PROBE_BITS
from .space import CHANNEL_ROUND, Config, Layers, exact_pattern, option_value, pipeline

__all__ = ["PRESETS", "probe_jobs", "preset_jobs", "config_job", "probe_error"]

#: Reference points measured in every search, where registered (a pass name counts too).
PRESETS = ("default", "int8", "int8-dynamic", "int4", "fp16", "compress")
#: Calibration samples a quantization probe calibrates on (a probe ranks layers; the
#: trials calibrate on every calibration sample).
PROBE_CALIBRATION = 4
#: Share of the weight bytes whose layers prune/share probe (the smallest layers stay as they are).
BULK = 0.98


def probe_error(result: dict) -> float | None:
    """``1 - cosine`` of a probe that changed the model; None where it changed nothing
    (the layer is not a candidate of that transform) or failed."""
    if result.get("error") or not result.get("modified") or result.get("cosine") is None:
        return None
    return max(0.0, 1.0 - float(result["cosine"]))


def _others(names: Sequence[str], keep: str) -> str:
    return option_value([n for n in names if n != keep])


def probe_jobs(families: Sequence[str], layers: Layers, only: Mapping[str, set[str] | None] | None = None
               ) -> list[dict]:
    """One job per (family, layer, option): the transform on that layer alone, on the
    cleaned model. ``only`` limits a family's probes to the layers named (those the
    family changed when applied to the whole model)."""
    jobs: list[dict] = []
    only = only or {}

    def wanted(family: str, name: str) -> bool:
        return only.get(family) is None or name in only[family]

    def add(family: str, layer, option, text: str, start: str = "clean") -> None:
        jobs.append({"kind": "probe", "family": family, "layer": layer, "option": option,
                     "pipeline": text, "start": start})

    names = [layer.name for layer in layers.compute]
    # largest first: a phase that runs out of time has probed the layers that matter most
    by_macs = sorted(layers.compute, key=lambda x: (-x.macs, x.name))
    if "int8" in families:
        for layer in by_macs:
            if not wanted("int8", layer.name):
                continue
            add("int8", layer.name, None,
                f"quantize(mode=static,method=percentile,calib_samples={PROBE_CALIBRATION},"
                f"check_fusion=false,exclude={_others(names, layer.name)})")
    if "int4" in families:
        int4_names = [layer.name for layer in layers.int4]
        for layer in sorted(layers.int4, key=lambda x: (-x.macs, x.name)):
            if not wanted("int4", layer.name):
                continue
            add("int4", layer.name, None, f"quantize(mode=weight-only,bits=4,exclude={_others(int4_names, layer.name)})",
                start="clean_int4")
    weights = _bulk(layers.weights)
    if "prune" in families:
        for w in weights:
            for s in PRUNE_PROBES:
                add("prune", w.name, s, f"prune-magnitude(sparsity={s:g},include={option_value([exact_pattern([w.name])])})")
    if "share" in families:
        for w in weights:
            add("share", w.name, SHARE_PROBE_BITS,
                f"share-weights(bits={SHARE_PROBE_BITS},include={option_value([exact_pattern([w.name])])})")
    if "channels" in families:
        for g in layers.groups:
            exclude = sorted({n for other in layers.groups if other.id != g.id for n in other.producers}
                             - set(g.touching))
            extra = f",exclude={option_value(exclude)}" if exclude else ""
            add("channels", str(g.id), CHANNEL_PROBE_RATIO,
                f"prune-channels(ratio={CHANNEL_PROBE_RATIO:g},round_to={CHANNEL_ROUND}{extra})")
    return jobs


def _bulk(weights: Sequence, share: float = BULK) -> list:
    """The largest weights holding ``share`` of all the weight bytes, largest first: the
    rest cannot change a model's size by much and are left as they are."""
    order = sorted(weights, key=lambda w: (-w.nbytes, w.name))
    total = sum(w.nbytes for w in order) or 1
    kept, running = [], 0
    for w in order:
        if running >= share * total:
            break
        kept.append(w)
        running += w.nbytes
    return kept


def preset_jobs(families: Sequence[str] = ()) -> tuple[list[dict], list[str]]:
    """The reference points: each preset (and the fp16 pass) run on the original model,
    and notes on those left out: a preset that trains (``compress``) only where
    ``finetune`` is in the space — a space without it asks for no training. A preset
    that trains says so (``trains``): it takes minutes where the others take seconds."""
    known = presets()
    have = set(known) | set(registered_passes())
    jobs, notes = [], []
    for name in PRESETS:
        if name not in have:
            continue
        trains = name in known and "finetune" in known[name][0]
        if trains and "finetune" not in families:
            notes.append(f"preset {name}: not measured, it fine-tunes and finetune is not in the space")
            continue
        jobs.append({"kind": "trial", "type": "preset", "preset": name, "pipeline": name, "start": "original",
                     "trains": trains})
    return jobs, notes


def config_job(config: Config, *, predicted: float | None = None, watch: Sequence[str] = ()) -> dict:
    """A candidate; ``watch`` names layers whose change the trial reports (``changed_layers``)."""
    return {"kind": "trial", "type": "trial", "preset": None, "pipeline": pipeline(config), "start": "original",
            "config": config, "label": config.label, "predicted_error": predicted, "watch": list(watch)}
