"""A real classifier on real labelled data: scikit-learn's ``load_digits`` (1,797 8x8
images of handwritten digits), a fixed train/test split, an MLP trained with a fixed
seed and written as plain ONNX (MatMul + Add + Relu, logits out).

It is the model on which accuracy — not only output drift — is measured:

    from models.digits import digits_mlp, digits_split, accuracy
    proto = digits_mlp()                      # hidden (300, 100), like LeNet-300-100
    x_train, x_test, y_train, y_test = digits_split()
    accuracy(proto, x_test, y_test)           # about 0.97

The split and the trained classifier are built once per process and shared by every
caller (a test session trains once); the shared arrays are read-only, so no caller can
change another's data.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["digits_split", "train_mlp", "digits_mlp", "accuracy", "logits", "HIDDEN"]

HIDDEN = (300, 100)


@functools.lru_cache(maxsize=4)
def digits_split(seed: int = 0, test_size: float = 0.3):
    """(x_train, x_test, y_train, y_test): features scaled to [0, 1] as float32; the same
    read-only arrays on every call."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    parts = tuple(train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y))
    for part in parts:
        part.setflags(write=False)
    return parts


@functools.lru_cache(maxsize=4)
def train_mlp(hidden: tuple[int, ...] = HIDDEN, seed: int = 0):
    """The trained scikit-learn MLPClassifier (deterministic for a seed), trained once per
    process for each ``(hidden, seed)``.

    BLAS runs on one thread while it trains: the matrices are small, and on a busy
    machine BLAS threads that wait for one another made training many times slower, for
    the same weights."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    x_train, _, y_train, _ = digits_split(seed)
    clf = MLPClassifier(hidden_layer_sizes=hidden, activation="relu", solver="adam", alpha=1e-4,
                        batch_size=64, learning_rate_init=1e-3, max_iter=200, random_state=seed)
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, y_train)
    return clf


def digits_mlp(hidden: tuple[int, ...] = HIDDEN, seed: int = 0) -> onnx.ModelProto:
    """The trained MLP as ONNX: input ``input`` float[N, 64], output ``logits`` float[N, 10]."""
    clf = train_mlp(tuple(hidden), seed)
    nodes, inits = [], []
    h = "input"
    layers = len(clf.coefs_)
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"fc{i}.weight"),
                  numpy_helper.from_array(b.astype(np.float32), f"fc{i}.bias")]
        mm, out = f"fc{i}.matmul", ("logits" if i == layers - 1 else f"fc{i}.out")
        nodes.append(helper.make_node("MatMul", [h, f"fc{i}.weight"], [mm], name=f"fc{i}/MatMul"))
        if i < layers - 1:
            nodes.append(helper.make_node("Add", [mm, f"fc{i}.bias"], [f"fc{i}.pre"], name=f"fc{i}/Add"))
            nodes.append(helper.make_node("Relu", [f"fc{i}.pre"], [out], name=f"fc{i}/Relu"))
        else:
            nodes.append(helper.make_node("Add", [mm, f"fc{i}.bias"], [out], name=f"fc{i}/Add"))
        h = out
    graph = helper.make_graph(nodes, "digits_mlp",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="onnxopt-models", producer_version="1")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def logits(model, x: np.ndarray) -> np.ndarray:
    """Run a digits model (ModelProto, bytes, path or onnxopt Model) on ``x``."""
    import onnxruntime as ort

    if hasattr(model, "to_bytes"):
        model = model.to_bytes()
    elif isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif not isinstance(model, (bytes, str)):
        model = str(model)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a digits model on (x, y)."""
    return float((logits(model, x).argmax(1) == y).mean())
