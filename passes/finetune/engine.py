"""``finetune`` end to end, the torch side: samples and the teacher's targets, the
student module and its check against onnxruntime, training, writing back and the
second check. Imported only when the pass runs (torch is an optional extra).
"""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import torch

from onnxopt.activations import capture
from onnxopt.channels import channel_maps
from onnxopt.errors import CalibrationError, OutOfTime, PassFailed, UsageError
from onnxopt.framework import PassContext, PassResult
from onnxopt.labels import read_labels
from onnxopt.model import Model
from onnxopt.shapes import infer_shapes
from onnxopt.validate import thread_cap

from . import data_parallel, train
from .loss import Term, choose_terms, logit_tensors, teacher_target
from .module import GraphModule, OpFailed, Unsupported
from .params import plan_training, restore, write_back
from .verify import MIN_COSINE, disagreement, to_torch

__all__ = ["finetune"]

log = logging.getLogger(__name__)

_CHECK_SAMPLES = 2


def _split(n: int, share: float, rng: np.random.Generator, name: str) -> tuple[list[int], list[int]]:
    if share <= 0:
        return list(range(n)), []
    n_hold = int(share * n + 0.5)
    if n_hold < 1 or n_hold >= n:
        least = next(k for k in range(2, 10_000) if 1 <= int(share * k + 0.5) < k)
        raise CalibrationError(
            f"{name}: {n} calibration sample(s) are too few to hold any out at holdout={share:g}; "
            f"give at least {least} samples, or holdout=0")
    order = rng.permutation(n)
    return sorted(int(i) for i in order[n_hold:]), sorted(int(i) for i in order[:n_hold])


def _hint_terms(specs: list[str], student: Model, teacher: Model, name: str) -> list[Term]:
    s_names = {t.name for n in student.graph.nodes for t in n.outputs}
    t_names = {t.name for n in teacher.graph.nodes for t in n.outputs}
    kept = _ChannelMaps(student, teacher) if specs else None
    terms = []
    for spec in specs:
        tensor, sep, raw = spec.rpartition("=")
        weight = 1.0
        if sep:
            try:
                weight = float(raw)
            except ValueError:
                tensor = spec
        else:
            tensor = spec
        if tensor not in s_names or tensor not in t_names:
            where = "student" if tensor not in s_names else "teacher"
            raise UsageError(f"{name}: hint '{tensor}' is not a tensor of the {where}'s main graph")
        channels = kept.of(tensor)
        terms.append(Term(tensor, tensor, "hint", weight=weight,
                          channels=None if channels is None else np.asarray(channels, np.int64)))
    return terms


class _ChannelMaps:
    """The teacher channels a student tensor holds (axis 1): its own channel map, that
    of the layer output it comes from through per-channel ops (activations,
    normalization, resizing, residual Adds), or for a Concat the maps of its inputs
    placed at the teacher's offsets; None where no channel was removed."""

    _LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

    def __init__(self, student: Model, teacher: Model):
        self.maps = channel_maps(student)
        self.producer = {t.name: n for n in student.graph.nodes for t in n.outputs}
        self.teacher = infer_shapes(teacher) if self.maps else {}

    def of(self, tensor: str, depth: int = 0) -> list[int] | None:
        if not self.maps or depth > 8:
            return None
        for _ in range(32):
            if tensor in self.maps:
                return self.maps[tensor]
            node = self.producer.get(tensor)
            if node is None or not node.inputs or node.op in self._LAYERS:
                return None
            if node.op == "Concat" and int(node.attrs.get("axis", 0)) == 1:
                return self._concat(node, depth)
            tensor = node.inputs[0].name
        return None

    def _concat(self, node, depth: int) -> list[int] | None:
        out, offset, changed = [], 0, False
        for x in node.inputs:
            info = self.teacher.get(x.name)
            width = info.shape[1] if info is not None and info.shape and len(info.shape) > 1 else None
            if not isinstance(width, int):
                return None
            part = self.of(x.name, depth + 1)
            changed |= part is not None
            out += [offset + int(i) for i in (part if part is not None else range(width))]
            offset += width
        return out if changed else None


def _check_hints(module: GraphModule, terms: list[Term], feeds: dict, teacher: dict, name: str) -> None:
    hints = [t for t in terms if t.kind == "hint"]
    if not hints:
        return
    with torch.no_grad():
        got = module(to_torch(feeds), [t.student for t in hints])
    for term, value in zip(hints, got):
        want = teacher_target(term, teacher[term.output], 1.0).shape
        if tuple(value.shape) != tuple(want):
            raise UsageError(f"{name}: hint '{term.output}' has shape {list(value.shape)} in the student and "
                             f"{list(want)} in the teacher (no channel map relates them)")


def _teacher(teacher: Model, samples: list[dict], hints: list[str], provider: str,
             outputs: list[str], name: str) -> list[dict[str, np.ndarray]]:
    missing = [o for o in outputs if o not in {t.name for t in teacher.graph.outputs}]
    if missing:
        raise UsageError(f"{name}: the teacher (the model as loaded) has no output {missing[0]!r}")
    return list(capture(teacher, hints, samples, provider=provider, include_outputs=True))


def _labels(path: str, terms: list[Term], teacher_out: list[dict], name: str) -> list[np.ndarray | None]:
    kd = [t for t in terms if t.kind == "kd"]
    if not kd:
        raise CalibrationError(f"{name}: labels were given but no output is distilled as a classifier "
                               "(loss=kd, or an output computed by Softmax or a dense layer)")
    out = kd[0].output
    rows = [int(np.prod(v[out].shape[:-1])) for v in teacher_out]
    classes = int(teacher_out[0][out].shape[-1])
    y = read_labels(path, sum(rows), classes, what=name)
    starts = np.cumsum([0] + rows)
    return [y[a:b] for a, b in zip(starts[:-1], starts[1:])]


def _batchable(module: GraphModule, samples: list[dict], pair: list[dict]) -> bool:
    """Whether every sample has the same shapes past the first axis and two of them
    concatenated along it give their outputs concatenated."""
    if len(pair) < 2:
        return False
    first = samples[0]
    if any(set(s) != set(first) or any(np.shape(s[k])[1:] != np.shape(first[k])[1:] for k in first)
           for s in samples):
        return False
    try:
        with torch.no_grad():
            one = [module(to_torch(s)) for s in pair]
            both = module({k: torch.cat([to_torch(s)[k] for s in pair]) for k in first})
    except (OpFailed, RuntimeError):
        return False
    for j, value in enumerate(both):
        parts = [o[j] for o in one]
        if value.dim() == 0 or any(p.dim() == 0 for p in parts) or value.shape[0] != sum(p.shape[0] for p in parts):
            return False
        joined = torch.cat(parts).double().reshape(-1)
        v = value.double().reshape(-1)
        if v.is_floating_point():
            denom = float(torch.linalg.vector_norm(v) * torch.linalg.vector_norm(joined)) or 1.0
            if float(v @ joined) / denom < MIN_COSINE and not torch.equal(v, joined):
                return False
        elif not torch.equal(v, joined):
            return False
    return True


def _samples(idx: list[int], samples, teacher_out, terms, temperature, labels) -> train.Samples:
    feeds = [to_torch(samples[i]) for i in idx]
    targets = [[torch.from_numpy(teacher_target(t, teacher_out[i][t.output], temperature)) for t in terms]
               for i in idx]
    outputs = [teacher_out[i] for i in idx]
    lab = [torch.from_numpy(labels[i]) for i in idx] if labels is not None else []
    return train.Samples(feeds, targets, outputs, lab)


def finetune(model: Model, ctx: PassContext, opts, name: str) -> PassResult:
    """Run the pass (see the package docstring); ``opts`` are the pass's options."""
    threads = torch.get_num_threads()
    wanted = opts.threads or thread_cap()  # a task given one CPU trains on one thread
    if wanted:
        torch.set_num_threads(wanted)
    try:
        return _finetune(model, ctx, opts, name)
    finally:
        torch.set_num_threads(threads)


def _finetune(model: Model, ctx: PassContext, opts, name: str) -> PassResult:
    started = time.perf_counter()
    teacher = ctx.reference
    if teacher is None:
        raise UsageError(f"pass '{name}' needs the original model as teacher (PassContext.reference)")
    calibration = ctx.require_calibration(name)
    seed = ctx.seed if opts.seed is None else opts.seed
    rng = np.random.default_rng(seed)
    samples = [dict(s) for s in itertools.islice(iter(calibration), opts.samples or None)]
    train_idx, hold_idx = _split(len(samples), opts.holdout, rng, name)

    plan = plan_training(model, opts.include, opts.exclude)
    stats: dict = {"trained": plan.figures()}
    if not any(leaf.trainable for leaf in plan.leaves):
        stats["skipped"] = "no trainable float weights"
        return PassResult(False, stats)
    hints = _hint_terms(opts.hints, model, teacher, name)
    keep = logit_tensors(model) + [h.student for h in hints]
    try:  # first: an op the table cannot express is the user's first problem to hear of
        module = GraphModule(model, plan, keep=keep)
    except Unsupported as exc:
        raise UsageError(f"{name}: cannot express the model in torch: {exc}") from None
    provider = ctx.providers[0] if ctx.providers else "cpu"
    outputs = [t.name for t in model.graph.outputs]
    teacher_out = _teacher(teacher, samples, [h.output for h in hints], provider, outputs, name)
    terms = choose_terms(model, opts.loss, teacher_out[0]) + hints
    if not [t for t in terms if t.kind != "hint"] and not hints:
        stats["skipped"] = "no float outputs to reproduce"
        return PassResult(False, stats)
    labels = _labels(opts.labels, terms, teacher_out, name) if opts.labels else None
    check = disagreement(module, model, samples[:_CHECK_SAMPLES], provider)
    if check:
        raise PassFailed(name, f"the converted student disagrees with onnxruntime: {check}")
    _check_hints(module, terms, samples[0], teacher_out[0], name)
    batched = _batchable(module, samples, [samples[i] for i in train_idx[:2]])
    alpha = opts.alpha if labels is not None else 1.0
    settings = train.Settings(steps=opts.steps, lr=opts.lr, batch=opts.batch, temperature=opts.temperature,
                              alpha=alpha, patience=opts.patience, batched=batched, seed=seed,
                              weight_decay=opts.weight_decay, deadline=ctx.deadline,
                              eval_every=opts.eval_every or max(1, opts.steps // 20))
    train_set = _samples(train_idx, samples, teacher_out, terms, opts.temperature, labels)
    hold_set = _samples(hold_idx or train_idx, samples, teacher_out, terms, opts.temperature, labels)
    batch = min(opts.batch, len(train_idx)) if opts.batch else len(train_idx)
    stats.update(workers=opts.workers, worker_batch=-(-batch // opts.workers))
    with ctx.progress.task(f"{name}: training", total=opts.steps) as advance:
        if opts.workers > 1:
            options = {"include": opts.include, "exclude": opts.exclude, "keep": keep, "threads": opts.threads}
            outcome, ray_seconds = data_parallel.run(model, plan, options, terms, train_set, hold_set, settings,
                                                     opts.workers, name)
            stats["ray_seconds"] = round(ray_seconds, 3)
            module.set_leaf_values(outcome.values)
            advance(outcome.steps_run)
        else:
            try:
                outcome = train.run(module, terms, train_set, hold_set, settings, advance)
            except train.DeadlineReached as exc:
                raise OutOfTime(name, f"not finished by its deadline: {exc}") from None

    stats.update(_figures(outcome, terms, len(samples), len(train_idx), len(hold_idx), batched, alpha,
                          labels is not None))
    if not outcome.best_step:
        stats["kept"] = False
        log.info("%s: holdout fidelity did not improve; weights left alone", name)
        stats["seconds"] = round(time.perf_counter() - started, 3)
        return PassResult(False, stats)
    undo = write_back(plan, outcome.values)
    after = disagreement(module, model, samples[:_CHECK_SAMPLES], provider)
    if after:
        restore(undo)
        raise PassFailed(name, f"onnxruntime on the written model does not reproduce the trained student: {after}")
    stats["kept"] = True
    stats["tensors_written"] = len(undo)
    stats["seconds"] = round(time.perf_counter() - started, 3)
    return PassResult(bool(undo), stats)


def _figures(outcome: train.Outcome, terms: list[Term], n: int, n_train: int, n_hold: int, batched: bool,
             alpha: float, labels: bool) -> dict:
    out = {
        "samples": n, "train_samples": n_train, "holdout_samples": n_hold, "batched": batched,
        "labels": labels, "alpha": alpha,
        "losses": {t.output: t.kind for t in terms},
        "steps_run": outcome.steps_run, "best_step": outcome.best_step, "stopped_early": outcome.stopped_early,
        "loss_before": round(outcome.before["loss"], 6), "loss_after": round(outcome.after["loss"], 6),
        "fidelity_before": round(outcome.before["fidelity"], 6),
        "fidelity_after": round(outcome.after["fidelity"], 6),
        "outputs": {k: {"before": {m: round(x, 6) for m, x in v.items()},
                        "after": {m: round(x, 6) for m, x in outcome.after["outputs"][k].items()}}
                    for k, v in outcome.before["outputs"].items()},
        "train_seconds": round(outcome.seconds, 3),
        "train_cpu_seconds": round(outcome.cpu_seconds, 3),
        "seconds_per_step": round(outcome.seconds / max(outcome.steps_run, 1), 4),
        "step_seconds": round(outcome.step_seconds, 4),
        "history": outcome.history,
    }
    return out
