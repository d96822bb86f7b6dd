"""A small model and data for the search tests: quick to build, probe and measure."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def small_mlp(seed: int = 0, sizes: tuple[int, ...] = (32, 64, 64, 10)) -> onnx.ModelProto:
    """``x`` float[N, 32] -> MatMul+Add+Relu (x2) -> MatMul+Add -> ``logits`` float[N, 10]."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    h = "x"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(b)).astype(np.float32), f"b{i}")]
        last = i == len(sizes) - 2
        nodes.append(helper.make_node("MatMul", [h, f"w{i}"], [f"mm{i}"], name=f"fc{i}"))
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], ["logits" if last else f"pre{i}"], name=f"add{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [f"pre{i}"], [f"h{i}"], name=f"relu{i}"))
            h = f"h{i}"
    graph = helper.make_graph(nodes, "small_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", sizes[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def feeds(n: int, seed: int = 1, rows: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((rows, 32)).astype(np.float32)} for _ in range(n)]


def top1_agreement(reference, candidate) -> float:
    """A user metric: the share of rows whose top class is unchanged."""
    agree = total = 0
    for r, c in zip(reference, candidate):
        agree += int((r["logits"].argmax(-1) == c["logits"].argmax(-1)).sum())
        total += r["logits"].shape[0]
    return agree / total


def broken_metric(reference, candidate) -> float:
    raise ValueError("labels missing")
