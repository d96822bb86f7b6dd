"""fp16: float16 weights and compute, keeping the graph's input and output types.

Every op of the main graph that computes on float32 runs in float16, except an explicit
block list of ops that are numerically unsafe in half precision (Exp, Log, Pow, sums of
squares — they overflow) or have no float16 kernel or type constraint that allows it
(NonMaxSuppression, TopK, RoiAlign, Range, CumSum, random generators ...), ops of other
domains, and ops holding subgraphs (If/Loop/Scan bodies stay float32). Casts are inserted
only where a float16 tensor meets a float32 consumer or the reverse — at the graph's
inputs and outputs (whose names and types do not change) and around blocked ops — so two
consecutive float16 ops never Cast between them. Float constants read by float16 ops are
stored as float16; values outside its range (±65504, e.g. ``finfo(float32).min`` used as
an attention mask) are clamped, and the stats count them, as well as nonzero values that
underflow to zero. Inputs that must stay float32 by the op's schema (Resize's roi and
scales, Upsample's scales) stay float32.

The pass is meant for the CUDA provider (validate there with ``--providers cuda``); on the
CPU provider onnxruntime runs float16 models by casting around the kernels it lacks, which
is correct but not faster.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.framework import Opt, Pass, PassContext, PassResult, register
from onnxopt.graph import NameAllocator, const_value, toposort
from onnxopt.model import Model, node_subgraphs
from onnxopt.rewrite import prune_unused
from onnxopt.tensorinfo import ShapeIndex

__all__ = ["Fp16", "DEFAULT_BLOCK"]

log = logging.getLogger(__name__)

FP16_MAX = float(np.finfo(np.float16).max)
FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)

#: Ops kept in float32 by default: unsafe in half precision or without a float16 kernel.
DEFAULT_BLOCK = (
    "Exp", "Log", "Pow", "ReduceSumSquare", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "NonMaxSuppression", "TopK", "RoiAlign", "Range", "CumSum", "ConstantOfShape", "EyeLike",
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
)
#: (op, input index) pairs that must stay float32 whatever the op computes in.
_FP32_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


@register
class Fp16(Pass):
    """Run float32 computation in float16; graph inputs and outputs keep their types.

    Edge cases: subgraph bodies stay float32 (outer tensors they read are cast back);
    ops of other domains and blocked ops stay float32 with Casts around them; a model
    with no float32 computation is not modified."""

    name = "fp16"
    summary = "float16 weights and compute, keeping chosen I/O types"
    exact = False
    options = {
        "block": Opt(list, None, "op types kept in float32 (default: Exp, Log, Pow, reductions of "
                     "squares, NMS/TopK/RoiAlign/Range/CumSum, random ops)"),
        "extra_block": Opt(list, None, "op types kept in float32 in addition to the default block list"),
    }

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        block = set(self.opts.block if self.opts.block is not None else DEFAULT_BLOCK)
        block |= set(self.opts.extra_block or ())
        work = model.copy()
        graph = work.graph
        toposort(graph)
        index = ShapeIndex(work)
        converted, kept = _select(graph, index, block)
        if not converted:
            return PassResult(False, {"converted": 0, "kept_fp32": kept})
        writer = _HalfWriter(index, NameAllocator(work))
        writer.retype_outputs(graph, converted)
        writer.retype_inputs(converted)
        graph.nodes.extend(writer.new_nodes)
        prune_unused(work, writer.replaced)
        toposort(graph)
        stats = {"converted": len(converted), "kept_fp32": kept, "casts": writer.casts,
                 "constants_converted": writer.consts, "clamped_values": writer.clamped,
                 "underflow_values": writer.underflow}
        model.restore(work)
        return PassResult(True, stats)


def _is_f32(t: gs.Tensor, index: ShapeIndex) -> bool:
    if not t.name:
        return False
    dt = index.dtype(t)
    dt = dt if dt is not None else t.dtype
    try:
        return dt is not None and np.dtype(dt) == np.float32
    except TypeError:
        return False


def _select(graph: gs.Graph, index: ShapeIndex, block: set[str]) -> tuple[list[gs.Node], dict[str, int]]:
    """The main-graph nodes that compute in float16 (graph order), and the count of each
    reason a float32 node stays float32."""
    kept: dict[str, int] = {}
    converted: list[gs.Node] = []
    chosen: set[int] = set()
    for node in graph.nodes:
        if node.op == "Constant":
            continue  # its value is read where it is used (converted constants are copies)
        if node.op == "Cast":
            # only int/bool -> float Casts move to float16; float casts are boundaries
            src = node.inputs[0] if node.inputs else None
            if int(node.attrs.get("to", 0)) != onnx.TensorProto.FLOAT or src is None or _is_f32(src, index) \
                    or (isinstance(src, gs.Variable) and src.dtype == np.float16):
                continue
        elif not any(_is_f32(t, index) for t in node.outputs):
            # float32 inputs only (Shape, comparisons ...): follow the producers
            ins = [t for i, t in enumerate(node.inputs) if _is_f32(t, index) and (node.op, i) not in _FP32_INPUTS]
            if not ins or not all(const_value(t) is not None or (len(t.inputs) == 1 and id(t.inputs[0]) in chosen)
                                  for t in ins):
                continue
        reason = None
        if node.domain not in (None, "", "ai.onnx"):
            reason = "op of another domain"
        elif node_subgraphs(node):
            reason = "holds a subgraph"
        elif node.op in block:
            reason = f"{node.op} is in the block list"
        elif any(t.name and t.dtype is None and index.info(t) is None for t in node.outputs):
            reason = "unknown output type"
        if reason:
            kept[reason] = kept.get(reason, 0) + 1
            log.debug("fp16: %s (%s) stays float32: %s", node.name, node.op, reason)
            continue
        converted.append(node)
        chosen.add(id(node))
    return converted, kept


class _HalfWriter:
    """Moves the chosen nodes to float16: their float32 outputs become float16 tensors,
    their float constants float16 copies, and Casts join float16 and float32 where they
    meet. Keeps the nodes it adds, the constants it replaces and the counts."""

    def __init__(self, index: ShapeIndex, names: NameAllocator):
        self.index = index
        self.names = names
        self.new_nodes: list[gs.Node] = []
        self.replaced: list[gs.Tensor] = []
        self.half_const: dict[int, gs.Constant] = {}
        self.to_half: dict[int, gs.Tensor] = {}
        self.half_of: dict[int, gs.Variable] = {}
        self.clamped = self.underflow = self.consts = self.casts = 0

    def const(self, t: gs.Tensor) -> gs.Constant:
        """The float16 copy of float32 constant ``t``; out-of-range values are clamped."""
        if id(t) not in self.half_const:
            v = np.asarray(const_value(t), dtype=np.float32)
            big = np.abs(v) > FP16_MAX
            self.clamped += int(np.sum(big & np.isfinite(v)))
            small = (v != 0) & (np.abs(v) < FP16_TINY)
            self.underflow += int(np.sum(small))
            h = np.asarray(np.clip(v, -FP16_MAX, FP16_MAX), dtype=np.float16)
            self.half_const[id(t)] = gs.Constant(self.names(f"{t.name}_fp16"), values=h)
            self.consts += 1
        return self.half_const[id(t)]

    def cast_to_half(self, t: gs.Tensor) -> gs.Tensor:
        """``t`` cast to float16 (one Cast per tensor)."""
        if id(t) not in self.to_half:
            out = gs.Variable(self.names(f"{t.name}_fp16"), dtype=np.float16)
            self.new_nodes.append(gs.Node("Cast", self.names(f"{t.name}_Cast"),
                                          attrs={"to": onnx.TensorProto.FLOAT16}, inputs=[t], outputs=[out]))
            self.to_half[id(t)] = out
            self.casts += 1
        return self.to_half[id(t)]

    def retype_outputs(self, graph: gs.Graph, converted: list[gs.Node]) -> None:
        """Outputs of converted nodes become float16 tensors; float32 readers and graph
        outputs read them through a Cast that keeps the original tensor."""
        conv_ids = {id(n) for n in converted}
        graph_outs = {id(t) for t in graph.outputs}
        for node in converted:
            for k, t in enumerate(node.outputs):
                if not _is_f32(t, self.index):
                    continue
                h = gs.Variable(self.names(f"{t.name}_fp16"), dtype=np.float16)
                node.outputs[k] = h
                self.half_of[id(t)] = h
                readers32 = [c for c in t.outputs if id(c) not in conv_ids or _fp32_position(c, t)]
                for c in list(t.outputs):
                    if id(c) in conv_ids:
                        for i, x in enumerate(c.inputs):
                            if x is t and (c.op, i) not in _FP32_INPUTS:
                                c.inputs[i] = h
                if readers32 or id(t) in graph_outs:
                    self.new_nodes.append(gs.Node("Cast", self.names(f"{t.name}_Cast"),
                                                  attrs={"to": onnx.TensorProto.FLOAT}, inputs=[h], outputs=[t]))
                    self.casts += 1

    def retype_inputs(self, converted: list[gs.Node]) -> None:
        """Inputs of converted nodes: constants become float16 copies, other float32
        tensors are cast; a converted Cast to float32 now casts to float16."""
        for node in converted:
            if node.op == "BatchNormalization":
                self.replaced.extend(_normalize_batchnorm(node, self.names))
            for i, t in enumerate(node.inputs):
                if not t.name or (node.op, i) in _FP32_INPUTS:
                    continue
                if isinstance(t, gs.Variable) and t.dtype == np.float16:
                    continue
                if const_value(t) is not None and np.asarray(const_value(t)).dtype == np.float32:
                    node.inputs[i] = self.const(t)
                    self.replaced.append(t)
                elif _is_f32(t, self.index) and id(t) not in self.half_of:
                    node.inputs[i] = self.cast_to_half(t)
            if node.op == "Cast" and int(node.attrs.get("to", 0)) == onnx.TensorProto.FLOAT:
                node.attrs["to"] = onnx.TensorProto.FLOAT16


def _fp32_position(node: gs.Node, t: gs.Tensor) -> bool:
    return any(x is t and (node.op, i) in _FP32_INPUTS for i, x in enumerate(node.inputs))


def _normalize_batchnorm(node: gs.Node, names: NameAllocator) -> list[gs.Tensor]:
    """Rewrite constant BatchNormalization statistics as (scale', bias', 0, 1 - eps), the
    same map, when the mean or variance does not fit float16 (running variances of 1e7
    occur): clamping them would change the outputs."""
    vals = [const_value(t) for t in node.inputs[1:5]] if len(node.inputs) >= 5 else []
    if len(vals) != 4 or any(v is None for v in vals):
        return []
    scale, bias, mean, var = (np.asarray(v, np.float64) for v in vals)
    if max(np.abs(mean).max(initial=0), np.abs(var).max(initial=0)) <= FP16_MAX:
        return []
    eps = float(node.attrs.get("epsilon", 1e-5))
    a = scale / np.sqrt(var + eps)
    old = list(node.inputs[1:5])
    new = [a, bias - mean * a, np.zeros_like(mean), np.full_like(var, 1.0 - eps)]
    for i, (t, v) in enumerate(zip(old, new), start=1):
        node.inputs[i] = gs.Constant(names(f"{t.name}_normalized"), values=np.asarray(v, np.float32))
    return old
