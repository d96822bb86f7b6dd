"""The loss ``finetune`` minimises: one term per float graph output, plus hint terms.

* ``kd`` (classifier-like outputs): L = (1 − α)·CE(labels, student) + α·T²·KL(softmax(teacher/T)
  ‖ softmax(student/T)) over the rows of the class axis (Hinton et al. 2015); α is 1
  without labels. An output computed by a Softmax is distilled from the Softmax's input
  (the student's logits) against the logarithm of the teacher's probabilities, which are
  its logits up to a constant per row that softmax ignores; a LogSoftmax output is
  logits already.
* ``mse``: mean squared error divided by the mean square of the teacher's values, so
  that terms of different scales weigh alike (detection maps, boxes, states).
* ``cosine``: 1 − cosine per sample (embeddings and sequences of vectors, whose
  direction is what a consumer reads).
* hints: the relative MSE of named intermediate tensors; a hint tensor whose channels a
  structured pruning pass removed is compared with the teacher's channels it kept (the
  channel map the pass recorded).

``auto`` picks kd for an output computed by Softmax/LogSoftmax, or by a dense layer
(Gemm, MatMul, MatMul + bias Add) into ``[N, classes]``; cosine for other outputs of rank
2 or 3 with more than one value per sample; mse for the rest (one value per sample, a
probability or a score, included).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import torch

from onnxopt.model import Model

__all__ = ["Term", "choose_terms", "logit_tensors", "term_loss", "teacher_target", "fidelity"]

_DENSE = ("Gemm", "MatMul")


@dataclass
class Term:
    """One loss term: the student tensor ``student`` against the teacher's ``teacher``."""

    output: str  # the graph output or hint it is about (teacher tensor name)
    student: str  # student tensor read (logits before a Softmax, or ``output`` itself)
    kind: str  # kd | mse | cosine | hint
    weight: float = 1.0
    form: str = "logits"  # kd: what the output holds: logits, probs (Softmax) or logprobs (LogSoftmax)
    channels: np.ndarray | None = None  # hint: teacher channels (axis 1) the student kept


def _producer(t: gs.Tensor) -> gs.Node | None:
    while t.inputs and t.inputs[0].op == "Identity":
        t = t.inputs[0].inputs[0]
    return t.inputs[0] if t.inputs else None


def _dense_head(node: gs.Node | None) -> bool:
    if node is None:
        return False
    if node.op in _DENSE:
        return True
    return node.op == "Add" and any(x.inputs and x.inputs[0].op in _DENSE for x in node.inputs)


def logit_tensors(model: Model) -> list[str]:
    """Inputs of the Softmax/LogSoftmax nodes that compute graph outputs: the student
    tensors a kd term may read."""
    found = []
    for t in model.graph.outputs:
        node = _producer(t)
        if node is not None and node.op in ("Softmax", "LogSoftmax") and node.inputs:
            found.append(node.inputs[0].name)
    return found


def choose_terms(model: Model, loss: str, samples: dict[str, np.ndarray]) -> list[Term]:
    """A term per float graph output of ``model`` (``samples``: one teacher value per
    output name, for ranks and dtypes)."""
    opset = int(model.opset_imports.get("", 13))
    terms = []
    for t in model.graph.outputs:
        value = samples.get(t.name)
        if value is None or np.asarray(value).dtype.kind != "f":
            continue
        rank = np.asarray(value).ndim
        node = _producer(t)
        softmax = node is not None and node.op in ("Softmax", "LogSoftmax") and _last_axis(node, rank, opset)
        kind = loss
        if loss == "auto":
            if softmax or (_dense_head(node) and rank == 2 and value.shape[-1] >= 2):
                kind = "kd"
            else:
                # a cosine of a single value per sample is only its sign: such outputs
                # (a probability, a score) are matched by value
                kind = "cosine" if rank in (2, 3) and int(np.prod(value.shape[1:])) > 1 else "mse"
        student, form = t.name, "logits"
        if kind == "kd" and softmax:
            student = node.inputs[0].name
            form = "probs" if node.op == "Softmax" else "logprobs"
        terms.append(Term(t.name, student, kind, form=form))
    return terms


def _last_axis(node: gs.Node, rank: int, opset: int) -> bool:
    axis = int(node.attrs.get("axis", -1 if opset >= 13 else 1))
    return axis in (-1, rank - 1)


def teacher_target(term: Term, value: np.ndarray, temperature: float) -> np.ndarray:
    """What a term compares the student with, computed once per sample: softened
    probabilities for kd, the value itself otherwise."""
    value = np.asarray(value, np.float32)
    if term.channels is not None:
        value = np.take(value, term.channels, axis=1)
    if term.kind != "kd":
        return value
    logits = np.log(np.maximum(value, 1e-12)) if term.form == "probs" else value.astype(np.float64)
    return _softmax(logits / temperature).astype(np.float32)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def term_loss(term: Term, s: torch.Tensor, t: torch.Tensor, *, temperature: float, alpha: float,
              labels: torch.Tensor | None = None) -> torch.Tensor:
    """The term's loss for a batch (student ``s``, prepared teacher target ``t``)."""
    if term.kind == "kd":
        classes = s.shape[-1]
        rows_s = s.reshape(-1, classes)
        q = t.reshape(-1, classes)
        log_p = torch.log_softmax(rows_s / temperature, dim=-1)
        kl = (q * (torch.log(q.clamp_min(1e-12)) - log_p)).sum(-1).mean()
        loss = alpha * temperature * temperature * kl
        if labels is not None and alpha < 1.0:
            loss = loss + (1.0 - alpha) * torch.nn.functional.cross_entropy(rows_s, labels.reshape(-1))
        return loss
    if term.kind == "cosine":
        a, b = s.reshape(s.shape[0], -1) if s.dim() > 1 else s.reshape(1, -1), \
            t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
        return (1.0 - torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)).mean()
    return ((s - t) ** 2).mean() / (t * t).mean().clamp_min(1e-12)


def fidelity(s: np.ndarray, t: np.ndarray, form: str | None) -> tuple[float, float | None]:
    """(cosine, top-1 agreement) of one sample's output. Classifier outputs (``form``
    given) are compared as probabilities: distillation leaves a constant per row of the
    logits free, which a cosine of logits would count against it."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    agree = None
    if form is not None:
        agree = float(np.mean(s.argmax(-1) == t.argmax(-1)))
        if form == "logits":
            s, t = _softmax(s), _softmax(t)
        elif form == "logprobs":
            s, t = np.exp(s), np.exp(t)
    a, b = s.ravel(), t.ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = 1.0 if na == 0 and nb == 0 else (0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb)))
    return cos, agree
