"""The rewrites of the ``quantize`` pass: QDQ insertion from a :class:`QuantizePlan`
(static), DynamicQuantizeLinear + MatMulInteger and DynamicQuantizeLSTM (dynamic), and
blockwise weight-only MatMul (``MatMulNBits`` or block-quantized DequantizeLinear).

Every function here mutates the model it is given: the pass calls them on a working copy
and adopts the copy only when everything succeeded. Names come from a
:class:`~onnxopt.graph.NameAllocator`, so the same model and options give the same bytes.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph import NameAllocator, const_value, toposort
from onnxopt.model import Model
from onnxopt.rewrite import prune_unused

from .calibrate import QParams, activation_qparams, weight_scales
from .plan import QuantizePlan, Unit

__all__ = ["Applied", "apply_qdq", "apply_dynamic", "apply_dynamic_lstm", "apply_weight_only", "matmulnbits_available",
           "quantize_weight"]

log = logging.getLogger(__name__)

MS = "com.microsoft"


@dataclass
class Applied:
    """What a static rewrite inserted: the role of every DequantizeLinear (by node name:
    ``(unit index, role)``, role ``input``/``weight``/``bias``/``boundary``), the names
    of the units' float outputs before and after (bias correction), and counts."""

    dq_roles: dict[str, tuple[int, str]] = field(default_factory=dict)
    q_names: dict[str, int] = field(default_factory=dict)
    unit_outputs: dict[int, tuple[str, str]] = field(default_factory=dict)
    quantize_nodes: int = 0
    dequantize_nodes: int = 0
    weights: int = 0
    bias_clipped: int = 0


def _const(names: NameAllocator, hint: str, value) -> gs.Constant:
    return gs.Constant(names(hint), values=np.asarray(value))


def quantize_weight(w: np.ndarray, axis: int | None, *, reduce_range: bool = False,
                    floor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8: ``(q, scale)`` with ``scale`` per slice along ``axis`` (or scalar).
    ``floor`` raises scales where needed (so that an int32 bias stays in range)."""
    scale = weight_scales(w, axis, reduce_range=reduce_range)
    if floor is not None:
        scale = np.maximum(scale, floor.astype(np.float32).reshape(scale.shape) if scale.ndim else floor.max())
        scale = np.asarray(scale, np.float32)
    qmax = 63 if reduce_range else 127
    if axis is None:
        s = scale.reshape(())
        q = np.clip(np.round(w / s), -qmax, qmax).astype(np.int8)
        return q, np.asarray(s, np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def apply_qdq(model: Model, plan: QuantizePlan, params: dict[int, QParams], names: NameAllocator, *,
              bias_delta: dict[int, np.ndarray] | None = None, reduce_range: bool = False) -> Applied:
    """Insert QuantizeLinear/DequantizeLinear as ``plan`` says, with the activation
    parameters ``params`` (tensor id -> :class:`QParams`). ``bias_delta`` (unit index ->
    per-channel values) is added to float biases before they are quantized."""
    writer = _QdqWriter(model.graph, plan, params, names, bias_delta or {}, reduce_range)
    for t in plan.act_tensors():
        writer.quantize(t)
    for ui, u in enumerate(plan.units):
        writer.dequantize_unit(ui, u)
    model.graph.nodes.extend(writer.new_nodes)
    prune_unused(model, writer.released)
    toposort(model.graph)
    return writer.applied


class _QdqWriter:
    """One static rewrite in progress: the nodes it adds (joined to the graph at the end),
    the constants it replaces, the quantized form of each activation, and its figures."""

    def __init__(self, graph: gs.Graph, plan: QuantizePlan, params: dict[int, QParams], names: NameAllocator,
                 bias_delta: dict[int, np.ndarray], reduce_range: bool):
        self.plan = plan
        self.params = params
        self.names = names
        self.bias_delta = bias_delta
        self.reduce_range = reduce_range
        self.applied = Applied()
        self.new_nodes: list[gs.Node] = []
        self.released: list[gs.Tensor] = []
        self.src = plan.param_source()
        self.act_dtype = np.int8 if plan.symmetric else np.uint8
        self.produced_by: dict[int, int] = {id(u.out): i for i, u in enumerate(plan.units) if u.out is not None}
        self.consumers: dict[int, list[tuple[int, int]]] = {}
        for ui, u in enumerate(plan.units):
            for i in u.act_inputs:
                self.consumers.setdefault(id(u.node.inputs[i]), []).append((ui, i))
        self.graph_out_ids = {id(t) for t in graph.outputs}
        self.qinfo: dict[int, tuple[gs.Variable, gs.Constant, gs.Constant, QParams]] = {}
        self.weight_cache: dict[tuple, tuple[gs.Constant, gs.Constant, gs.Constant, np.ndarray]] = {}

    def add_dq(self, node: gs.Node, ui: int, role: str) -> None:
        """Add a DequantizeLinear that plays ``role`` for unit ``ui``."""
        self.new_nodes.append(node)
        self.applied.dq_roles[node.name] = (ui, role)
        self.applied.dequantize_nodes += 1

    def _params_of(self, t: gs.Tensor) -> QParams:
        p = self.params.get(id(self.src.get(id(t), t)))
        return self.params[id(t)] if p is None else p

    # ---- activations ---------------------------------------------------------

    def quantize(self, t: gs.Tensor) -> None:
        """The QuantizeLinear of activation ``t``: right after the unit that produces it,
        or reading ``t`` where a float op produces it."""
        names = self.names
        p = self._params_of(t)
        scale = _const(names, f"{t.name}_scale", np.float32(p.scale))
        zp = _const(names, f"{t.name}_zero_point", np.array(p.zero_point, dtype=self.act_dtype))
        qt = gs.Variable(names(f"{t.name}_quantized"), dtype=self.act_dtype)
        ui = self.produced_by.get(id(t))
        if ui is not None:
            self._quantize_unit_output(t, ui, qt, scale, zp)
        else:
            qn = gs.Node("QuantizeLinear", names(f"{t.name}_QuantizeLinear"), inputs=[t, scale, zp], outputs=[qt])
            self.new_nodes.append(qn)
            self.applied.q_names[qn.name] = -1
        self.applied.quantize_nodes += 1
        self.qinfo[id(t)] = (qt, scale, zp, p)

    def _quantize_unit_output(self, t: gs.Tensor, ui: int, qt: gs.Variable, scale: gs.Constant,
                              zp: gs.Constant) -> None:
        """Quantize the output ``t`` of unit ``ui`` (after its tail); float readers of ``t``
        and graph outputs read a DequantizeLinear back (a boundary)."""
        names, applied = self.names, self.applied
        u = self.plan.units[ui]
        producer = u.tail[-1] if u.tail else u.node
        pre = gs.Variable(names(f"{t.name}_prequant"), dtype=np.float32)
        k = next(j for j, o in enumerate(producer.outputs) if o is t)
        quantized_users = {id(self.plan.units[c].node) for c, _ in self.consumers.get(id(t), [])}
        boundary = id(t) in self.graph_out_ids or any(id(c) not in quantized_users for c in t.outputs)
        producer.outputs[k] = pre
        qn = gs.Node("QuantizeLinear", names(f"{t.name}_QuantizeLinear"), inputs=[pre, scale, zp], outputs=[qt])
        self.new_nodes.append(qn)
        applied.q_names[qn.name] = ui
        if boundary:
            dn = gs.Node("DequantizeLinear", names(f"{t.name}_DequantizeLinear"), inputs=[qt, scale, zp],
                         outputs=[t])
            self.add_dq(dn, ui, "boundary")
        if u.node.outputs[0] is pre and not u.tail:
            applied.unit_outputs[ui] = (t.name, pre.name)

    # ---- units ---------------------------------------------------------------

    def dequantize_unit(self, ui: int, u: Unit) -> None:
        """DequantizeLinear for each quantized input of unit ``ui``: activations, constant
        operands, the weight, and the bias as int32."""
        node = u.node
        if ui not in self.applied.unit_outputs:
            out = node.outputs[0]
            self.applied.unit_outputs[ui] = (out.name, out.name)
        in_scale = self._dq_activations(ui, u)
        self._dq_constants(ui, u)
        w_scale = self._dq_weight(ui, u, in_scale) if u.weight is not None else None
        delta = self.bias_delta.get(ui)
        if u.bias_index is not None or (delta is not None and node.op == "Conv"):
            self._dq_bias(ui, u, in_scale, w_scale, delta)
        if u.bias_add is not None and u.bias_add_index is not None:
            self._dq_bias_add(ui, u, in_scale, w_scale, delta)

    def _dq_activations(self, ui: int, u: Unit) -> float | None:
        """Read each activation input through a DequantizeLinear; the first one's scale."""
        node = u.node
        in_scale = None
        for i in u.act_inputs:
            t = node.inputs[i]
            qt, scale, zp, p = self.qinfo[id(t)]
            in_scale = p.scale if in_scale is None else in_scale
            d = gs.Variable(self.names(f"{t.name}_dequantized"), dtype=np.float32)
            dn = gs.Node("DequantizeLinear", self.names(f"{node.name or node.op}_DequantizeLinear_in{i}"),
                         inputs=[qt, scale, zp], outputs=[d])
            node.inputs[i] = d
            self.add_dq(dn, ui, "input")
        return in_scale

    def _dq_constants(self, ui: int, u: Unit) -> None:
        """Constant operands of cheap ops, quantized offline with the activations' type."""
        node, act_dtype = u.node, self.act_dtype
        for i in u.const_inputs:
            old = node.inputs[i]
            c = np.asarray(const_value(old), dtype=np.float32)
            p = activation_qparams(float(c.min()), float(c.max()), act_dtype)
            qc = np.clip(np.round(c / p.scale) + p.zero_point, *_range(act_dtype)).astype(act_dtype)
            dn, d = _dq(self.names, old.name, qc, np.float32(p.scale), np.array(p.zero_point, act_dtype), None)
            node.inputs[i] = d
            self.add_dq(dn, ui, "weight")
            self.released.append(old)

    def _dq_weight(self, ui: int, u: Unit, in_scale: float | None) -> np.ndarray:
        """The int8 weight (one copy per weight, axis and bias floor) through a
        DequantizeLinear; its scales."""
        names, node = self.names, u.node
        idx, axis = u.weight
        old = node.inputs[idx]
        floor = _bias_floor(u, in_scale, self.bias_delta.get(ui))
        key = (id(old), axis, None if floor is None else floor.tobytes())
        if key not in self.weight_cache:
            w = np.asarray(const_value(old), dtype=np.float32)
            q, s = quantize_weight(w, axis, reduce_range=self.reduce_range, floor=floor)
            qc = _const(names, f"{old.name}_quantized", q)
            sc = _const(names, f"{old.name}_scale", s)
            zc = _const(names, f"{old.name}_zero_point", np.zeros(s.shape, np.int8))
            self.weight_cache[key] = (qc, sc, zc, s)
            self.applied.weights += 1
        qc, sc, zc, s = self.weight_cache[key]
        d = gs.Variable(names(f"{old.name}_dequantized"), dtype=np.float32)
        attrs = {"axis": int(axis)} if axis is not None else {}
        dn = gs.Node("DequantizeLinear", names(f"{node.name or node.op}_DequantizeLinear_w"),
                     attrs=attrs, inputs=[qc, sc, zc], outputs=[d])
        node.inputs[idx] = d
        self.add_dq(dn, ui, "weight")
        self.released.append(old)
        return s

    def _dq_bias(self, ui: int, u: Unit, in_scale: float | None, w_scale: np.ndarray | None,
                 delta: np.ndarray | None) -> None:
        """The layer's own bias input as int32 (created for a Conv that bias correction shifts)."""
        node = u.node
        channels = _channels(u, w_scale)
        if u.bias_index is not None:
            old = node.inputs[u.bias_index]
            b = np.asarray(const_value(old), np.float64).reshape(-1)
            self.released.append(old)
            hint = old.name
        else:
            b = np.zeros(channels)
            hint = f"{node.name or node.op}_bias"
        if b.size == 1 and channels > 1:
            b = np.full(channels, float(b[0]))
        d = self._bias_dq(ui, hint, b, delta, in_scale, w_scale)
        while len(node.inputs) < 2:
            node.inputs.append(gs.Variable.empty())
        if len(node.inputs) > 2:
            node.inputs[2] = d
        else:
            node.inputs.append(d)

    def _dq_bias_add(self, ui: int, u: Unit, in_scale: float | None, w_scale: np.ndarray | None,
                     delta: np.ndarray | None) -> None:
        """The constant of a MatMul's bias Add as int32 (what makes onnxruntime fuse a QGemm)."""
        add = u.bias_add
        old = add.inputs[u.bias_add_index]
        b = np.asarray(const_value(old), np.float64).reshape(-1)
        add.inputs[u.bias_add_index] = self._bias_dq(ui, old.name, b, delta, in_scale, w_scale)
        self.released.append(old)
        if ui in self.applied.unit_outputs:
            self.applied.unit_outputs[ui] = (add.outputs[0].name, add.outputs[0].name)

    def _bias_dq(self, ui: int, hint: str, b: np.ndarray, delta: np.ndarray | None, in_scale: float | None,
                 w_scale: np.ndarray | None) -> gs.Variable:
        """Bias ``b`` (shifted by ``delta``) as an int32 DequantizeLinear; its output."""
        if delta is not None and delta.shape == b.shape:
            b = b + delta
        dn, d, clipped = _int32_bias(self.names, hint, b, in_scale, w_scale)
        self.applied.bias_clipped += clipped
        self.add_dq(dn, ui, "bias")
        return d


def _bias_floor(u: Unit, in_scale: float | None, delta: np.ndarray | None) -> np.ndarray | None:
    """The smallest weight scales that keep the unit's int32 bias (scale = input scale x
    weight scale) in range: a near-zero weight channel with a sizeable bias would overflow."""
    if in_scale is None:
        return None
    if u.bias_index is not None:
        b = const_value(u.node.inputs[u.bias_index])
    elif u.bias_add is not None and u.bias_add_index is not None:
        b = const_value(u.bias_add.inputs[u.bias_add_index])
    else:
        return None
    if b is None:
        return None
    b = np.abs(np.asarray(b, np.float64).reshape(-1))
    if delta is not None and delta.shape == b.shape:
        b = b + np.abs(delta)
    need = b / (float(in_scale) * 2.0**30)
    if u.weight is None or u.weight[1] is None:
        return np.asarray(need.max() if need.size else 0.0)
    return need


def _range(dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _channels(u: Unit, w_scale: np.ndarray | None) -> int:
    if w_scale is not None and np.ndim(w_scale) == 1:
        return int(w_scale.shape[0])
    w = const_value(u.node.inputs[u.weight[0]]) if u.weight is not None else None
    if w is not None and u.node.op == "Conv":
        return int(np.asarray(w).shape[0])
    return 1


def _dq(names: NameAllocator, hint: str, q: np.ndarray, scale, zp, axis: int | None):
    qc = _const(names, f"{hint}_quantized", q)
    sc = _const(names, f"{hint}_scale", scale)
    zc = _const(names, f"{hint}_zero_point", zp)
    d = gs.Variable(names(f"{hint}_dequantized"), dtype=np.float32)
    attrs = {"axis": int(axis)} if axis is not None else {}
    dn = gs.Node("DequantizeLinear", names(f"{hint}_DequantizeLinear"), attrs=attrs, inputs=[qc, sc, zc],
                 outputs=[d])
    return dn, d


def _int32_bias(names: NameAllocator, hint: str, b: np.ndarray, in_scale: float | None,
                w_scale: np.ndarray | None):
    """A bias as int32 with scale input_scale * weight_scale (per channel)."""
    in_scale = 1.0 if in_scale is None else float(in_scale)
    ws = np.asarray(w_scale if w_scale is not None else 1.0, np.float64)
    scale = (in_scale * ws).astype(np.float32)
    if scale.ndim == 0 and b.size > 1:
        scale = np.full(b.size, float(scale), np.float32)
    scale = np.where(scale > 0, scale, np.float32(1e-12)).astype(np.float32)
    raw = np.round(b / scale.astype(np.float64))
    lo, hi = _range(np.int32)
    clipped = int(np.sum((raw < lo) | (raw > hi)))
    q = np.clip(raw, lo, hi).astype(np.int32)
    axis = 0 if scale.ndim == 1 else None
    dn, d = _dq(names, hint, q, scale, np.zeros(scale.shape, np.int32), axis)
    return dn, d, clipped


# --------------------------------------------------------------------------------------
# Dynamic quantization: weights offline, activations at run time
# --------------------------------------------------------------------------------------


def apply_dynamic(model: Model, nodes: list[gs.Node], names: NameAllocator, *, per_channel: bool,
                  reduce_range: bool = False) -> int:
    """Rewrite each MatMul/Gemm of ``nodes`` (constant 2-D weight) as
    DynamicQuantizeLinear → MatMulInteger → Cast → Mul (→ Add bias), the pattern the CPU
    provider fuses into DynamicQuantizeMatMul. Returns the number rewritten."""
    graph = model.graph
    new_nodes: list[gs.Node] = []
    released: list[gs.Tensor] = []
    count = 0
    for node in nodes:
        a, b = node.inputs[0], node.inputs[1]
        w = np.asarray(const_value(b), dtype=np.float32)
        bias = None
        if node.op == "Gemm":
            if int(node.attrs.get("transB", 0)):
                w = w.T
            if len(node.inputs) > 2 and node.inputs[2].name:
                bias = node.inputs[2]
        axis = 1 if per_channel else None
        q, s = quantize_weight(np.ascontiguousarray(w), axis, reduce_range=reduce_range)
        base = node.name or node.op
        aq = gs.Variable(names(f"{a.name}_quantized"), dtype=np.uint8)
        ascale = gs.Variable(names(f"{a.name}_scale"), dtype=np.float32)
        azp = gs.Variable(names(f"{a.name}_zero_point"), dtype=np.uint8)
        new_nodes.append(gs.Node("DynamicQuantizeLinear", names(f"{base}_DynamicQuantizeLinear"),
                                 inputs=[a], outputs=[aq, ascale, azp]))
        qc = _const(names, f"{b.name}_quantized", q)
        zc = _const(names, f"{b.name}_zero_point", np.zeros(s.shape, np.int8))
        sc = _const(names, f"{b.name}_scale", s)
        yi = gs.Variable(names(f"{base}_int32"), dtype=np.int32)
        new_nodes.append(gs.Node("MatMulInteger", names(f"{base}_MatMulInteger"), inputs=[aq, qc, azp, zc],
                                 outputs=[yi]))
        yf = gs.Variable(names(f"{base}_float"), dtype=np.float32)
        new_nodes.append(gs.Node("Cast", names(f"{base}_Cast"), attrs={"to": onnx.TensorProto.FLOAT},
                                 inputs=[yi], outputs=[yf]))
        st = gs.Variable(names(f"{base}_output_scale"), dtype=np.float32)
        new_nodes.append(gs.Node("Mul", names(f"{base}_scale_Mul"), inputs=[ascale, sc], outputs=[st]))
        out = node.outputs[0]
        if bias is not None:
            mid = gs.Variable(names(f"{base}_nobias"), dtype=np.float32)
            new_nodes.append(gs.Node("Mul", names(f"{base}_Mul"), inputs=[yf, st], outputs=[mid]))
            new_nodes.append(gs.Node("Add", names(f"{base}_bias_Add"), inputs=[mid, bias], outputs=[out]))
        else:
            new_nodes.append(gs.Node("Mul", names(f"{base}_Mul"), inputs=[yf, st], outputs=[out]))
        node.inputs.clear()
        node.outputs.clear()
        released.append(b)
        count += 1
    dead = {id(n) for n in nodes}
    graph.nodes = [n for n in graph.nodes if id(n) not in dead] + new_nodes
    prune_unused(model, released)
    toposort(graph)
    return count


def apply_dynamic_lstm(model: Model, nodes: list[gs.Node], names: NameAllocator, *, per_channel: bool) -> int:
    """Rewrite each LSTM of ``nodes`` (constant W and R) as onnxruntime's
    ``DynamicQuantizeLSTM``: int8 weights, transposed to [directions, input, 4*hidden],
    activations quantized inside the kernel at run time."""
    graph = model.graph
    new_nodes: list[gs.Node] = []
    released: list[gs.Tensor] = []
    for node in nodes:
        base = node.name or node.op
        inputs = list(node.inputs) + [gs.Variable.empty()] * (8 - len(node.inputs))
        quantized = []
        for t in (inputs[1], inputs[2]):
            w = np.asarray(const_value(t), np.float32).transpose(0, 2, 1)  # [dirs, in, 4h]
            # one scale per direction (and per gate column with per_channel): [dirs(, 4h)]
            per_dir = [quantize_weight(np.ascontiguousarray(w[d]), 1 if per_channel else None)
                       for d in range(w.shape[0])]
            q = np.stack([x[0] for x in per_dir])
            s = np.stack([np.asarray(x[1], np.float32).reshape(-1) if per_channel else np.asarray(x[1]).reshape(())
                          for x in per_dir])
            quantized += [_const(names, f"{t.name}_quantized", q), _const(names, f"{t.name}_scale", s),
                          _const(names, f"{t.name}_zero_point", np.zeros(s.shape, np.int8))]
            released.append(t)
        wq, ws, wz, rq, rs, rz = quantized
        new_nodes.append(gs.Node("DynamicQuantizeLSTM", names(f"{base}_DynamicQuantizeLSTM"), domain=MS,
                                 attrs=dict(node.attrs),
                                 inputs=[inputs[0], wq, rq, *inputs[3:8], ws, wz, rs, rz],
                                 outputs=list(node.outputs)))
        node.inputs.clear()
        node.outputs.clear()
    dead = {id(n) for n in nodes}
    graph.nodes = [n for n in graph.nodes if id(n) not in dead] + new_nodes
    prune_unused(model, released)
    toposort(graph)
    if nodes:
        model.opset_imports.setdefault(MS, 1)
    return len(nodes)


# --------------------------------------------------------------------------------------
# Weight-only: blockwise int4/int8 MatMul weights
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def matmulnbits_available(bits: int) -> bool:
    """Whether this onnxruntime's CPU provider runs ``MatMulNBits`` with ``bits``."""
    import onnxruntime as ort

    k, n, bs = 32, 8, 16
    blob = bs * bits // 8
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMulNBits", ["a", "b", "s"], ["y"], domain=MS, K=k, N=n, bits=bits,
                               block_size=bs)],
        "probe", [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1, k])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, n])],
        [onnx.numpy_helper.from_array(np.zeros((n, k // bs, blob), np.uint8), "b"),
         onnx.numpy_helper.from_array(np.ones(n * k // bs, np.float32), "s")])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid(MS, 1)])
    m.ir_version = 8
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        sess.run(None, {"a": np.ones((1, k), np.float32)})
        return True
    except Exception:
        return False


def _blockwise(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Symmetric blockwise quantization of ``w`` [K, N] along K: signed values
    [N, blocks, block] (zero padded) and scales [N, blocks]."""
    k, n = w.shape
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), np.float64)
    padded[:k] = w
    cols = padded.T.reshape(n, blocks, block)
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(cols).max(axis=2)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.round(cols / scale[..., None]), -qmax - 1, qmax).astype(np.int32)
    return q, scale, blocks


def _pack(q_unsigned: np.ndarray, bits: int) -> np.ndarray:
    """[N, blocks, block] values in [0, 2^bits) packed little-nibble-first into bytes."""
    if bits == 8:
        return q_unsigned.astype(np.uint8)
    v = q_unsigned.astype(np.uint8)
    return (v[..., 0::2] & 0x0F) | ((v[..., 1::2] & 0x0F) << 4)


def apply_weight_only(model: Model, nodes: list[gs.Node], names: NameAllocator, *, bits: int,
                      block_size: int, fmt: str) -> tuple[int, str]:
    """Blockwise-quantize the constant 2-D weight of each MatMul of ``nodes``: as a
    ``MatMulNBits`` (fmt ``matmulnbits``) or as a block-quantized DequantizeLinear (opset
    21, fmt ``dequantize``) feeding the MatMul. Returns (count, format used)."""
    graph = model.graph
    new_nodes: list[gs.Node] = []
    released: list[gs.Tensor] = []
    dead: set[int] = set()
    for node in nodes:
        a, b = node.inputs[0], node.inputs[1]
        w = np.asarray(const_value(b), dtype=np.float32)
        k, n = w.shape
        q, scale, blocks = _blockwise(w, bits, block_size)
        base = node.name or node.op
        if fmt == "matmulnbits":
            offset = 2 ** (bits - 1)
            packed = _pack(q + offset, bits)
            bc = _const(names, f"{b.name}_q{bits}", packed)
            sc = _const(names, f"{b.name}_scales", scale.reshape(-1))
            mn = gs.Node("MatMulNBits", names(f"{base}_MatMulNBits"), domain=MS,
                         attrs={"K": int(k), "N": int(n), "bits": int(bits), "block_size": int(block_size)},
                         inputs=[a, bc, sc], outputs=[node.outputs[0]])
            node.inputs.clear()
            node.outputs.clear()
            dead.add(id(node))
            new_nodes.append(mn)
        else:
            qk = q.reshape(n, blocks * block_size).T[:k]  # [K, N]
            qdtype = _int4_dtype() if bits == 4 else np.int8
            qc = _const(names, f"{b.name}_q{bits}", qk.astype(qdtype))
            sc = _const(names, f"{b.name}_scales", np.ascontiguousarray(scale.T))  # [blocks, N]
            d = gs.Variable(names(f"{b.name}_dequantized"), dtype=np.float32)
            dn = gs.Node("DequantizeLinear", names(f"{base}_DequantizeLinear_w"),
                         attrs={"axis": 0, "block_size": int(block_size)}, inputs=[qc, sc], outputs=[d])
            node.inputs[1] = d
            new_nodes.append(dn)
        released.append(b)
    graph.nodes = [x for x in graph.nodes if id(x) not in dead] + new_nodes
    prune_unused(model, released)
    toposort(graph)
    if fmt == "matmulnbits":
        model.opset_imports.setdefault(MS, 1)
    return len(nodes), fmt


def _int4_dtype():
    import ml_dtypes

    return ml_dtypes.int4
