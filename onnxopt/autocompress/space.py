"""The search space: which compression families a search may use, the layers each one
acts on, and how a configuration becomes a pipeline string.

A search never rewrites a model itself: every probe and every candidate is a pipeline of
registered passes, so the chosen model is reproduced by ``onnxopt optimize -p "..."``. A
per-layer choice is therefore always spelled with pass options:

* ``int8`` — static int8 (``quantize(mode=static,method=percentile)``), with the layers
  kept in float named in ``exclude``;
* ``int4`` — blockwise int4 MatMul weights (``quantize(mode=weight-only,bits=4)``), its
  float layers in ``exclude``; it runs after a clean-up that leaves 2-D MatMul+Add
  unfused (weight-only mode rewrites MatMul, not Gemm);
* ``fp16`` — the whole model in float16 (``fp16``);
* ``prune`` — per-layer sparsities (``prune-magnitude(layers=PATTERN=SPARSITY)``);
* ``share`` — per-layer codebook widths (``share-weights(layers=PATTERN=BITS)``);
* ``channels`` — structured pruning at one ratio with whole groups left out
  (``prune-channels(ratio=R,exclude=...)``), followed by ``reconstruct``;
* ``finetune`` — the ``finetune`` pass after the compression, where it is registered.

Quantization and the compact storages of ``prune``/``share`` do not compose (a quantized
weight is no longer a plain constant), so a configuration takes one *branch*: int8, int4,
fp16, or Deep Compression (prune and share, optionally followed by fp16).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError
from ..framework import presets, registered_passes
from ..model import Model

__all__ = [
    "FAMILIES",
    "OBJECTIVES",
    "LATENCY_FAMILIES",
    "parse_space",
    "ComputeLayer",
    "WeightLayer",
    "PrunableGroup",
    "Layers",
    "discover",
    "Config",
    "pipeline",
    "option_value",
    "exact_pattern",
    "int4_cleanup",
]

FAMILIES = ("int8", "int4", "fp16", "prune", "share", "channels", "finetune")
#: Families searched only when the space names them: training takes minutes per candidate,
#: and on the benchmark models it did not change what a 10-minute search chooses.
OPT_IN = ("finetune",)
OBJECTIVES = ("latency", "size")
#: Families that can make a model run faster on onnxruntime's CPU provider; the compact
#: storages of prune/share are expanded when the session is created, so they cannot.
LATENCY_FAMILIES = ("int8", "int4", "fp16", "channels", "finetune")
COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
#: Smallest weight the prune/share passes touch by default (their ``min_size``).
MIN_WEIGHT_SIZE = 512
CLEANUP = "default"
INT8 = "quantize(mode=static,method=percentile{extra})"
INT4 = "quantize(mode=weight-only,bits=4{extra})"
CHANNEL_ROUND = 8
#: The training a candidate of the ``finetune`` family ends with: the pass's defaults.
FINETUNE = "finetune(loss=cosine)"


def parse_space(text: str | Sequence[str] | None, objective: str) -> tuple[list[str], list[str]]:
    """The families to search (in :data:`FAMILIES` order) and notes on those left out.

    ``None`` means every family that can move the objective except ``finetune``, which
    trains candidates for minutes each and is asked for by name (:data:`OPT_IN`). An
    unknown family, or ``finetune`` without the pass or without PyTorch, raises
    :class:`UsageError`.
    """
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown objective '{objective}'; valid: {', '.join(OBJECTIVES)}")
    have_finetune = "finetune" in registered_passes()
    can_train = have_finetune and importlib.util.find_spec("torch") is not None
    notes = []
    if text is None:
        wanted = [f for f in FAMILIES if f not in OPT_IN]
        if have_finetune:
            notes.append("finetune: not in the default space, it trains candidates for minutes; "
                         "add it with --space ...,finetune"
                         + ("" if can_train else " (it needs PyTorch: pip install 'onnxopt[train]')"))
        explicit = False
    else:
        items = text.split(",") if isinstance(text, str) else list(text)
        wanted = [i.strip() for i in items if i.strip()]
        unknown = [w for w in wanted if w not in FAMILIES]
        if unknown or not wanted:
            raise UsageError(f"unknown search family {', '.join(repr(u) for u in unknown) or '(none given)'}; "
                             f"valid: {', '.join(FAMILIES)}")
        if "finetune" in wanted and not have_finetune:
            raise UsageError("search family 'finetune' needs the finetune pass, which this installation "
                             "does not have")
        if "finetune" in wanted and not can_train:
            raise UsageError("search family 'finetune' needs PyTorch: pip install 'onnxopt[train]'")
        explicit = True
    chosen = []
    for f in FAMILIES:
        if f not in wanted:
            continue
        if objective == "latency" and f not in LATENCY_FAMILIES:
            notes.append(f"{f}: left out, it cannot make the model faster (its storage is expanded "
                         "when onnxruntime creates the session)")
            continue
        chosen.append(f)
    if not chosen:
        raise UsageError(f"--space {','.join(wanted)}: no family there can improve {objective}")
    if explicit and "finetune" in chosen and len(chosen) == 1:
        raise UsageError("--space finetune: finetune recovers accuracy after a compression; "
                         "give a compression family too")
    return chosen, notes


def int4_cleanup() -> str:
    """The ``default`` clean-up without fusing MatMul+Add into Gemm (weight-only int4
    rewrites MatMul only)."""
    text = presets()[CLEANUP][0]
    return re.sub(r"(?<![\w-])fuse(?![\w(-])", "fuse(skip=matmul-add)", text)


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComputeLayer:
    """A compute node (Conv/MatMul/Gemm) of the cleaned model: its name, op, the
    multiply-accumulates it runs on the probe sample, and its weight's bytes."""

    name: str
    op: str
    macs: int
    weight_bytes: int


@dataclass(frozen=True)
class WeightLayer:
    """A weight that prune-magnitude and share-weights may compress (their candidates)."""

    name: str
    size: int
    nbytes: int


@dataclass(frozen=True)
class PrunableGroup:
    """A prunable channel group: the layers producing its channels (``producers``) and
    every layer touching them (``touching``: producers and readers)."""

    id: int
    size: int
    producers: tuple[str, ...]
    touching: tuple[str, ...]
    params: int


@dataclass
class Layers:
    """What the families act on, found on the cleaned model(s)."""

    compute: list[ComputeLayer] = field(default_factory=list)
    int4: list[ComputeLayer] = field(default_factory=list)
    weights: list[WeightLayer] = field(default_factory=list)
    groups: list[PrunableGroup] = field(default_factory=list)


def _nameable(name: str) -> bool:
    """Whether a name can be written in a pipeline option (items are ``;``-separated and a
    value is quoted with ' or ")."""
    return bool(name) and ";" not in name and not ("'" in name and '"' in name)


def _compute_layers(model: Model, sample: dict | None, ops: Sequence[str] = COMPUTE_OPS,
                    constant_weight: bool = False) -> list[ComputeLayer]:
    import onnx_graphsurgeon as gs

    nodes = [n for n in model.graph.nodes if n.op in ops and _nameable(n.name)]
    if constant_weight:
        nodes = [n for n in nodes if len(n.inputs) > 1 and isinstance(n.inputs[1], gs.Constant)
                 and len(n.inputs[1].shape or ()) == 2]
    shapes = _output_shapes(model, nodes, sample)
    out = []
    for n in nodes:
        w = n.inputs[1] if len(n.inputs) > 1 else None
        wbytes = int(w.values.nbytes) if isinstance(w, gs.Constant) else 0
        out.append(ComputeLayer(n.name, n.op, _macs(n, shapes), wbytes))
    return out


def _output_shapes(model: Model, nodes, sample: dict | None) -> dict[str, tuple]:
    """Shapes of the compute nodes' first input and output on ``sample`` (empty without)."""
    if sample is None or not nodes:
        return {}
    from ..activations import capture

    names = []
    for n in nodes:
        names += [n.inputs[0].name, n.outputs[0].name]
    names = [x for x in dict.fromkeys(names) if x]
    graph_inputs = {t.name for t in model.graph.inputs}
    try:
        values = next(capture(model, [x for x in names if x not in graph_inputs], [sample]))
    except Exception:  # shapes only refine the estimate: without them MACs = weight size
        return {}
    shapes = {k: tuple(np.asarray(v).shape) for k, v in values.items()}
    shapes.update({k: tuple(np.asarray(v).shape) for k, v in sample.items()})
    return shapes


def _macs(node, shapes: dict[str, tuple]) -> int:
    import onnx_graphsurgeon as gs

    out = shapes.get(node.outputs[0].name)
    w = node.inputs[1] if len(node.inputs) > 1 else None
    wshape = tuple(w.shape) if isinstance(w, gs.Constant) else None
    if out is None:
        return int(np.prod(wshape)) if wshape else 0
    elems = int(np.prod(out))
    if node.op == "Conv" and wshape:
        return elems * int(np.prod(wshape[1:]))
    a = shapes.get(node.inputs[0].name)
    if node.op == "Gemm" and a is not None:
        k = a[0] if node.attrs.get("transA", 0) else a[-1]
        return elems * int(k)
    if a is not None and len(a) >= 1:
        return elems * int(a[-1])
    return elems


def _weight_layers(model: Model) -> list[WeightLayer]:
    from ..weights.sites import find_weights, select_weights

    found, _ = find_weights(model)
    sites, _ = select_weights(found, min_size=MIN_WEIGHT_SIZE)
    return [WeightLayer(s.name, s.size, int(s.value.nbytes)) for s in sites if _nameable(s.name)]


def _channel_groups(model: Model) -> list[PrunableGroup]:
    from ..channels import analyze

    found = analyze(model)
    out = []
    for g in found.prunable:
        producers = sorted({m.node.name for m in g.members if m.role in ("out", "tied") and m.node.name})
        touching = sorted({m.node.name for m in g.members if m.role in ("out", "tied", "in") and m.node.name})
        if not producers or not all(_nameable(n) for n in touching):
            continue
        params = sum(int(np.prod(m.node.inputs[m.index].shape or (0,))) // max(g.size, 1)
                     for m in g.members if m.role in ("out", "in", "tied"))
        out.append(PrunableGroup(g.id, g.size, tuple(producers), tuple(touching), params))
    return out


def discover(clean: Model, families: Iterable[str], sample: dict | None,
             int4_clean: Model | None = None) -> Layers:
    """The layers each family in ``families`` may change, found on the cleaned model
    (``int4_clean`` for int4). ``sample`` (one feed) gives activation shapes for the
    multiply-accumulate counts."""
    families = set(families)
    layers = Layers()
    if "int8" in families or "channels" in families:
        layers.compute = _compute_layers(clean, sample)
    if "int4" in families and int4_clean is not None:
        layers.int4 = _compute_layers(int4_clean, sample, ("MatMul",), constant_weight=True)
    if families & {"prune", "share"}:
        layers.weights = _weight_layers(clean)
    if "channels" in families:
        layers.groups = _channel_groups(clean)
    return layers


# --------------------------------------------------------------------------------------
# Configurations and their pipelines
# --------------------------------------------------------------------------------------


def option_value(items: Sequence[str]) -> str:
    """A list option's value (``;``-separated), quoted when the pipeline syntax needs it."""
    text = ";".join(items)
    if not re.search(r"[,()'\"\s]", text):
        return text
    quote = '"' if '"' not in text else "'"  # double first: a shell command single-quotes the pipeline
    return f"{quote}{text}{quote}"


def exact_pattern(names: Iterable[str]) -> str:
    """A regular expression matching exactly these names (prune/share ``layers`` patterns)."""
    names = sorted(set(names))
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


@dataclass(frozen=True)
class Config:
    """One candidate: a branch and its per-layer choices.

    ``branch``: ``int8``, ``int4``, ``fp16`` or ``dc`` (Deep Compression).
    ``float_layers``: layers a quantizing branch keeps in float. ``prune``/``share``:
    (weight, sparsity) and (weight, bits) pairs. ``fp16``: float16 after the branch.
    ``channels``/``channel_exclude``: a structured-pruning ratio and the layers whose
    groups stay whole. ``finetune``: the finetune pass last.
    """

    branch: str
    float_layers: tuple[str, ...] = ()
    prune: tuple[tuple[str, float], ...] = ()
    share: tuple[tuple[str, int], ...] = ()
    fp16: bool = False
    channels: float = 0.0
    channel_exclude: tuple[str, ...] = ()
    finetune: bool = False
    label: str = ""


def _grouped(pairs: Iterable[tuple[str, object]]) -> list[tuple[object, list[str]]]:
    by_value: dict[object, list[str]] = {}
    for name, value in pairs:
        by_value.setdefault(value, []).append(name)
    return sorted(by_value.items(), key=lambda kv: str(kv[0]))


def _fmt(value: float) -> str:
    return f"{value:g}"


def pipeline(config: Config) -> str:
    """The pipeline string that builds ``config`` from the original model."""
    parts = [int4_cleanup() if config.branch == "int4" else CLEANUP]
    if config.channels > 0:
        extra = f",exclude={option_value(sorted(config.channel_exclude))}" if config.channel_exclude else ""
        parts.append(f"prune-channels(ratio={_fmt(config.channels)},round_to={CHANNEL_ROUND}{extra})")
        parts.append("reconstruct")
    if config.branch == "dc":
        prune = [(n, s) for n, s in config.prune if s > 0]
        if prune:
            groups = _grouped(prune)
            specs = [f"{exact_pattern(names)}={_fmt(value)}" for value, names in groups]
            parts.append(f"prune-magnitude(sparsity=0,layers={option_value(specs)},"
                         f"include={option_value([exact_pattern(n for n, _ in prune)])})")
        if config.share:
            groups = _grouped(config.share)
            specs = [f"{exact_pattern(names)}={value}" for value, names in groups]
            parts.append(f"share-weights(layers={option_value(specs)},"
                         f"include={option_value([exact_pattern(n for n, _ in config.share)])})")
    elif config.branch in ("int8", "int4"):
        template = INT8 if config.branch == "int8" else INT4
        extra = f",exclude={option_value(sorted(config.float_layers))}" if config.float_layers else ""
        parts.append(template.format(extra=extra))
    if config.finetune:  # trained in float32, then stored in float16 where asked
        parts.append(FINETUNE)
    if config.fp16 or config.branch == "fp16":
        parts.append("fp16")
    return ",".join(parts)
