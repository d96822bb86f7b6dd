"""reconstruct: refit compressed layers so that they reproduce the teacher's activations.

After a lossy pass each layer sees different inputs and may have lost weights; the
original model (the teacher, ``ctx.reference``) still knows what each layer should
output. For every layer whose output may have moved, the student's inputs X and the
teacher's outputs Y of that layer are collected on the calibration data and the weights
and bias refitted by ridge least squares, ``W = (XᵀX + λI)⁻¹ XᵀY`` (He et al. 2017; Luo
et al. 2017, ThiNet) — distillation layer by layer, without a training framework. Only
XᵀX and XᵀY are kept (convolutions on sampled im2col rows), layers are refitted in
topological ``stages`` so that later ones see the refitted earlier ones, and a refit is
kept only if it lowers the layer's error.

Student and teacher layers are matched by output tensor name and, after pruning, by the
channel map in the model's metadata. Layers: Conv (1-D/2-D, grouped and depthwise
included), ConvTranspose with stride equal to kernel, Gemm, MatMul with a constant 2-D
weight, with a following per-channel bias Add. Layers whose weights are not constant,
and every layer with ``bias_only``, get bias correction: ``b += E[Y_teacher − Y_student]``.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.channels import channel_maps, layer_key
from onnxopt.errors import UsageError
from onnxopt.framework import Opt, Pass, PassContext, PassResult, register
from onnxopt.graph import const_through_shape_ops, write_constant
from onnxopt.model import Model
from onnxopt.shapes import infer_shapes

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["Reconstruct", "find_layers", "Layer"]

log = logging.getLogger(__name__)

_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Layer:
    """A student layer matched with the teacher's."""

    node: gs.Node
    key: str
    x: str  # student tensor: the layer's input
    target: str  # tensor whose teacher value the layer must reproduce
    bias: tuple[gs.Node, int] | None  # where the bias lives (node, input index)
    bias_shape: tuple | None
    out_map: np.ndarray  # teacher channel of each student output channel
    weights: bool  # whether the weights are constant floats (else: bias only)
    index: int = 0
    acc: dict = field(default_factory=dict)


@register
class Reconstruct(Pass):
    """Refit the weights and bias of every layer whose output moved, by ridge least
    squares on the teacher's activations (``bias_only``: correct the biases only)."""

    name = "reconstruct"
    summary = "teacher-guided: refit a compressed layer's weights/bias to reproduce the original's activations"
    exact = False
    options = {
        "bias_only": Opt(bool, False, "only correct biases by the mean error (cheap)"),
        "layers": Opt(str, "affected", "which layers: those whose output may have moved (changed "
                      "weights and everything after them), only changed ones, or all",
                      choices=("affected", "changed", "all")),
        "ridge": Opt(float, 1e-3, "ridge strength, relative to the mean energy of the inputs", minimum=0.0),
        "samples": Opt(int, 64, "calibration samples to use", minimum=1),
        "patches": Opt(int, 1024, "output positions sampled per sample and layer (im2col rows)", minimum=1),
        "stages": Opt(int, 0, "refit in at most this many sequential stages (0: one per layer)", minimum=0),
        "max_features": Opt(int, 6144, "skip layers with more inputs than this (X^T X memory)", minimum=1),
    }

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        teacher = ctx.reference
        if teacher is None:
            raise UsageError(f"pass '{self.name}' needs the original model as teacher (PassContext.reference)")
        calibration = ctx.require_calibration(self.name)
        skipped: Counter = Counter()
        layers = find_layers(model, teacher, self.opts.layers, skipped)
        stats: dict = {"layers": len(layers), "refit": 0, "bias_corrected": 0, "rejected": 0,
                       "skipped": dict(skipped), "error_before": None, "error_after": None}
        layers = [la for la in layers if self._fits(la, skipped)]
        stats["skipped"] = dict(sorted(skipped.items()))
        if not layers:
            return PassResult(False, stats)
        count = len(layers) if self.opts.stages == 0 else max(1, min(self.opts.stages, len(layers)))
        chunks = [[layers[i] for i in c] for c in np.array_split(np.arange(len(layers)), count) if len(c)]
        samples = list(itertools.islice(iter(calibration), self.opts.samples))
        student = _Staged(lambda: model.to_proto(), samples, [[_node_pos_key(la) for la in c] for c in chunks])
        teacher_proto = teacher.to_proto()
        teacher_run = _Staged(lambda: teacher_proto, samples, [[la.target for la in c] for c in chunks])
        rng = np.random.default_rng(ctx.seed)
        before, after = [], []
        modified = False
        with ctx.progress.task("reconstruct", total=len(chunks)) as advance:
            for k, part in enumerate(chunks):
                self._collect(part, student, teacher_run, k, rng)
                for layer in part:
                    outcome = self._refit(model, layer)
                    layer.acc.clear()
                    if outcome is None:
                        stats["rejected"] += 1
                        continue
                    kind, err0, err1 = outcome
                    stats["refit" if kind == "weights" else "bias_corrected"] += 1
                    before.append(err0)
                    after.append(err1)
                    modified = True
                advance(1)
        stats["stages"] = len(chunks)
        stats["samples"] = len(samples)
        if before:
            stats["error_before"] = round(float(np.mean(before)), 6)
            stats["error_after"] = round(float(np.mean(after)), 6)
        return PassResult(modified, stats)

    # ---- which layers -----------------------------------------------------------------

    def _fits(self, layer: Layer, skipped: Counter) -> bool:
        if self.opts.bias_only or not layer.weights:
            if layer.bias is None and layer.node.op not in ("Conv", "ConvTranspose", "Gemm"):
                skipped["no bias to correct"] += 1
                return False
            return True
        features = _features(layer)
        if features is None:
            skipped[f"{layer.node.op} not supported"] += 1
            return False
        if features > self.opts.max_features:
            skipped["too many inputs"] += 1
            return False
        return True

    # ---- data ---------------------------------------------------------------------------

    def _collect(self, layers: list[Layer], student: _Staged, teacher: _Staged, k: int, rng) -> None:
        bias_mode = {id(la): self.opts.bias_only or not la.weights for la in layers}
        s_names = sorted({la.x for la in layers if not bias_mode[id(la)]}
                         | {la.target for la in layers if bias_mode[id(la)]})
        t_names = sorted({la.target for la in layers})
        s_all = student.stage(k, s_names)
        t_all = teacher.stage(k, t_names)
        for s_vals, t_vals in zip(s_all, t_all):
            for la in layers:
                yt = np.asarray(t_vals[la.target], dtype=np.float64)
                yt = np.take(yt, la.out_map, axis=_channel_axis(la, yt.ndim))
                acc = la.acc
                if bias_mode[id(la)]:
                    ys = np.asarray(s_vals[la.target], dtype=np.float64)
                    axis = _channel_axis(la, ys.ndim)
                    diff = np.moveaxis(yt - ys, axis, 0).reshape(yt.shape[axis], -1)
                    acc["diff"] = acc.get("diff", 0.0) + diff.sum(axis=1)
                    acc["sq"] = acc.get("sq", 0.0) + (diff * diff).sum(axis=1)
                    acc["n"] = acc.get("n", 0) + diff.shape[1]
                    acc["yy"] = acc.get("yy", 0.0) + float((yt * yt).sum())
                    continue
                x = np.asarray(s_vals[la.x], dtype=np.float64)
                X, Y = _rows(la, x, yt, rng, self.opts.patches)  # [G, P, F], [G, P, O]
                if la.bias is not None or _can_add_bias(la):
                    X = np.concatenate([X, np.ones(X.shape[:2] + (1,))], axis=2)
                Xt = X.transpose(0, 2, 1)
                acc["xx"] = acc.get("xx", 0.0) + Xt @ X  # batched BLAS; einsum would not be
                acc["xy"] = acc.get("xy", 0.0) + Xt @ Y
                acc["yy"] = acc.get("yy", 0.0) + (Y * Y).sum(axis=1)

    # ---- the fit ----------------------------------------------------------------------

    def _refit(self, model: Model, la: Layer) -> tuple[str, float, float] | None:
        acc = la.acc
        if self.opts.bias_only or not la.weights:
            if not acc or acc.get("n", 0) == 0:
                return None
            mean = acc["diff"] / acc["n"]
            err0 = float(acc["sq"].sum()) / max(acc["yy"], 1e-30)
            err1 = float((acc["sq"] - acc["n"] * mean * mean).sum()) / max(acc["yy"], 1e-30)
            bias = _current_bias(la)
            _write_bias(model, la, bias + mean)
            return "bias", err0, err1
        if "xx" not in acc:
            return None
        A, B, yy = acc["xx"], acc["xy"], acc["yy"]
        F = A.shape[1]
        with_bias = F == _features(la) + 1
        W0 = _current(la, with_bias)
        n_feat = F - 1 if with_bias else F
        diag = np.einsum("gii->gi", A[:, :n_feat, :n_feat])
        lam = self.opts.ridge * np.maximum(diag.mean(axis=1), 1e-12)
        reg = np.zeros_like(A)
        idx = np.arange(n_feat)
        reg[:, idx, idx] = lam[:, None]
        # Ridge towards the current weights, not towards zero: where the data says little
        # (few rows, as for a squeeze-excitation layer fed by a global pool) the layer
        # stays what it was.
        rhs = B + np.einsum("gij,gjo->gio", reg, W0)
        try:
            W1 = np.linalg.solve(A + reg, rhs)
        except np.linalg.LinAlgError:
            W1 = np.stack([np.linalg.lstsq(A[g] + reg[g], rhs[g], rcond=None)[0] for g in range(A.shape[0])])
        total = float(yy.sum())
        err0 = _error(A, B, yy, W0) / max(total, 1e-30)
        err1 = _error(A, B, yy, W1) / max(total, 1e-30)
        if not np.isfinite(err1) or err1 >= err0:
            log.debug("reconstruct: %s kept (refit error %.4g >= %.4g)", la.key, err1, err0)
            return None
        _write_weights(model, la, W1, with_bias)
        log.debug("reconstruct: %s error %.4g -> %.4g", la.key, err0, err1)
        return "weights", err0, err1


def _error(A, B, yy, W) -> float:
    """sum ||Y - X W||² from the accumulated sums."""
    return float(np.einsum("gio,gij,gjo->", W, A, W) - 2 * np.einsum("gio,gio->", W, B) + yy.sum())


# --------------------------------------------------------------------------------------
# Running a model stage by stage
# --------------------------------------------------------------------------------------


def _node_pos_key(la: Layer) -> str:
    return la.node.outputs[0].name


class _Staged:
    """Runs a model over the calibration samples in stages, so that refitting layer by
    layer costs about two passes over the data, not one per layer.

    Stage ``k`` computes what its layers read, starting from the tensors kept at the cut
    of stage ``k - 1``, and moves the cut to just before the first node that produces a
    tensor named in ``marks[k:]`` (this stage's layers and later ones). Per sample only
    the tensors that cross the cut are kept. So every stage runs just the nodes between
    two cuts, with the weights as they are then — earlier stages already refitted."""

    def __init__(self, get_proto, samples: list[dict], marks: list[list[str]]):
        self.get_proto = get_proto
        self.samples = samples
        self.marks = marks
        self.frontier: list[dict[str, np.ndarray]] = [dict(s) for s in samples]
        self.names: list[str] = []  # tensors in self.frontier, common to every sample
        self.types: dict[str, int] | None = None

    def stage(self, k: int, wanted: list[str]) -> list[dict[str, np.ndarray]]:
        proto = self.get_proto()
        g = proto.graph
        producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
        inits = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
        if k == 0:
            self.names = [i.name for i in g.input if i.name not in inits]
        if self.types is None:
            self.types = _elem_types(proto)
        # Cut before this stage's own layers: they are refitted after this run, and the
        # next stage must see them refitted.
        later = [producer[n] for part in self.marks[k:] for n in part if n in producer]
        cut = min(later) if later else len(g.node)
        nxt = _frontier(g, cut, inits)
        available = set(self.names)
        outputs = [n for n in dict.fromkeys(list(wanted) + nxt) if n not in available]
        if outputs:
            sess = _sub_session(proto, self.names, outputs, self.types, self.frontier[0])
        results = []
        for i, values in enumerate(self.frontier):
            got = dict(zip(outputs, sess.run(outputs, {n: values[n] for n in self.names}))) if outputs else {}
            merged = {**values, **got}
            results.append({n: merged[n] for n in wanted})
            self.frontier[i] = {n: merged[n] for n in nxt}
        self.names = nxt
        return results


def _frontier(g: onnx.GraphProto, cut: int, inits: set[str]) -> list[str]:
    """Non-constant tensors made before node ``cut`` (or fed) and read from it on."""
    made = {i.name for i in g.input if i.name not in inits}
    for n in g.node[:cut]:
        if n.op_type != "Constant":
            made.update(o for o in n.output if o)
    needed: list[str] = []
    for n in g.node[cut:]:
        for name in list(n.input) + _outer_reads(n):
            if name in made and name not in needed:
                needed.append(name)
    for o in g.output:
        if o.name in made and o.name not in needed:
            needed.append(o.name)
    return needed


def _outer_reads(node: onnx.NodeProto) -> list[str]:
    """Names a node's subgraphs read from enclosing scopes."""
    found: list[str] = []

    def walk(graph: onnx.GraphProto, defined: set[str]) -> None:
        defined = defined | {i.name for i in graph.input} | {t.name for t in graph.initializer}
        defined |= {o for n in graph.node for o in n.output}
        for n in graph.node:
            for name in n.input:
                if name and name not in defined:
                    found.append(name)
            for a in n.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    walk(sub, defined)
        for o in graph.output:
            if o.name not in defined:
                found.append(o.name)

    for a in node.attribute:
        for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            walk(sub, set())
    return found


def _elem_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of each tensor, by name, for declaring the outputs of the stage
    sessions. Inference runs on a throwaway model built from ``proto`` and the answers
    go into protos by name, so no gs tensor of the model being refitted is asked about."""
    types = {}
    for name, info in infer_shapes(Model.from_proto(proto)).items():
        if info.dtype is not None:
            types[name] = onnx.helper.np_dtype_to_tensor_dtype(info.dtype)
    return types


def _sub_session(proto: onnx.ModelProto, inputs: list[str], outputs: list[str], types: dict[str, int],
                 example: dict[str, np.ndarray]) -> ort.InferenceSession:
    """A session computing ``outputs`` from ``inputs`` with only the nodes between."""
    g = proto.graph
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    stop = set(inputs)
    keep: set[int] = set()
    stack = list(outputs)
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if not name or name in seen or name in stop:
            continue
        seen.add(name)
        i = producer.get(name)
        if i is None or i in keep:
            continue
        keep.add(i)
        stack.extend(g.node[i].input)
        stack.extend(_outer_reads(g.node[i]))
    nodes = [g.node[i] for i in sorted(keep)]
    used = set(seen)
    for n in nodes:
        used.update(n.input)
        used.update(_outer_reads(n))
    graph = onnx.GraphProto(name=g.name or "stage")
    graph.node.extend(nodes)
    graph.initializer.extend(t for t in g.initializer if t.name in used)
    graph.sparse_initializer.extend(t for t in g.sparse_initializer if t.values.name in used)
    for name in inputs:
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(example[name]).dtype)
        graph.input.append(onnx.helper.make_tensor_value_info(name, elem, None))
    for name in outputs:
        graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
    sub = onnx.helper.make_model(graph, opset_imports=list(proto.opset_import))
    sub.ir_version = max(proto.ir_version, 4)
    sub.functions.extend(proto.functions)
    import onnxruntime as ort  # imported where used: loading the pass library must not need it

    from onnxopt.validate import thread_cap

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if thread_cap():
        opts.intra_op_num_threads = thread_cap()
    return ort.InferenceSession(sub.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------
# Finding and matching layers
# --------------------------------------------------------------------------------------


def find_layers(student: Model, teacher: Model, which: str, skipped: Counter) -> list[Layer]:
    """The student's layers matched with the teacher's, in topological order, filtered by
    ``which`` (``affected``, ``changed`` or ``all``)."""
    t_producer = {}
    for n in teacher.graph.nodes:
        for t in n.outputs:
            t_producer[t.name] = n
    maps = channel_maps(student)
    layers: list[Layer] = []
    changed: set[int] = set()
    for node in student.graph.nodes:
        if node.op not in _LAYERS or node.domain not in (None, "", "ai.onnx"):
            continue
        key = layer_key(node)
        tnode = t_producer.get(key)
        if tnode is None or tnode.op != node.op:
            skipped["no teacher layer"] += 1
            continue
        w = const_through_shape_ops(node.inputs[1]) if len(node.inputs) > 1 else None
        tw = const_through_shape_ops(tnode.inputs[1]) if len(tnode.inputs) > 1 else None
        if node.op == "MatMul" and (w is None or w.ndim != 2):
            if tw is None:  # activation x activation, not a layer
                continue
        if node.op == "MatMul" and const_through_shape_ops(node.inputs[0]) is not None:
            continue
        weights = w is not None and w.dtype.kind == "f"
        is_changed = (w is None) != (tw is None) or (w is not None and tw is not None and (
            w.shape != tw.shape or not np.array_equal(w, tw)))
        bias, bias_shape, target = _bias_of(node, tnode)
        if is_changed or (bias is not None and not _same_bias(node, tnode, bias)):
            changed.add(id(node))
        out_map = maps.get(target)
        if out_map is None:
            out_map = maps.get(node.outputs[0].name)
        t_cout = _out_channels(tnode, tw)
        cout = _out_channels(node, w) if w is not None else (t_cout if out_map is None else len(out_map))
        if out_map is None:
            if cout is not None and t_cout is not None and cout != t_cout:
                skipped["output channels unknown"] += 1
                continue
            out_map = np.arange(cout if cout is not None else (t_cout or 0))
        out_map = np.asarray(out_map, dtype=np.int64)
        if cout is None or out_map.size != cout:
            skipped["output channels unknown"] += 1
            continue
        layers.append(Layer(node, key, node.inputs[0].name, target, bias, bias_shape, out_map, weights))
    if which != "all":
        keep_ids = set(changed)
        if which == "affected":
            from onnxopt.graph import bfs_from

            starts = [la.node for la in layers if id(la.node) in changed]
            keep_ids = {id(n) for n in bfs_from(starts)}
        layers = [la for la in layers if id(la.node) in keep_ids]
    for i, la in enumerate(layers):
        la.index = i
    return layers


def _out_channels(node: gs.Node, w) -> int | None:
    if w is None:
        return None
    if node.op == "Conv":
        return int(w.shape[0])
    if node.op == "ConvTranspose":
        return int(w.shape[1] * node.attrs.get("group", 1))
    if node.op == "Gemm":
        return int(w.shape[0] if node.attrs.get("transB", 0) else w.shape[1])
    return int(w.shape[1]) if w.ndim == 2 else None


def _bias_of(node: gs.Node, tnode: gs.Node):
    """Where the layer's bias is: its own input (Conv/ConvTranspose/Gemm), or a following
    Add of a per-channel constant that the teacher has too. Returns (place, shape, target
    tensor name)."""
    if node.op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2 and node.inputs[2].name:
        b = const_through_shape_ops(node.inputs[2])
        if b is not None:
            return (node, 2), b.shape, node.outputs[0].name
        return None, None, node.outputs[0].name
    out = node.outputs[0]
    consumers = out.outputs
    if len(consumers) == 1 and consumers[0].op == "Add" and len(consumers[0].inputs) == 2:
        add = consumers[0]
        other = 1 if add.inputs[0] is out else 0
        b = const_through_shape_ops(add.inputs[other])
        tout = tnode.outputs[0]
        t_ok = len(tout.outputs) == 1 and tout.outputs[0].op == "Add" and \
            tout.outputs[0].outputs[0].name == add.outputs[0].name
        if b is not None and b.dtype.kind == "f" and t_ok and _bias_like(node, b, tnode):
            return (add, other), b.shape, add.outputs[0].name
    return None, None, out.name


def _bias_like(node: gs.Node, b: np.ndarray, tnode: gs.Node) -> bool:
    """A constant that adds one value per output channel of ``node``."""
    w = const_through_shape_ops(node.inputs[1])
    if w is None:  # weights computed at run time (quantized): the teacher says how many
        w = const_through_shape_ops(tnode.inputs[1])
    cout = _out_channels(node, w)
    if cout is None or cout < 2 or b.size != cout:
        return False
    rank = w.ndim if node.op in ("Conv", "ConvTranspose") else None
    if rank is None:  # MatMul: channels last
        return b.shape[-1] == cout
    axis = 1 - (rank - b.ndim)
    return axis >= 0 and b.shape[axis] == cout


def _same_bias(node: gs.Node, tnode: gs.Node, bias) -> bool:
    place, index = bias
    if place is node:
        tb = const_through_shape_ops(tnode.inputs[index]) if len(tnode.inputs) > index else None
    else:
        tadd = tnode.outputs[0].outputs[0]
        tb = const_through_shape_ops(tadd.inputs[index])
    b = const_through_shape_ops(place.inputs[index])
    return tb is not None and b is not None and b.shape == tb.shape and np.array_equal(b, tb)


def _channel_axis(la: Layer, ndim: int) -> int:
    return 1 if la.node.op in ("Conv", "ConvTranspose", "Gemm") else ndim - 1


# --------------------------------------------------------------------------------------
# Rows: im2col with sampling
# --------------------------------------------------------------------------------------


def _conv_geometry(node: gs.Node, w: np.ndarray, x_shape) -> dict | None:
    k = list(w.shape[2:])
    nd = len(k)
    if nd not in (1, 2):
        return None
    strides = list(node.attrs.get("strides", [1] * nd))
    dil = list(node.attrs.get("dilations", [1] * nd))
    pads = list(node.attrs.get("pads", [0] * 2 * nd))
    auto = node.attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * 2 * nd
        for i in range(nd):
            size = x_shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (k[i] - 1) * dil[i] + 1 - size, 0)
            small = total // 2
            pads[i], pads[i + nd] = (small, total - small) if auto == "SAME_UPPER" else (total - small, small)
    elif auto == "VALID":
        pads = [0] * 2 * nd
    if nd == 1:
        k, strides, dil = [1] + k, [1] + strides, [1] + dil
        pads = [0, pads[0], 0, pads[1]]
    return {"k": k, "s": strides, "d": dil, "pads": pads, "nd": nd}


def _features(la: Layer) -> int | None:
    node = la.node
    w = const_through_shape_ops(node.inputs[1])
    if w is None:
        return None
    if node.op == "Conv":
        if w.ndim not in (3, 4):
            return None
        return int(np.prod(w.shape[1:]))
    if node.op == "ConvTranspose":
        if not _convt_simple(node, w):
            return None
        return int(w.shape[0] * np.prod(w.shape[2:]))
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return None
        return int(w.shape[1] if node.attrs.get("transB", 0) else w.shape[0])
    return int(w.shape[0])


def _convt_simple(node: gs.Node, w: np.ndarray) -> bool:
    k = list(w.shape[2:])
    nd = len(k)
    return (nd == 2 and int(node.attrs.get("group", 1)) == 1
            and list(node.attrs.get("strides", [1] * nd)) == k
            and not any(node.attrs.get("pads", [0] * 2 * nd))
            and list(node.attrs.get("dilations", [1] * nd)) == [1] * nd
            and not any(node.attrs.get("output_padding", [0] * nd))
            and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
            and "output_shape" not in node.attrs)


def _can_add_bias(la: Layer) -> bool:
    return la.node.op in ("Conv", "ConvTranspose") or (la.node.op == "Gemm" and
                                                         float(la.node.attrs.get("beta", 1.0)) == 1.0)


def _rows(la: Layer, x: np.ndarray, yt: np.ndarray, rng, patches: int):
    """Design rows X [G, P, F] and targets Y [G, P, O] sampled from one calibration
    sample (G = convolution groups)."""
    node = la.node
    w = const_through_shape_ops(node.inputs[1])
    if node.op == "Conv":
        geo = _conv_geometry(node, w, x.shape)
        if geo["nd"] == 1:
            x, yt = x[:, :, None, :], yt[:, :, None, :]
        n, c = x.shape[:2]
        (ph0, pw0, ph1, pw1) = geo["pads"]
        xp = np.pad(x, ((0, 0), (0, 0), (ph0, ph1), (pw0, pw1)))
        oh, ow = yt.shape[2], yt.shape[3]
        total = n * oh * ow
        pick = rng.choice(total, size=min(patches, total), replace=False)
        bn, rest = np.divmod(pick, oh * ow)
        i, j = np.divmod(rest, ow)
        kh, kw = geo["k"]
        rows = i[:, None] * geo["s"][0] + np.arange(kh)[None, :] * geo["d"][0]
        cols = j[:, None] * geo["s"][1] + np.arange(kw)[None, :] * geo["d"][1]
        cols_idx = xp[bn[:, None, None, None], np.arange(c)[None, :, None, None],
                      rows[:, None, :, None], cols[:, None, None, :]]  # [P, C, kh, kw]
        g = int(node.attrs.get("group", 1))
        p = pick.size
        X = cols_idx.reshape(p, g, (c // g) * kh * kw).transpose(1, 0, 2)
        Y = yt[bn, :, i, j]  # [P, O]
        Y = Y.reshape(p, g, -1).transpose(1, 0, 2)
        return X, Y
    if node.op == "ConvTranspose":
        n, c, h, wd = x.shape
        kh, kw = w.shape[2], w.shape[3]
        total = n * h * wd
        pick = rng.choice(total, size=min(max(patches // (kh * kw), 1), total), replace=False)
        bn, rest = np.divmod(pick, h * wd)
        i, j = np.divmod(rest, wd)
        feats = x[bn, :, i, j]  # [P, C]
        p = pick.size
        taps = kh * kw
        X = np.zeros((p * taps, taps * c))
        Y = np.zeros((p * taps, yt.shape[1]))
        for t in range(taps):
            a, b = divmod(t, kw)
            X[t::taps, t * c:(t + 1) * c] = feats
            Y[t::taps] = yt[bn, :, i * kh + a, j * kw + b]
        return X[None], Y[None]
    # Gemm / MatMul: rows of a matrix
    X = x.reshape(-1, x.shape[-1])
    Y = yt.reshape(-1, yt.shape[-1]) if node.op == "MatMul" else yt
    total = X.shape[0]
    if total > patches:
        pick = rng.choice(total, size=patches, replace=False)
        X, Y = X[pick], Y[pick]
    return X[None], Y[None]


# --------------------------------------------------------------------------------------
# Weights in "feature x output" form, and back
# --------------------------------------------------------------------------------------


def _current_bias(la: Layer) -> np.ndarray:
    cout = la.out_map.size
    if la.bias is None:
        return np.zeros(cout)
    place, index = la.bias
    b = np.asarray(const_through_shape_ops(place.inputs[index]), dtype=np.float64).reshape(-1)
    if place.op == "Gemm":
        b = b * float(place.attrs.get("beta", 1.0))
    return np.broadcast_to(b, (cout,)).copy() if b.size == 1 else b


def _current(la: Layer, with_bias: bool) -> np.ndarray:
    node = la.node
    w = np.asarray(const_through_shape_ops(node.inputs[1]), dtype=np.float64)
    if node.op == "Conv":
        g = int(node.attrs.get("group", 1))
        cout = w.shape[0]
        W = w.reshape(g, cout // g, -1).transpose(0, 2, 1)  # [G, F, O]
    elif node.op == "ConvTranspose":
        cin, cout, kh, kw = w.shape
        W = w.transpose(2, 3, 0, 1).reshape(kh * kw * cin, cout)[None]
    elif node.op == "Gemm":
        alpha = float(node.attrs.get("alpha", 1.0))
        W = (alpha * (w.T if node.attrs.get("transB", 0) else w))[None]
    else:
        W = w[None]
    if with_bias:
        b = _current_bias(la).reshape(W.shape[0], 1, -1)
        W = np.concatenate([W, b], axis=1)
    return W


def _write_weights(model: Model, la: Layer, W: np.ndarray, with_bias: bool) -> None:
    node = la.node
    w_old = const_through_shape_ops(node.inputs[1])
    if with_bias:
        W, b = W[:, :-1, :], W[:, -1, :].reshape(-1)
    else:
        b = None
    if node.op == "Conv":
        g, f, o = W.shape
        new = W.transpose(0, 2, 1).reshape(g * o, *w_old.shape[1:])
    elif node.op == "ConvTranspose":
        cin, cout, kh, kw = w_old.shape
        new = W[0].reshape(kh, kw, cin, cout).transpose(2, 3, 0, 1)
    elif node.op == "Gemm":
        alpha = float(node.attrs.get("alpha", 1.0))
        m = W[0] / alpha
        new = m.T if node.attrs.get("transB", 0) else m
    else:
        new = W[0]
    write_constant(model, node, 1, new.astype(w_old.dtype))
    if b is not None:
        _write_bias(model, la, b)


def _write_bias(model: Model, la: Layer, b: np.ndarray) -> None:
    if la.bias is None:
        node = la.node
        dtype = const_through_shape_ops(node.inputs[1]).dtype
        write_constant(model, node, 2, b.astype(dtype))
        la.bias, la.bias_shape = (node, 2), b.shape
        return
    place, index = la.bias
    old = const_through_shape_ops(place.inputs[index])
    if place.op == "Gemm":
        b = b / float(place.attrs.get("beta", 1.0))
    if old.size == 1 and b.size > 1:
        shape = (b.size,) if place.op != "Add" else None
        if shape is None:
            return
        new = b.reshape(shape)
    else:
        new = b.reshape(old.shape)
    write_constant(model, place, index, new.astype(old.dtype))
