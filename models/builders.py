"""Deterministic builders of small models for tests, benchmarks and the demo.

Every builder returns an ``onnx.ModelProto`` that passes ``onnx.checker`` and runs on
onnxruntime; the same call gives the same bytes (weights come from a seeded generator).

* :func:`cnn` — Conv/BatchNorm/Relu stem, a residual block, pooling and a Gemm head.
* :func:`mlp` — MatMul+Add+Relu layers and a classifier.
* :func:`control_flow` — an If whose branches and a Loop whose body read outer-scope
  tensors (and hold dead nodes of their own).
* :func:`dead_branches` — dead nodes and initializers, duplicate weights, Identity and
  Dropout no-ops, an unused local function, value_info and opset import.
* :func:`demo` — the model ``make demo`` optimizes: a CNN with all of the above.
* :func:`transformer` — a small BERT-like encoder (:mod:`models.transformer`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["BUILDERS", "build", "cnn", "mlp", "control_flow", "dead_branches", "demo", "transformer"]

OPSET = 17
IR_VERSION = 8
F = TensorProto.FLOAT


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _w(rng: np.random.Generator, *shape: int, scale: float | None = None) -> np.ndarray:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    s = scale if scale is not None else 1.0 / np.sqrt(max(fan_in, 1))
    return (rng.standard_normal(shape) * s).astype(np.float32)


def _init(name: str, arr: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _model(graph: onnx.GraphProto, opsets: dict[str, int] | None = None, **kw) -> onnx.ModelProto:
    opsets = opsets or {"": OPSET}
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
        producer_name="onnxopt-models", producer_version="1", **kw)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


class _G:
    """A tiny graph-building helper: unique names, nodes and initializers in order."""

    def __init__(self, seed: int = 0):
        self.rng = _rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def init(self, base: str, arr: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(_init(name, arr))
        return name

    def op(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv_bn_relu(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, relu: bool = True) -> str:
        w = self.init("conv_w", _w(self.rng, cout, cin, k, k))
        y = self.op("Conv", [x, w], kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride])
        scale = self.init("bn_scale", (1.0 + 0.1 * self.rng.standard_normal(cout)).astype(np.float32))
        bias = self.init("bn_bias", (0.1 * self.rng.standard_normal(cout)).astype(np.float32))
        mean = self.init("bn_mean", (0.1 * self.rng.standard_normal(cout)).astype(np.float32))
        var = self.init("bn_var", (0.5 + self.rng.random(cout)).astype(np.float32))
        y = self.op("BatchNormalization", [y, scale, bias, mean, var], epsilon=1e-5)
        return self.op("Relu", [y]) if relu else y


def cnn(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """Conv-BN-Relu stem, one residual block, GlobalAveragePool, Flatten, Gemm."""
    g = _G(seed)
    x = "input"
    h = g.conv_bn_relu(x, 3, 16, stride=2)
    r = g.conv_bn_relu(h, 16, 16)
    r = g.conv_bn_relu(r, 16, 16, relu=False)
    h = g.op("Relu", [g.op("Add", [h, r])])
    h = g.conv_bn_relu(h, 16, 32, stride=2)
    h = g.op("GlobalAveragePool", [h])
    h = g.op("Flatten", [h], axis=1)
    w = g.init("fc_w", _w(g.rng, classes, 32))
    b = g.init("fc_b", np.zeros(classes, np.float32))
    g.nodes.append(helper.make_node("Gemm", [h, w, b], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        g.nodes, "cnn",
        [helper.make_tensor_value_info("input", F, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", F, ["N", classes])], g.inits)
    return _model(graph)


def mlp(seed: int = 0, sizes: tuple[int, ...] = (64, 128, 64, 10)) -> onnx.ModelProto:
    """MatMul+Add+Relu layers; the last layer's output is the logits."""
    g = _G(seed)
    h = "input"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = g.init("w", _w(g.rng, a, b, scale=1 / np.sqrt(a)))
        bias = g.init("b", (0.05 * g.rng.standard_normal(b)).astype(np.float32))
        h = g.op("Add", [g.op("MatMul", [h, w]), bias])
        if i < len(sizes) - 2:
            h = g.op("Relu", [h])
    g.nodes.append(helper.make_node("Identity", [h], ["logits"], name="out"))
    graph = helper.make_graph(
        g.nodes, "mlp",
        [helper.make_tensor_value_info("input", F, ["N", sizes[0]])],
        [helper.make_tensor_value_info("logits", F, ["N", sizes[-1]])], g.inits)
    return _model(graph)


def control_flow(seed: int = 0) -> onnx.ModelProto:
    """An If and a Loop whose bodies read tensors of the main graph (outer scope), each
    body holding a dead node; plus a dead node in the main graph.

    ``y = If(sum(x) > 0, then: (x * scale) + bias, else: x - bias)`` and
    ``z = Loop(3 times: acc = acc * decay + y)`` starting from ``y``.
    """
    rng = _rng(seed)
    scale = _init("scale", (1 + 0.1 * rng.standard_normal(8)).astype(np.float32))
    bias = _init("bias", (0.1 * rng.standard_normal(8)).astype(np.float32))
    decay = _init("decay", np.array([0.5], np.float32))
    trip = _init("trip", np.array(3, np.int64))
    unused_outer = _init("unused_outer", np.ones(8, np.float32))

    then_g = helper.make_graph(
        [helper.make_node("Mul", ["x_act", "scale"], ["t_mul"], name="then_mul"),
         helper.make_node("Add", ["t_mul", "bias"], ["t_out"], name="then_add"),
         helper.make_node("Neg", ["t_mul"], ["t_dead"], name="then_dead")],
        "then_branch", [], [helper.make_tensor_value_info("t_out", F, ["N", 8])])
    else_g = helper.make_graph(
        [helper.make_node("Sub", ["x_act", "bias"], ["e_out"], name="else_sub")],
        "else_branch", [], [helper.make_tensor_value_info("e_out", F, ["N", 8])])
    body = helper.make_graph(
        [helper.make_node("Mul", ["acc_in", "decay"], ["b_mul"], name="body_mul"),
         helper.make_node("Add", ["b_mul", "y"], ["acc_out"], name="body_add"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
         helper.make_node("Exp", ["acc_in"], ["b_dead"], name="body_dead")],
        "loop_body",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", F, ["N", 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", F, ["N", 8])])
    nodes = [
        helper.make_node("Relu", ["x"], ["x_act"], name="act"),
        helper.make_node("ReduceSum", ["x_act"], ["s"], name="sum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trip", "", "y"], ["z"], name="loop", body=body),
        helper.make_node("Sigmoid", ["x"], ["main_dead"], name="main_dead"),
    ]
    graph = helper.make_graph(
        nodes, "control_flow",
        [helper.make_tensor_value_info("x", F, ["N", 8])],
        [helper.make_tensor_value_info("y", F, ["N", 8]), helper.make_tensor_value_info("z", F, ["N", 8])],
        [scale, bias, decay, trip, unused_outer, _init("zero", np.array(0, np.float32))])
    return _model(graph)


def dead_branches(seed: int = 0) -> onnx.ModelProto:
    """A small CNN with everything the clean-up passes remove: dead nodes and branches,
    unused initializers, duplicate weights, Identity/Dropout, an unused local function,
    an unused opset import and value_info for tensors that do not exist."""
    g = _G(seed)
    x = "input"
    h = g.conv_bn_relu(x, 3, 8)
    # Two convolutions with byte-identical weights (exporters repeat tied weights).
    w = _w(g.rng, 8, 8, 3, 3)
    wa = g.init("tied_w", w)
    wb = g.init("tied_w", w.copy())
    a = g.op("Conv", [h, wa], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b = g.op("Conv", [h, wb], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    h = g.op("Add", [a, b])
    h = g.op("Identity", [h])
    h = g.op("Dropout", [h])
    # A dead branch: computed, never used.
    dead = g.op("Sigmoid", [h])
    dead = g.op("Mul", [dead, g.init("dead_w", np.full((1, 8, 1, 1), 2.0, np.float32))])
    g.op("ReduceMean", [dead], keepdims=0)
    h = g.op("GlobalAveragePool", [h])
    h = g.op("Flatten", [h], axis=1)
    fw = g.init("fc_w", _w(g.rng, 10, 8))
    g.nodes.append(helper.make_node("Gemm", [h, fw], ["logits"], name="fc", transB=1))
    g.inits.append(_init("never_used", np.ones((64, 64), np.float32)))
    fn = helper.make_function("local", "Unused", ["a"], ["b"],
                              [helper.make_node("Relu", ["a"], ["b"])], [helper.make_opsetid("", OPSET)])
    graph = helper.make_graph(
        g.nodes, "dead_branches",
        [helper.make_tensor_value_info("input", F, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", F, ["N", 10])], g.inits,
        value_info=[helper.make_tensor_value_info("ghost", F, [1])])
    return _model(graph, {"": OPSET, "local": 1, "com.example.unused": 1}, functions=[fn])


def demo(seed: int = 0) -> onnx.ModelProto:
    """The model ``make demo`` optimizes: :func:`dead_branches` with a residual CNN body."""
    return dead_branches(seed)


def digits(seed: int = 0) -> onnx.ModelProto:
    """The digits MLP (scikit-learn, trained on load_digits): see :mod:`models.digits`."""
    from .digits import digits_mlp

    return digits_mlp(seed=seed)


def transformer(seed: int = 0) -> onnx.ModelProto:
    """A small BERT-like encoder (2 blocks, MatMul-heavy): see :mod:`models.transformer`."""
    from .transformer import transformer as build_transformer

    return build_transformer(seed)


BUILDERS = {
    "cnn": cnn,
    "transformer": transformer,
    "digits": digits,
    "mlp": mlp,
    "control_flow": control_flow,
    "dead_branches": dead_branches,
    "demo": demo,
}


def build(name: str, seed: int = 0) -> onnx.ModelProto:
    """Build a model by name (see :data:`BUILDERS`)."""
    try:
        return BUILDERS[name](seed)
    except KeyError:
        raise KeyError(f"unknown builder '{name}'; known: {', '.join(BUILDERS)}") from None
