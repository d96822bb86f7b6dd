"""distill: fit the student's final classifier layer(s) to the teacher's soft outputs.

After compression the last layers see different features. ``distill`` computes those
features and the teacher's logits (``ctx.reference``) with onnxruntime on the
calibration data and fits the final layer(s) by Adam, in numpy, on the distillation loss

    L = (1 − α)·CE(labels, student) + α·T²·KL(softmax(teacher/T) ‖ softmax(student/T))

(Hinton et al. 2015). Labels are optional (without them α is 1): a ``.npy`` of integer
classes or a ``.npz`` holding ``labels``, one per row of logits in calibration order.

The final layer is found from the first graph output (or ``output``) backwards, through
Softmax/LogSoftmax/Identity/Reshape, to a Gemm or a MatMul with a constant weight (and
its bias Add); ``layers=2`` also fits the layer before it across a ReLU. A ``holdout``
share of the rows measures the result (KL and top-1 agreement with the teacher), and the
new weights are kept only if the loss on them went down.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.activations import capture
from onnxopt.errors import UsageError
from onnxopt.framework import Opt, Pass, PassContext, PassResult, register
from onnxopt.graph import const_through_shape_ops, write_constant
from onnxopt.labels import read_labels
from onnxopt.model import Model

__all__ = ["Distill", "find_head", "Dense"]

log = logging.getLogger(__name__)

_THROUGH = ("Softmax", "LogSoftmax", "Identity", "Reshape", "Flatten", "Squeeze", "Cast")


@dataclass
class Dense:
    """One fitted layer: ``y = x @ W + b`` written back into ``node`` (and ``bias``)."""

    node: gs.Node
    bias: tuple[gs.Node, int] | None
    out: gs.Tensor  # the layer's output (after the bias)

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        w = np.asarray(const_through_shape_ops(self.node.inputs[1]), np.float64)
        if self.node.op == "Gemm":
            alpha = float(self.node.attrs.get("alpha", 1.0))
            w = alpha * (w.T if self.node.attrs.get("transB", 0) else w)
        b = np.zeros(w.shape[1])
        if self.bias is not None:
            place, index = self.bias
            b = np.asarray(const_through_shape_ops(place.inputs[index]), np.float64).reshape(-1)
            b = np.broadcast_to(b, (w.shape[1],)).copy()
            if place.op == "Gemm":
                b = b * float(place.attrs.get("beta", 1.0))
        return w, b

    def write(self, model: Model, w: np.ndarray, b: np.ndarray) -> None:
        old = const_through_shape_ops(self.node.inputs[1])
        if self.node.op == "Gemm":
            m = w / float(self.node.attrs.get("alpha", 1.0))
            w = m.T if self.node.attrs.get("transB", 0) else m
        write_constant(model, self.node, 1, w.astype(old.dtype))
        if self.bias is not None:
            place, index = self.bias
            ob = const_through_shape_ops(place.inputs[index])
            if place.op == "Gemm":
                b = b / float(place.attrs.get("beta", 1.0))
            if ob.size == b.size:
                write_constant(model, place, index, b.reshape(ob.shape).astype(ob.dtype))


@register
class Distill(Pass):
    """Fit the final classifier layer(s) to the teacher's outputs (knowledge
    distillation), on features computed with onnxruntime."""

    name = "distill"
    summary = "fit the final classifier layer(s) to the teacher: (1-a)·CE(labels) + a·T²·KL(teacher_T||student_T)"
    exact = False
    options = {
        "temperature": Opt(float, 2.0, "softmax temperature T", minimum=0.05),
        "alpha": Opt(float, 0.7, "weight of the distillation term (1 when no labels are given)",
                     minimum=0.0, maximum=1.0),
        "steps": Opt(int, 300, "gradient steps (Adam)", minimum=1),
        "lr": Opt(float, 0.01, "learning rate", minimum=0.0),
        "batch": Opt(int, 256, "rows per step (0: all)", minimum=0),
        "weight_decay": Opt(float, 1e-4, "L2 pull towards the current weights", minimum=0.0),
        "layers": Opt(int, 1, "how many final layers to fit (ReLU between them)", minimum=1, maximum=4),
        "labels": Opt(str, "", ".npy/.npz of integer labels, one per row of logits, in calibration order"),
        "output": Opt(str, "", "the graph output to distill (default: the first)"),
        "samples": Opt(int, 256, "calibration samples to use", minimum=1),
        "holdout": Opt(float, 0.2, "share of rows kept out of the fit, on which the stats are measured",
                       minimum=0.0, maximum=0.9),
    }

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        teacher = ctx.reference
        if teacher is None:
            raise UsageError(f"pass '{self.name}' needs the original model as teacher (PassContext.reference)")
        calibration = ctx.require_calibration(self.name)
        head = find_head(model, self.opts.output, self.opts.layers)
        if isinstance(head, str):
            log.info("distill: nothing to fit: %s", head)
            return PassResult(False, {"skipped": head})
        layers, logits = head
        t_names = {t.name for n in teacher.graph.nodes for t in n.outputs}
        if logits.name not in t_names and logits.name not in {o.name for o in teacher.graph.outputs}:
            return PassResult(False, {"skipped": f"the teacher has no tensor '{logits.name}'"})
        feed_list = list(itertools.islice(iter(calibration), self.opts.samples))
        x_name = layers[0].node.inputs[0].name
        xs = [v[x_name] for v in capture(model, [x_name], feed_list)]
        ts = [v[logits.name] for v in capture(teacher, [logits.name], feed_list)]
        classes = ts[0].shape[-1]
        X = np.concatenate([np.asarray(x, np.float64).reshape(-1, x.shape[-1]) for x in xs])
        Tl = np.concatenate([np.asarray(t, np.float64).reshape(-1, classes) for t in ts])
        if X.shape[0] != Tl.shape[0]:
            return PassResult(False, {"skipped": "features and logits do not line up row by row"})
        labels = (read_labels(self.opts.labels, X.shape[0], classes, what=self.name)
                  if self.opts.labels else None)
        alpha = self.opts.alpha if labels is not None else 1.0
        rng = np.random.default_rng(ctx.seed)
        order = rng.permutation(X.shape[0])
        n_hold = int(round(self.opts.holdout * X.shape[0])) if X.shape[0] > 4 else 0
        hold, train = order[:n_hold], order[n_hold:]
        params = [layer.weights() for layer in layers]
        start = [(w.copy(), b.copy()) for w, b in params]
        T = self.opts.temperature
        ev = hold if n_hold else train
        before = _metrics(params, X[ev], Tl[ev], None if labels is None else labels[ev], T, alpha)
        with ctx.progress.task("distill", total=self.opts.steps) as advance:
            params = _fit(params, start, X[train], Tl[train], None if labels is None else labels[train], T, alpha,
                          steps=self.opts.steps, lr=self.opts.lr, batch=self.opts.batch,
                          decay=self.opts.weight_decay, rng=rng, advance=advance,
                          biases=[layer.bias is not None for layer in layers])
        after = _metrics(params, X[ev], Tl[ev], None if labels is None else labels[ev], T, alpha)
        stats = {"layers": len(layers), "rows": int(X.shape[0]), "rows_held_out": int(n_hold),
                 "labels": labels is not None, "alpha": alpha, "temperature": T}
        for key in ("kl", "agreement", "loss", "accuracy"):
            if key in before:
                stats[f"{key}_before"] = round(before[key], 6)
                stats[f"{key}_after"] = round(after[key], 6)
        if not after["loss"] < before["loss"]:
            stats["kept"] = False
            log.info("distill: loss did not go down (%.5g -> %.5g); weights left alone", before["loss"], after["loss"])
            return PassResult(False, stats)
        stats["kept"] = True
        for layer, (w, b) in zip(layers, params):
            layer.write(model, w, b)
        return PassResult(True, stats)


def find_head(model: Model, output: str, layers: int) -> tuple[list[Dense], gs.Tensor] | str:
    """The final dense layer(s) before graph output ``output`` (first output if empty)
    and the logits tensor, or why there are none."""
    outs = model.graph.outputs
    if output:
        found = [t for t in outs if t.name == output]
        if not found:
            raise UsageError(f"distill: the model has no output '{output}' (outputs: {', '.join(t.name for t in outs)})")
        t = found[0]
    elif outs:
        t = outs[0]
    else:
        return "the model has no outputs"
    while t.inputs and t.inputs[0].op in _THROUGH and len(t.inputs[0].inputs) >= 1:
        t = t.inputs[0].inputs[0]
    logits = t
    chain: list[Dense] = []
    while len(chain) < layers:
        dense = _dense_producing(t)
        if dense is None:
            break
        chain.insert(0, dense)
        x = dense.node.inputs[0]
        if len(chain) < layers and x.inputs and x.inputs[0].op == "Relu" and len(x.outputs) == 1:
            t = x.inputs[0].inputs[0]
            continue
        break
    if not chain:
        return f"no Gemm/MatMul layer with constant weights produces '{logits.name}'"
    return chain, logits


def _dense_producing(t: gs.Tensor) -> Dense | None:
    if not t.inputs:
        return None
    node = t.inputs[0]
    if node.op == "Add" and len(node.inputs) == 2:
        for k in (0, 1):
            b = const_through_shape_ops(node.inputs[k])
            other = node.inputs[1 - k]
            if b is not None and other.inputs and other.inputs[0].op == "MatMul" and len(other.outputs) == 1:
                mm = other.inputs[0]
                w = const_through_shape_ops(mm.inputs[1])
                if w is not None and w.ndim == 2 and b.size == w.shape[1] and w.dtype.kind == "f":
                    return Dense(mm, (node, k), t)
        return None
    if node.op == "MatMul":
        w = const_through_shape_ops(node.inputs[1])
        if w is not None and w.ndim == 2 and w.dtype.kind == "f":
            return Dense(node, None, t)
        return None
    if node.op == "Gemm" and not node.attrs.get("transA", 0):
        w = const_through_shape_ops(node.inputs[1])
        if w is None or w.dtype.kind != "f":
            return None
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = const_through_shape_ops(node.inputs[2])
            n = w.shape[0] if node.attrs.get("transB", 0) else w.shape[1]
            if c is None or c.size not in (1, n):
                return None
            return Dense(node, (node, 2), t)
        return Dense(node, None, t)
    return None


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _forward(params, X):
    hs = [X]
    h = X
    for i, (w, b) in enumerate(params):
        z = h @ w + b
        h = np.maximum(z, 0) if i < len(params) - 1 else z
        hs.append(h)
    return hs


def _metrics(params, X, Tl, y, T, alpha) -> dict:
    z = _forward(params, X)[-1]
    q = _softmax(Tl / T)
    p = _softmax(z / T)
    kl = float(np.mean(np.sum(q * (np.log(np.maximum(q, 1e-12)) - np.log(np.maximum(p, 1e-12))), axis=1)))
    out = {"kl": kl, "agreement": float(np.mean(z.argmax(1) == Tl.argmax(1)))}
    loss = alpha * T * T * kl
    if y is not None:
        ps = _softmax(z)
        ce = float(-np.mean(np.log(np.maximum(ps[np.arange(len(y)), y], 1e-12))))
        loss += (1 - alpha) * ce
        out["accuracy"] = float(np.mean(z.argmax(1) == y))
    out["loss"] = loss
    return out


def _fit(params, start, X, Tl, y, T, alpha, *, steps, lr, batch, decay, rng, advance, biases):
    params = [(w.copy(), b.copy()) for w, b in params]
    m = [(np.zeros_like(w), np.zeros_like(b)) for w, b in params]
    v = [(np.zeros_like(w), np.zeros_like(b)) for w, b in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    n = X.shape[0]
    q_all = _softmax(Tl / T)
    for step in range(1, steps + 1):
        idx = rng.choice(n, size=min(batch, n), replace=False) if batch and batch < n else np.arange(n)
        hs = _forward(params, X[idx])
        z = hs[-1]
        grad = alpha * T * (_softmax(z / T) - q_all[idx])  # d(T²·KL)/dz
        if y is not None:
            onehot = np.zeros_like(z)
            onehot[np.arange(len(idx)), y[idx]] = 1.0
            grad = grad + (1 - alpha) * (_softmax(z) - onehot)
        grad /= len(idx)
        for i in range(len(params) - 1, -1, -1):
            w, b = params[i]
            gw = hs[i].T @ grad + decay * (w - start[i][0])
            gb = grad.sum(axis=0) if biases[i] else np.zeros_like(b)  # no bias to write back
            if i > 0:
                grad = (grad @ w.T) * (hs[i] > 0)
            for k, (p, g) in enumerate(((w, gw), (b, gb))):
                mk, vk = m[i][k], v[i][k]
                mk *= b1
                mk += (1 - b1) * g
                vk *= b2
                vk += (1 - b2) * g * g
                p -= lr * (mk / (1 - b1 ** step)) / (np.sqrt(vk / (1 - b2 ** step)) + eps)
        advance(1)
    return params
