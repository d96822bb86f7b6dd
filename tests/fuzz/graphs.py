"""Random valid ONNX graphs with consistent shapes, for differential testing.

:func:`random_graph` builds a model from a seed: one or two float inputs, then a
sequence of steps, each drawn from the patterns the exact passes rewrite and the ops
around them — elementwise arithmetic (with the no-ops ``x+0``, ``x*1`` ...), shape ops
(Reshape, Transpose, Flatten, Squeeze/Unsqueeze, Expand, Shape→Gather→Concat→Reshape),
Conv/ConvTranspose/MatMul/Gemm with bias Adds and BatchNorm or per-channel Mul/Add
after them, normalizations, Concat/Split/Slice, reductions, constant subgraphs,
repeated subexpressions, byte-identical constants under several names, and If/Loop
bodies that read tensors and constants of the graph around them. Every step knows the
shape it produces, so the graph is valid by construction (``onnx.checker`` and
onnxruntime accept it); a step never feeds a discontinuous op (Floor, comparisons) a
computed value, so that float rounding cannot turn into a different answer.

Values stay of order one (weights scaled by fan-in, denominators kept away from zero,
Exp/Log/Sqrt only of bounded or positive arguments) so that the float tolerance of
the conformance suite is a fair bound.
"""

from __future__ import annotations

import random

import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.fuzz.graph_steps import DATAFLOW, Builder, F, T

__all__ = ["random_graph", "STEPS"]


def run_steps(b: Builder, count: int) -> None:
    """``count`` random steps in ``b`` (a body gets control flow one level down only)."""
    names = list(STEPS)
    weights = [STEPS[n][1] if not (n in ("if", "loop") and b.depth >= 2) else 0 for n in names]
    done = 0
    for _ in range(count * 3):
        if done >= count:
            return
        if STEPS[b.rng.choices(names, weights)[0]][0](b):
            done += 1


def _body_output(sub: Builder, shape: tuple[int, ...], start: T) -> T:
    """A tensor of ``shape`` computed in the body: one of its own (a late one), or
    ``start`` through an op when none has that shape."""
    own = [t for t in sub.pool if t.shape == shape]
    src = own[-1] if own and sub.rng.random() < 0.8 else start
    return sub.op(sub.rng.choice(["Identity", "Relu", "Tanh"]), [src.name], shape)


def if_(b: Builder) -> bool:
    """An If whose branches read outer tensors and share constants (an outer one, and
    byte-identical ones of their own); its condition is a constant (fold-constants may
    decide it) or computed from a graph input."""
    x = b.pick()
    if x is None or b.depth >= 2:
        return False
    shared = b.const(b.weight(*x.shape[-1:], scale=1.0) if x.shape else np.float32(1.5), "shared")
    if b.rng.random() < 0.4:
        cond = b.const(np.array(b.rng.random() < 0.5))
    else:
        root = b
        while root.outer is not None:
            root = root.outer
        src = root.graph_inputs[0]
        s = b.op("ReduceSum", [src.name], (), pool=False, keepdims=0)
        cond = b.op("Greater", [s.name, b.const(np.array(0.0, np.float32))], (), pool=False).name
    branches = []
    for tag in ("then", "else"):
        sub = Builder(b.rng, b.opset, prefix=f"{tag}_", outer=b)
        y = sub.op("Mul" if tag == "then" else "Add", [x.name, shared], x.shape)
        sub.const(np.full(x.shape[-1:], 0.75, np.float32))  # the same bytes in both branches
        run_steps(sub, b.rng.randint(0, 4))
        out = _body_output(sub, x.shape, y)
        branches.append(helper.make_graph(sub.nodes, f"{tag}_body", [],
                                          [helper.make_tensor_value_info(out.name, F, list(out.shape))],
                                          sub.inits, value_info=sub.value_info))
    b.op("If", [cond], x.shape, then_branch=branches[0], else_branch=branches[1])
    return True


def loop(b: Builder) -> bool:
    """A Loop of 1–3 rounds carrying a tensor, reading outer tensors and constants, with
    a scan output sometimes."""
    x = b.pick()
    if x is None or b.depth >= 2:
        return False
    trips = b.rng.randint(1, 3)
    sub = Builder(b.rng, b.opset, prefix="body_", outer=b)
    it, cin, acc = sub.name("i"), sub.name("cond"), sub.name("acc")
    start = sub.op("Mul", [acc, sub.const(np.full(x.shape[-1:] if x.shape else (), 0.5, np.float32))], x.shape)
    run_steps(sub, b.rng.randint(1, 4))
    y = _body_output(sub, x.shape, start)
    cout = sub.op("Identity", [cin], (), pool=False)
    scan = b.rng.random() < 0.4
    outs = [helper.make_tensor_value_info(cout.name, TensorProto.BOOL, []),
            helper.make_tensor_value_info(y.name, F, list(x.shape))]
    if scan:
        s = sub.op("Identity", [y.name], x.shape)
        outs.append(helper.make_tensor_value_info(s.name, F, list(x.shape)))
    body = helper.make_graph(sub.nodes, "loop_body",
                             [helper.make_tensor_value_info(it, TensorProto.INT64, []),
                              helper.make_tensor_value_info(cin, TensorProto.BOOL, []),
                              helper.make_tensor_value_info(acc, F, list(x.shape))], outs, sub.inits,
                             value_info=sub.value_info)
    trip = b.const(np.array(trips, np.int64), "trip")
    cond = b.const(np.array(True)) if b.rng.random() < 0.5 else ""
    shapes = [x.shape] + ([(trips,) + x.shape] if scan else [])
    b.op("Loop", [trip, cond, x.name], shapes, body=body)
    return True


STEPS = dict(DATAFLOW, **{"if": (if_, 1.2), "loop": (loop, 0.8)})


def random_graph(seed: int, *, steps: int | None = None) -> onnx.ModelProto:
    """A random valid model: inputs, ``steps`` (default 3–14) steps, 1–3 outputs."""
    rng = random.Random(seed)
    opset = rng.choice([13, 17, 18])
    b = Builder(rng, opset)
    inputs = []
    for i in range(rng.choice([1, 1, 2])):
        rank = rng.choice([2, 3, 4, 4])
        shape = (rng.choice([1, 2]),) + tuple(rng.choice([2, 3, 4, 5, 8]) for _ in range(rank - 1))
        t = T(f"x{i}", shape)
        b.pool.append(t)
        b.graph_inputs.append(t)
        dims: list = list(shape)
        if shape[0] == 1 and rng.random() < 0.3:
            dims[0] = "N"  # a dynamic batch: generated feeds give it 1, the second check 2
            b.declare = False
        inputs.append(helper.make_tensor_value_info(t.name, F, dims))
    run_steps(b, steps if steps is not None else rng.randint(3, 14))
    produced = [t for t in b.pool if t not in b.graph_inputs]
    if not produced:
        produced = [b.op("Relu", [b.graph_inputs[0].name], b.graph_inputs[0].shape)]
    outs = [produced[-1]]
    for t in rng.sample(produced[:-1], min(len(produced) - 1, rng.choice([0, 0, 1, 2]))):
        outs.append(t)
    outputs = []
    for t in outs:
        known = b.declare and rng.random() < 0.8  # some outputs declare their rank only
        outputs.append(helper.make_tensor_value_info(t.name, F, list(t.shape) if known else [None] * len(t.shape)))
    graph = helper.make_graph(b.nodes, f"random_{seed}", inputs, outputs, b.inits,
                              value_info=[v for v in b.value_info if v.name not in {o.name for o in outs}])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="onnxopt-fuzz")
    model.ir_version = 8 if opset < 18 else 9
    return model
