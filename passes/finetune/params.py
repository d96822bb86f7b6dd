"""What ``finetune`` trains, how each trained tensor is stored, and how trained values go
back into the same graph.

The student's parameters are the float tensors the layers read in their *trained slots*:
the weight and bias of Conv/ConvTranspose/Gemm/MatMul (a bias also when it is the
constant operand of an Add right after one of them) and the scale and bias of
Batch/Instance/Layer/GroupNormalization (their running mean and variance stay). A slot's
tensor is stored in one of three ways, and training keeps each:

``dense``
    a plain constant (initializer or Constant node). The trained tensor *is* the stored
    one, element for element, in the ONNX layout.
``sparse``, ``dense-idx``, ``sparse-idx``
    the compact storage of ``prune-magnitude``/``share-weights``: a decoder cone of
    integer ops expanding small *leaf* constants (non-zero values, codebooks) into the
    weight. The ops only move values, so every weight element is one leaf element (or a
    constant zero): the cone is evaluated once with each float leaf replaced by the
    numbers 1..n, which gives the exact map. The leaves are what trains, and the weight
    is gathered from them — so a centroid's gradient is the sum of its cluster's
    gradients (Deep Compression's rule) and a pruned position, which no leaf element
    reaches, stays zero. After training the leaves get their new values in place: the
    graph, its nodes and the file's size stay as they were.
``qdq``
    an integer constant read through DequantizeLinear: a float shadow trains through a
    straight-through estimator (scale and zero point fixed) and is quantized again on
    the same grid when written back.

A stored weight value that is exactly zero stays zero: a weight zeroed by pruning (also
one quantized afterwards: its integer sits at the zero point), codebook entry 0 (the
zero of a pruned and shared layer), the zero fillers of a sparse stream.
Leaf elements that an unselected weight (``include``/``exclude``) also reads, and leaves
that other nodes read as data, keep their values. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph import const_value, overwrite_constant
from onnxopt.model import Model, iter_graphs
from onnxopt.weights.decode import decoder_cone, decoder_ends, storage_of, tensor_value

__all__ = ["Quant", "Leaf", "Site", "TrainPlan", "plan_training", "write_back", "restore"]

log = logging.getLogger(__name__)

_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_NORMS = ("BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization")
_ID_LIMIT = 1 << 24  # float32 holds every integer up to here exactly


@dataclass
class Quant:
    """The fixed grid of a Q/DQ weight: ``w = (q - zero_point) * scale``."""

    scale: np.ndarray  # broadcastable to the weight
    zero_point: np.ndarray
    qmin: int
    qmax: int
    dtype: np.dtype  # of the stored integers


@dataclass
class Leaf:
    """A stored constant whose values train (a float shadow of it, for ``qdq``)."""

    tensor: gs.Tensor  # gs.Constant, or the output of a Constant node
    value: np.ndarray  # float values before training (dequantized for qdq)
    frozen: np.ndarray  # bool, same shape: elements that keep their value
    storage: str
    quant: Quant | None = None
    weight: bool = True  # a layer's weight (weight decay applies), not a bias or a scale

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def trainable(self) -> int:
        return int(self.value.size - np.count_nonzero(self.frozen))


@dataclass
class Site:
    """A tensor read by trained slots, and how it is made of leaves.

    ``index is None``: the tensor is leaf ``leaves[0]`` itself (dequantized for qdq).
    Otherwise element ``j`` is element ``index[j] - 1`` of the concatenated flat leaves,
    or ``base[j]`` where ``index[j] == 0``.
    """

    tensor: gs.Tensor
    storage: str
    leaves: list[int]
    uses: list[str]
    index: np.ndarray | None = None
    base: np.ndarray | None = None


@dataclass
class TrainPlan:
    """The sites, their leaves, the values of compact weights that do not train, and
    the tensors skipped (by reason)."""

    sites: list[Site] = field(default_factory=list)
    leaves: list[Leaf] = field(default_factory=list)
    fixed: dict[int, np.ndarray] = field(default_factory=dict)  # id(tensor) -> value
    skipped: Counter = field(default_factory=Counter)

    def site_of(self, tensor: gs.Tensor) -> Site | None:
        for s in self.sites:
            if s.tensor is tensor:
                return s
        return None

    def figures(self) -> dict:
        kinds = Counter(s.storage for s in self.sites)
        return {"tensors": len(self.sites), "storages": dict(sorted(kinds.items())),
                "trained_values": sum(leaf.trainable for leaf in self.leaves),
                "skipped": dict(sorted(self.skipped.items()))}


# --------------------------------------------------------------------------------------
# Which slots train
# --------------------------------------------------------------------------------------


def _valued(t: gs.Tensor, roots: set[int]) -> bool:
    return const_value(t, load=False) is not None or id(t) in roots or _dequantized(t) is not None


def _dequantized(t: gs.Tensor) -> gs.Node | None:
    """The DequantizeLinear producing ``t`` from an integer constant, if any."""
    if isinstance(t, gs.Constant) or len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    if node.op != "DequantizeLinear" or not node.inputs:
        return None
    q = const_value(node.inputs[0], load=False)
    return node if q is not None and np.asarray(q).dtype.kind in "iu" else None


def _slots(node: gs.Node, roots: set[int]) -> list[tuple[int, str]]:
    """(input index, role) of the trained slots of ``node``; role ``weight`` keeps
    zeros, ``param`` (biases, normalization scales) does not need to."""
    ins, op = node.inputs, node.op
    present = [i for i, t in enumerate(ins) if t.name or isinstance(t, gs.Constant)]
    if op in ("Conv", "ConvTranspose"):
        return [(i, "weight" if i == 1 else "param") for i in (1, 2) if i in present]
    if op in ("Gemm", "MatMul") and len(ins) >= 2:
        a, b = _valued(ins[0], roots), _valued(ins[1], roots)
        if a == b:
            return []
        out = [(1 if b else 0, "weight")]
        if op == "Gemm" and 2 in present:
            out.append((2, "param"))
        return out
    if op in _NORMS:
        return [(i, "param") for i in (1, 2) if i in present]
    if op == "Add" and len(ins) == 2:
        for k in (0, 1):
            other = ins[1 - k]
            if (_valued(ins[k], roots) and not _valued(other, roots) and len(other.inputs) == 1
                    and other.inputs[0].op in _LAYERS):
                return [(k, "param")]
    return []


def _roots(model: Model) -> list[gs.Tensor]:
    """Outputs of decoder cones read by a node that is not part of one."""
    return [t for _, _, t in decoder_ends(model.graph) if decoder_cone(t)]


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------


def plan_training(model: Model, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> TrainPlan:
    """Every tensor to train in ``model``, its leaves and maps, as a :class:`TrainPlan`.
    Nothing in the model changes."""
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    plan = TrainPlan()
    roots = _roots(model)
    root_ids = {id(t) for t in roots}
    io = {id(t) for g in iter_graphs(model.graph) for t in list(g.inputs) + list(g.outputs)}

    chosen: dict[int, tuple[gs.Tensor, list[str], str]] = {}
    for g in iter_graphs(model.graph):
        for node in g.nodes:
            if node.domain not in (None, "", "ai.onnx"):
                continue
            for slot, role in _slots(node, root_ids):
                t = node.inputs[slot]
                names = [t.name, node.name or ""]
                if inc and not any(p.search(n) for p in inc for n in names):
                    plan.skipped["not included"] += 1
                    continue
                if any(p.search(n) for p in exc for n in names):
                    plan.skipped["excluded"] += 1
                    continue
                if id(t) in io:
                    plan.skipped["graph input or output"] += 1
                    continue
                entry = chosen.setdefault(id(t), (t, [], role))
                entry[1].append(f"{node.op}:{node.name or node.outputs[0].name}[{slot}]")
                if role == "weight" and entry[2] != "weight":
                    chosen[id(t)] = (t, entry[1], "weight")

    decoded = [t for t in roots if id(t) in chosen]
    leaf_of: dict[int, int] = {}
    for t, uses, role in chosen.values():
        if id(t) in root_ids:
            continue
        if _dequantized(t) is not None:
            _add_qdq(plan, t, uses, role, leaf_of)
        else:
            _add_dense(plan, t, uses, role, leaf_of)
    _add_decoded(plan, model, roots, {id(t) for t in decoded}, chosen, leaf_of)
    return plan


def _float(value) -> np.ndarray | None:
    value = None if value is None else np.asarray(value)
    return value if value is not None and value.dtype == np.float32 else None


def _add_dense(plan: TrainPlan, t: gs.Tensor, uses: list[str], role: str, leaf_of: dict) -> None:
    value = _float(const_value(t, load=False))
    if value is None:
        raw = const_value(t, load=False)
        plan.skipped["computed, not stored" if raw is None else f"dtype {np.asarray(raw).dtype}"] += 1
        return
    frozen = value == 0 if role == "weight" else np.zeros(value.shape, bool)
    leaf_of[id(t)] = len(plan.leaves)
    plan.leaves.append(Leaf(t, value.copy(), frozen, "dense", weight=role == "weight"))
    plan.sites.append(Site(t, "dense", [leaf_of[id(t)]], uses))


def _add_qdq(plan: TrainPlan, t: gs.Tensor, uses: list[str], role: str, leaf_of: dict) -> None:
    node = _dequantized(t)
    q_t = node.inputs[0]
    q = np.asarray(const_value(q_t, load=False))
    scale = const_value(node.inputs[1], load=False) if len(node.inputs) > 1 else None
    zp_t = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    zp = np.zeros((), q.dtype) if zp_t is None else const_value(zp_t, load=False)
    if scale is None or zp is None or node.attrs.get("block_size", 0):
        plan.skipped["quantized weight without constant scale"] += 1
        return
    if len(q_t.outputs) != 1 or id(q_t) in leaf_of:
        plan.skipped["quantized weight read by several nodes"] += 1
        return
    scale, zp = np.asarray(scale, np.float32), np.asarray(zp)
    if scale.size > 1:
        axis = int(node.attrs.get("axis", 1)) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    info = np.iinfo(q.dtype)
    quant = Quant(scale, zp.astype(np.int64), int(info.min), int(info.max), q.dtype)
    value = ((q.astype(np.int64) - quant.zero_point) * scale).astype(np.float32)
    leaf_of[id(q_t)] = len(plan.leaves)
    frozen = value == 0 if role == "weight" else np.zeros(q.shape, bool)
    plan.leaves.append(Leaf(q_t, value, frozen, "qdq", quant, weight=role == "weight"))
    plan.sites.append(Site(t, "qdq", [leaf_of[id(q_t)]], uses))


def _cone_leaves(cone: list[gs.Node]) -> list[gs.Tensor]:
    leaves, seen = [], set()
    for node in cone:
        ins = node.outputs if node.op == "Constant" else node.inputs
        for x in ins:
            if id(x) in seen or const_value(x, load=False) is None:
                continue
            seen.add(id(x))
            if np.asarray(const_value(x, load=False)).dtype.kind == "f":
                leaves.append(x)
    return leaves


def _components(roots: list[gs.Tensor]) -> list[tuple[list[gs.Tensor], set[int], list[gs.Tensor]]]:
    """Roots grouped by shared decoder nodes: (roots, cone node ids, float leaves)."""
    parent = list(range(len(roots)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    cones = [decoder_cone(t) or [] for t in roots]
    owner: dict[int, int] = {}
    for i, cone in enumerate(cones):
        for node in cone:
            j = owner.setdefault(id(node), i)
            parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(roots)):
        groups.setdefault(find(i), []).append(i)
    out = []
    for members in groups.values():
        nodes = [n for i in members for n in cones[i]]
        ids = {id(n) for n in nodes}
        unique = list({id(n): n for n in nodes}.values())
        out.append(([roots[i] for i in members], ids, _cone_leaves(unique)))
    return out


def _add_decoded(plan: TrainPlan, model: Model, roots: list[gs.Tensor], selected: set[int],
                 chosen: dict, leaf_of: dict) -> None:
    """Maps of every compact weight; the selected ones become sites, the others fixed."""
    for members, cone_ids, leaves in _components(roots):
        values = {id(r): tensor_value(r, {}) for r in members}
        for r in members:
            if values[id(r)] is not None:
                plan.fixed[id(r)] = np.asarray(values[id(r)])
        wanted = [r for r in members if id(r) in selected and _float(values[id(r)]) is not None]
        for r in members:
            if id(r) in selected and r not in wanted:
                plan.skipped["compact weight not float32"] += 1
        if not wanted:
            continue
        sizes = [np.asarray(const_value(x, load=False)).size for x in leaves]
        if sum(sizes) >= _ID_LIMIT:
            plan.skipped["compact block too large to map"] += len(wanted)
            continue
        memo, offsets, start = {}, [], 1
        for x, n in zip(leaves, sizes):  # numbered in the leaf's own type, as the decoder's ops expect
            value = np.asarray(const_value(x, load=False))
            memo[id(x)] = np.arange(start, start + n, dtype=np.float64).astype(value.dtype).reshape(value.shape)
            offsets.append(start)
            start += n
        maps = {id(r): tensor_value(r, memo) for r in members}
        flat = np.concatenate([[0.0]] + [np.asarray(const_value(x, load=False), np.float64).ravel()
                                         for x in leaves])
        refs_sel = np.zeros(flat.size, bool)
        refs_other = np.zeros(flat.size, bool)
        unknown = False  # a weight of the block whose map is unknown: nothing may change
        for r in members:
            idx = _exact_map(maps[id(r)], values[id(r)], flat)
            if idx is None:
                if r in wanted:
                    plan.skipped["compact weight not a pure gather"] += 1
                    wanted.remove(r)
                unknown = True
                continue
            (refs_sel if r in wanted else refs_other)[idx.ravel()] = True
            maps[id(r)] = idx
        if not wanted:
            continue
        outside = _read_outside(leaves, cone_ids)
        for x, n, off in zip(leaves, sizes, offsets):
            value = np.asarray(const_value(x, load=False))
            frozen = (value == 0) | ~refs_sel[off:off + n].reshape(value.shape) \
                | refs_other[off:off + n].reshape(value.shape)
            if unknown or id(x) in outside or value.dtype != np.float32:
                frozen[...] = True
            leaf_of[id(x)] = len(plan.leaves)
            plan.leaves.append(Leaf(x, value.astype(np.float32), frozen, storage_of(wanted[0])))
        for r in wanted:
            idx = maps[id(r)]
            base = np.where(idx == 0, values[id(r)], 0).astype(np.float32)
            plan.sites.append(Site(r, storage_of(r), [leaf_of[id(x)] for x in leaves], chosen[id(r)][1],
                                   idx, base if base.any() else None))


def _exact_map(ids, actual, flat: np.ndarray) -> np.ndarray | None:
    """The int64 map if evaluating with numbered leaves gave exact, in-range numbers
    that reproduce ``actual``; None otherwise."""
    if ids is None or actual is None:
        return None
    ids = np.asarray(ids, np.float64)
    if ids.shape != np.shape(actual) or not np.all(np.isfinite(ids)) or np.any(ids != np.round(ids)):
        return None
    idx = ids.astype(np.int64)
    if idx.min(initial=0) < 0 or idx.max(initial=0) >= flat.size:
        return None
    actual = np.asarray(actual, np.float64)
    rebuilt = np.where(idx > 0, flat[idx], actual)
    return idx if np.array_equal(rebuilt, actual) else None


def _read_outside(leaves: list[gs.Tensor], cone_ids: set[int]) -> set[int]:
    out = set()
    for x in leaves:
        if any(id(c) not in cone_ids for c in x.outputs):
            out.add(id(x))
    return out


# --------------------------------------------------------------------------------------
# Writing back
# --------------------------------------------------------------------------------------


def stored_values(leaf: Leaf, trained: np.ndarray) -> np.ndarray:
    """What ``leaf`` stores after training to ``trained`` (float values): frozen
    elements as they were; quantized leaves rounded onto their grid."""
    new = np.where(leaf.frozen, leaf.value, np.asarray(trained, np.float32).reshape(leaf.value.shape))
    if leaf.quant is None:
        return new.astype(np.float32)
    qt = leaf.quant
    q = np.round(new.astype(np.float64) / qt.scale) + qt.zero_point
    return np.clip(q, qt.qmin, qt.qmax).astype(qt.dtype)


def _get(t: gs.Tensor) -> np.ndarray:
    return np.asarray(const_value(t, load=False))


def write_back(plan: TrainPlan, trained: Sequence[np.ndarray]) -> list[tuple[gs.Tensor, np.ndarray]]:
    """Give every leaf its trained values, in place (same tensor, shape and dtype);
    returns what :func:`restore` needs to undo it."""
    undo = []
    for leaf, values in zip(plan.leaves, trained):
        if not leaf.trainable:
            continue
        new = stored_values(leaf, values)
        old = _get(leaf.tensor)
        if new.shape != old.shape or new.dtype != old.dtype:
            raise ValueError(f"{leaf.name}: trained value {new.dtype}{list(new.shape)} does not fit "
                             f"{old.dtype}{list(old.shape)}")
        if np.array_equal(new, old):
            continue
        undo.append((leaf.tensor, old))
        overwrite_constant(leaf.tensor, np.ascontiguousarray(new))
    return undo


def restore(undo: list[tuple[gs.Tensor, np.ndarray]]) -> None:
    """Put back the values :func:`write_back` replaced."""
    for t, old in reversed(undo):
        overwrite_constant(t, old)


def onnx_float(dtype) -> bool:
    """Whether an ONNX element type (int) or numpy dtype is a float type."""
    if isinstance(dtype, int):
        return dtype in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                         onnx.TensorProto.BFLOAT16)
    return dtype is not None and np.dtype(dtype).kind == "f"
