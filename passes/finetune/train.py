"""The training loop of ``finetune``: Adam (AdamW's decoupled weight decay on the layers'
weights when asked) on the student's leaves, the teacher's targets
computed once, holdout fidelity measured as it goes, early stopping, the best state kept.

Each step draws ``batch`` training samples (a fresh seeded permutation per epoch, so the
same seed and data give the same steps) and either concatenates them along the first
axis — when the model was found to batch that way — or runs them one by one and adds up
their gradients. The learning rate warms up linearly over the first 5 % of the steps,
then follows a cosine from ``lr`` down to 5 % of it.
Every ``eval_every`` steps the holdout samples are run without gradients: the loss, the
cosine of every output to the teacher's (per sample, or over all samples together for an
output of one value per sample) and, for classifier outputs, top-1 agreement. The
state with the best holdout fidelity (mean cosine over outputs) is what is returned —
the model as it came in when nothing beat it — and ``patience`` evaluations without
improvement end the run.

Data-parallel (:class:`Shard`, one per process of a ``torch.distributed`` group): every
process draws the same global batch from the same seeded order, runs its share of it,
and the gradients — each scaled by its share of the global batch — are summed over the
processes before the step, so every process takes the step one process would have
taken, up to the order of float additions. The holdout is evaluated whole by every
process, so they all keep the same best state and stop at the same step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .loss import Term, fidelity, term_loss
from .module import GraphModule

__all__ = ["Samples", "Settings", "Outcome", "Shard", "run"]

_LR_FLOOR = 0.05


@dataclass
class Samples:
    """Calibration samples as torch tensors, with the teacher's side of each term."""

    feeds: list[dict[str, torch.Tensor]]
    targets: list[list[torch.Tensor]]  # per sample, per term: the prepared teacher target
    outputs: list[dict[str, np.ndarray]]  # per sample: the teacher's graph outputs (fidelity)
    labels: list[torch.Tensor | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.feeds)


@dataclass
class Settings:
    steps: int
    lr: float
    batch: int
    temperature: float
    alpha: float
    patience: int
    eval_every: int
    batched: bool
    seed: int
    weight_decay: float = 0.0
    deadline: float | None = None  # wall-clock time (time.time()) training must end by


class DeadlineReached(Exception):
    """Training reached its deadline after ``done`` of ``steps`` steps."""

    def __init__(self, done: int, steps: int):
        super().__init__(f"{done} of {steps} steps run")
        self.done, self.steps = done, steps


@dataclass
class Outcome:
    values: list[np.ndarray]  # leaf values of the best state
    before: dict
    after: dict
    best_step: int
    steps_run: int
    stopped_early: bool
    seconds: float
    cpu_seconds: float  # processor time of the run (all threads): robust to a busy machine
    step_seconds: float  # mean wall time of a training step alone
    history: dict


@dataclass
class Shard:
    """This process's place among ``size`` data-parallel ones (``torch.distributed``
    initialised): it runs every ``size``-th sample of each global batch from ``rank`` on."""

    rank: int
    size: int

    def take(self, picked: list[int]) -> list[int]:
        return picked[self.rank::self.size]

    def sum_gradients(self, params: Sequence[torch.Tensor], total: float) -> float:
        """Sum the gradients of ``params`` and the step's loss ``total`` over the
        processes, in one all-reduce. A parameter no process computed a gradient for keeps
        none (the optimizer leaves it alone, as one process would), so every process
        ends the step with the same state."""
        import torch.distributed as dist

        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double() for p in params]
        had = [float(p.grad is not None) for p in params]
        flat = torch.cat(parts + [torch.tensor(had + [total], dtype=torch.float64)])
        dist.all_reduce(flat)
        offset, counts = 0, flat[-len(params) - 1:-1]
        for p, count in zip(params, counts):
            grad = flat[offset:offset + p.numel()].view(p.shape).to(p.dtype)
            p.grad = grad if float(count) > 0 else None
            offset += p.numel()
        return float(flat[-1])


def _concat(values: Sequence[torch.Tensor]) -> torch.Tensor:
    return values[0] if len(values) == 1 else torch.cat(list(values), 0)


def _groups(indices: Sequence[int], size: int, batched: bool) -> list[list[int]]:
    if not batched:
        return [[i] for i in indices]
    return [list(indices[k:k + size]) for k in range(0, len(indices), size)]


def _forward_loss(module: GraphModule, terms: list[Term], data: Samples, group: list[int],
                  s: Settings, want: list[str], weights: list[torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    feeds = {k: _concat([data.feeds[i][k] for i in group]) for k in module.input_names}
    outs = module(feeds, want, weights=weights)
    loss = torch.zeros(())
    for j, term in enumerate(terms):
        target = _concat([data.targets[i][j] for i in group])
        labels = None
        if term.kind == "kd" and data.labels and data.labels[group[0]] is not None:
            labels = _concat([data.labels[i] for i in group])
        value = term_loss(term, outs[want.index(term.student)], target, temperature=s.temperature,
                          alpha=s.alpha, labels=labels)
        loss = loss + term.weight * value
    return loss, outs


def _backward(module: GraphModule, terms: list[Term], data: Samples, groups: list[list[int]], n: int,
              s: Settings, want: list[str]) -> float:
    """The step's loss over ``groups`` (``n`` samples in all), its gradient in the leaves.

    Several groups (samples that do not stack) run on one build of the weights: each
    group's backward stops at the built weights, and their summed gradient goes into the
    leaves in one backward at the end (one codebook gather and scatter per step, not one
    per sample)."""
    if len(groups) == 1:
        loss, _ = _forward_loss(module, terms, data, groups[0], s, want)
        (loss * (len(groups[0]) / n)).backward()
        return float(loss.detach()) * len(groups[0]) / n
    built = module.weights()
    cut = [w.detach().requires_grad_(w.requires_grad) for w in built]
    total = 0.0
    for group in groups:
        loss, _ = _forward_loss(module, terms, data, group, s, want, weights=cut)
        loss = loss * (len(group) / n)
        loss.backward()
        total += float(loss.detach())
    pairs = [(w, c.grad) for w, c in zip(built, cut) if w.requires_grad and c.grad is not None]
    if pairs:
        torch.autograd.backward([w for w, _ in pairs], [g for _, g in pairs])
    return total


def evaluate(module: GraphModule, terms: list[Term], data: Samples, s: Settings) -> dict:
    """Loss and fidelity of the student on ``data`` (no gradients)."""
    want = list(dict.fromkeys([t.student for t in terms] + module.output_names))
    kd = {t.output: t.form for t in terms if t.kind == "kd"}
    losses, pairs = [], {t.output: [] for t in terms if t.kind != "hint"}
    with torch.no_grad():
        for group in _groups(range(len(data)), max(s.batch, 1), s.batched):
            loss, outs = _forward_loss(module, terms, data, group, s, want)
            losses.append(float(loss) * len(group))
            for name in pairs:
                value = outs[want.index(name)].numpy()
                start = 0
                for i in group:
                    ref = data.outputs[i][name]
                    rows = ref.shape[0] if s.batched and len(group) > 1 else None
                    pairs[name].append((value[start:start + rows] if rows is not None else value, ref))
                    start += rows or 0
    outputs = {n: _output_fidelity(v, kd.get(n)) for n, v in pairs.items()}
    return {"loss": float(np.sum(losses) / max(len(data), 1)),
            "fidelity": float(np.mean([o["cosine"] for o in outputs.values()])) if outputs else 1.0,
            "outputs": outputs}


def _output_fidelity(pairs: list[tuple[np.ndarray, np.ndarray]], form: str | None) -> dict:
    """Mean cosine (and top-1 agreement for a classifier) of one output over the samples.
    An output of one value per sample (a probability, a score) is compared as one vector
    over all samples: the cosine of a single value is only its sign."""
    if form is None and all(np.size(ref) == 1 for _, ref in pairs):
        mine = np.concatenate([np.ravel(m) for m, _ in pairs])
        ref = np.concatenate([np.ravel(r) for _, r in pairs])
        return {"cosine": fidelity(mine, ref, None)[0]}
    scores = [fidelity(mine, ref, form) for mine, ref in pairs]
    out = {"cosine": float(np.mean([c for c, _ in scores]))}
    if form is not None:
        out["agreement"] = float(np.mean([a for _, a in scores]))
    return out


def _rate(lr: float, step: int, steps: int) -> float:
    """Linear warm-up over the first 5 % of the steps (Adam's first updates are as large
    as the rate whatever the gradient: a model that is already close would be thrown
    off), then a cosine down to :data:`_LR_FLOOR` of ``lr``."""
    warm = max(1, steps // 20)
    if step <= warm:
        return lr * step / warm
    return lr * (_LR_FLOOR + (1 - _LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(steps - warm, 1))))


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def run(module: GraphModule, terms: list[Term], train: Samples, hold: Samples, s: Settings,
        advance: Callable[..., None], shard: Shard | None = None) -> Outcome:
    """Train ``module``'s leaves; return the best state and the figures. With ``shard``,
    this process runs its share of every batch and the gradients are summed over all."""
    pairs = list(zip(module.leaf_params, module.plan.leaves))
    for p, leaf in pairs:
        p.requires_grad_(bool(leaf.trainable))
    groups = [{"params": [p for p, leaf in pairs if leaf.trainable and leaf.weight], "weight_decay": s.weight_decay},
              {"params": [p for p, leaf in pairs if leaf.trainable and not leaf.weight], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=s.lr)
    trained = [p for p, leaf in pairs if leaf.trainable]
    rng = np.random.default_rng(s.seed)
    want = list(dict.fromkeys(t.student for t in terms))
    batch = min(max(s.batch, 1), len(train)) if s.batch else len(train)
    before = evaluate(module, terms, hold, s)
    best, best_values, best_step, bad = before["fidelity"], module.leaf_values(), 0, 0
    history = {"step": [], "loss": [], "holdout": [_round(before["fidelity"])], "holdout_step": [0]}
    order, cursor = rng.permutation(len(train)), 0
    started, cpu, step_time, step = time.perf_counter(), time.process_time(), 0.0, 0
    stopped = False
    for step in range(1, s.steps + 1):
        if s.deadline is not None and time.time() >= s.deadline:
            raise DeadlineReached(step - 1, s.steps)
        t0 = time.perf_counter()
        for g in optimizer.param_groups:
            g["lr"] = _rate(s.lr, step, s.steps)
        if cursor + batch > len(train):
            order, cursor = rng.permutation(len(train)), 0
        picked = [int(i) for i in order[cursor:cursor + batch]]
        cursor += batch
        optimizer.zero_grad(set_to_none=True)
        total = _backward(module, terms, train, _groups(shard.take(picked) if shard else picked, batch, s.batched),
                          len(picked), s, want)
        if shard:
            total = shard.sum_gradients(trained, total)
        optimizer.step()
        step_time += time.perf_counter() - t0
        history["step"].append(step)
        history["loss"].append(_round(total))
        note = f"loss {total:.4g}"
        if step % s.eval_every == 0 or step == s.steps:
            metrics = evaluate(module, terms, hold, s)
            history["holdout"].append(_round(metrics["fidelity"]))
            history["holdout_step"].append(step)
            if metrics["fidelity"] > best + 1e-7:
                best, best_values, best_step, bad = metrics["fidelity"], module.leaf_values(), step, 0
            else:
                bad += 1
            note += f" holdout {metrics['fidelity']:.4f}"
            if s.patience and bad >= s.patience:
                stopped = True
        advance(1, note=note)
        if stopped:
            break
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    module.set_leaf_values(best_values)
    after = evaluate(module, terms, hold, s) if best_step else before
    return Outcome(best_values, before, after, best_step, step, stopped, seconds, cpu,
                   step_time / max(step, 1), history)
