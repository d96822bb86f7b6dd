"""The fused fraction: how many QDQ units onnxruntime's CPU provider turned into integer
kernels, measured on the graph it runs after ORT_ENABLE_ALL optimization.

A *unit* is a Conv/ConvTranspose/MatMul/Gemm whose weight comes from a DequantizeLinear,
or any other op that reads a DequantizeLinear output and writes only to QuantizeLinear
nodes (onnxruntime's "node unit"); a DequantizeLinear feeding an op with no QuantizeLinear
after it ends the int8 region and is not a unit. A unit is *fused* when none of the
DequantizeLinear nodes feeding it survive optimization (absorbed into QLinearConv, QGemm,
MatMulIntegerToFloat ..., or dropped around an op that runs on 8-bit data); shared ones are
first given one copy per unit, as onnxruntime does, so that every survivor names its unit.
The same function measures any QDQ model, ours or onnxruntime's own quantizer's.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import onnx

from onnxopt.model import Model
from onnxopt.validate import make_session

__all__ = ["Fusion", "analyze_fusion", "kernel_fraction", "INTEGER_KERNELS"]

#: Op types of the optimized graph that compute on integers.
INTEGER_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
    "QLinearWhere", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger",
    "ConvInteger", "MatMulNBits", "NhwcQLinearConv", "QLinearReduceMean", "DynamicQuantizeLSTM",
})
_COMPUTE = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclass
class Fusion:
    """Units and which of them onnxruntime fused."""

    units: list[str]
    unfused: list[str]
    optimized_ops: dict[str, int] = field(default_factory=dict)
    error: str = ""

    @property
    def fraction(self) -> float | None:
        if not self.units:
            return None
        return (len(self.units) - len(self.unfused)) / len(self.units)

    def as_stats(self) -> dict:
        return {
            "fused_fraction": None if self.fraction is None else round(self.fraction, 4),
            "fused_units": len(self.units) - len(self.unfused),
            "units": len(self.units),
            "unfused": self.unfused[:50],
            "integer_kernels": {k: v for k, v in sorted(self.optimized_ops.items()) if k in INTEGER_KERNELS},
        }


def _unique_dq(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy where each DequantizeLinear feeding a unit feeds only that unit; returns it
    and a map DequantizeLinear name -> unit name."""
    g = proto.graph
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}

    def is_unit(n: onnx.NodeProto) -> bool:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            return False
        if not any(i in producers and producers[i].op_type == "DequantizeLinear" for i in n.input):
            return False
        if n.op_type in _COMPUTE:  # quantized when its weight (or both operands) are
            fed = [i in producers and producers[i].op_type == "DequantizeLinear" for i in n.input[:2]]
            return len(fed) == 2 and fed[1]
        outs = [o for o in n.output if o]
        return bool(outs) and all(
            o not in outputs and consumers.get(o) and all(c.op_type == "QuantizeLinear" for c in consumers[o])
            for o in outs)

    units = [n for n in g.node if is_unit(n)]
    names: dict[str, str] = {}
    taken = {n.name for n in g.node} | {o for n in g.node for o in n.output}
    new_nodes: list[onnx.NodeProto] = []
    for u in units:
        for k, inp in enumerate(u.input):
            dq = producers.get(inp)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            users = consumers.get(inp, [])
            if len(users) == 1 and inp not in outputs:
                names[dq.name] = u.name
                continue
            copy = onnx.NodeProto()
            copy.CopyFrom(dq)
            base = f"{dq.name or 'DequantizeLinear'}__for_{u.name}"
            name, j = base, 0
            while name in taken:
                j += 1
                name = f"{base}_{j}"
            taken.add(name)
            copy.name = name
            out = f"{inp}__for_{u.name}"
            while out in taken:
                out += "_"
            taken.add(out)
            copy.output[0] = out
            u.input[k] = out
            new_nodes.append(copy)
            names[name] = u.name
    if new_nodes:
        nodes = list(g.node)
        del g.node[:]
        # place each copy right before its unit (order stays topological)
        by_unit: dict[str, list[onnx.NodeProto]] = {}
        for c in new_nodes:
            by_unit.setdefault(names[c.name], []).append(c)
        for n in nodes:
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and n.name in by_unit:
                g.node.extend(by_unit.pop(n.name))
            g.node.append(n)
    return proto, names


def analyze_fusion(model: Model | onnx.ModelProto) -> Fusion:
    """Save onnxruntime's ORT_ENABLE_ALL-optimized graph of a QDQ model and count the
    units whose DequantizeLinear inputs it absorbed."""
    proto = model.to_proto() if isinstance(model, Model) else model
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    _name_unnamed(work)
    work, dq_unit = _unique_dq(work)
    units = sorted(set(dq_unit.values()))
    try:
        opt = _ort_optimized(work.SerializeToString())
    except Exception as exc:  # a model ORT cannot optimize: nothing is fused
        return Fusion(units, list(units), {}, f"onnxruntime could not optimize it: {str(exc)[:200]}")
    ops = Counter(n.op_type for n in opt.graph.node)
    unfused: set[str] = set()
    for n in opt.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        base = _base_name(n.name)
        unit = dq_unit.get(base)
        if unit is not None:
            unfused.add(unit)
    return Fusion(units, sorted(unfused), dict(ops))


def kernel_fraction(model: Model, count: int, dynamic: bool) -> dict:
    """Stats: how many of the ``count`` MatMuls that the dynamic (or weight-only) mode
    rewrote onnxruntime runs as integer kernels, and which integer kernels it chose."""
    try:
        opt = _ort_optimized(model)
    except Exception as exc:
        return {"fused_fraction": 0.0, "fusion_error": str(exc)[:200]}
    ops = Counter(n.op_type for n in opt.graph.node)
    kinds = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM") if dynamic else ("MatMulNBits",)
    fused = sum(ops.get(k, 0) for k in kinds)
    return {"fused_fraction": round(min(1.0, fused / count), 4),
            "integer_kernels": {k: v for k, v in sorted(ops.items()) if k in INTEGER_KERNELS}}


def _ort_optimized(model: Model | bytes) -> onnx.ModelProto:
    """The graph onnxruntime's CPU provider runs after ORT_ENABLE_ALL optimization (one
    thread), saved and read back without external data."""
    with tempfile.TemporaryDirectory(prefix="onnxopt-fusion-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        make_session(model, "cpu", threads=1, optimization="all", optimized_path=path)
        return onnx.load(path, load_external_data=False)


def _base_name(name: str) -> str:
    name = name.split("/duplicated")[0]
    return re.sub(r"(_token_\d+)+$", "", name)


def _name_unnamed(proto: onnx.ModelProto) -> None:
    taken = {n.name for n in proto.graph.node if n.name}
    for i, n in enumerate(proto.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in taken:
                name += "_"
            taken.add(name)
            n.name = name
