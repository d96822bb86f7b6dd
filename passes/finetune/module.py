"""The ONNX graph as a torch module: the student that ``finetune`` trains.

Why not onnx2torch or onnx2pytorch: both were read (onnx2torch 1.5.15, onnx2pytorch
0.6.0) and neither fits the job. Both import torchvision when they are imported, and the
torchvision wheels on PyPI need another torch than the CPU build this project installs
(importing it beside torch 2.13.0 fails); both expect weights to be initializers, so they
stop at models that keep them in Constant nodes, behind the compact storage's decoders or
behind DequantizeLinear; both copy weights into ``nn.Conv2d``/``nn.Linear`` modules (a
transposed, alpha-scaled copy for Gemm; onnx2pytorch keeps a second, unused copy), so a
trained value has to be mapped back through layout changes; onnx2torch lacks If, LSTM and
Size, which silero-vad needs. What training needs is small and different: run the graph
as it is, read each trained tensor straight from a parameter in its ONNX layout, and
tell which node first disagrees with onnxruntime. So the graph is *interpreted*: every
node becomes one call into a small op table (:mod:`.ops_tensor`, :mod:`.ops_layers`)
with ONNX's semantics, If runs the branch its condition picks, and autodiff is torch's.

The map from trained tensors back to the model is explicit and needs no layout changes:
parameter ``k`` is leaf ``k`` of the :class:`~.params.TrainPlan` — a stored constant,
element for element — and each trained tensor the graph reads is built from its leaves
at the start of every forward (itself; a gather from the compact storage's leaves; the
straight-through quantization of a Q/DQ weight). Everything else constant (weights that
do not train, decoded compact weights that do not train, shapes) is a fixed tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs
import torch

from onnxopt.graph import const_value, implicit_inputs
from onnxopt.graph_extras import node_subgraphs
from onnxopt.model import Model

from . import ops_layers  # noqa: F401  (registers the layer ops)
from .ops_layers import fake_quantize
from .ops_tensor import OPS
from .params import TrainPlan

__all__ = ["GraphModule", "Unsupported", "OpFailed"]


class Unsupported(Exception):
    """A node the op table cannot express; the message names it."""

    def __init__(self, node: gs.Node | None, why: str, *, name: str = ""):
        where = f"node '{node.name or node.outputs[0].name}' ({_op_name(node)})" if node is not None else name
        super().__init__(f"{where}: {why}")
        self.node = node


class OpFailed(Exception):
    """A node raised while running in torch; ``node`` says which."""

    def __init__(self, node: gs.Node, exc: BaseException):
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        super().__init__(f"node '{node.name or node.outputs[0].name}' ({_op_name(node)}): {text[:200]}")
        self.node = node


def _op_name(node: gs.Node) -> str:
    return node.op if node.domain in (None, "", "ai.onnx") else f"{node.domain}.{node.op}"


def _torch(value: np.ndarray) -> torch.Tensor:
    value = np.asarray(value)
    if value.dtype.kind not in "biuf":
        raise TypeError(f"dtype {value.dtype}")
    return torch.from_numpy(np.array(value, copy=True))


class _Step:
    __slots__ = ("fn", "ins", "outs", "node", "control")

    def __init__(self, fn, ins, outs, node, control=False):
        self.fn, self.ins, self.outs, self.node, self.control = fn, ins, outs, node, control


class GraphModule(torch.nn.Module):
    """Interprets ``model``'s graph in torch, with the leaves of ``plan`` as parameters.

    ``keep`` names top-graph tensors (hint tensors, logits before a Softmax) that
    :meth:`forward` may be asked for besides the graph outputs. Raises
    :class:`Unsupported` for a node the op table cannot express.
    """

    def __init__(self, model: Model, plan: TrainPlan, keep: Sequence[str] = ()):
        super().__init__()
        self.opset = int(model.opset_imports.get("", model.graph.opset or 13))
        self.plan = plan
        self.leaf_params = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.from_numpy(leaf.value.astype(np.float32).copy())) for leaf in plan.leaves])
        for p, leaf in zip(self.leaf_params, plan.leaves):
            if leaf.frozen.any():
                keep_mask = torch.from_numpy((~leaf.frozen).astype(np.float32))
                p.register_hook(lambda g, m=keep_mask: g * m)
        self._slots: dict[int, int] = {}
        self._base: list = []
        self._derived: list[tuple[list[int], object]] = []
        self._provided: set[int] = set()
        graph = model.graph
        self.input_names = [t.name for t in graph.inputs if not isinstance(t, gs.Constant)]
        self._inputs = [self._slot(t) for t in graph.inputs if not isinstance(t, gs.Constant)]
        self._provided.update(id(t) for t in graph.inputs if not isinstance(t, gs.Constant))
        self._bind_sites()
        self._weight_slots = [slot for slots, _ in self._derived for slot in slots]
        self._names = {t.name: t for t in graph.inputs}
        for node in graph.nodes:
            for t in node.outputs:
                self._names[t.name] = t
        self.output_names = [t.name for t in graph.outputs]
        wanted = list(graph.outputs) + [self._names[n] for n in keep if n in self._names]
        self._program = self._compile(graph, wanted)
        self._wanted = {t.name: self._slot(t) for t in wanted}

    # ---- building ---------------------------------------------------------------------

    def _slot(self, t: gs.Tensor) -> int:
        s = self._slots.get(id(t))
        if s is None:
            s = self._slots[id(t)] = len(self._base)
            self._base.append(None)
        return s

    def _bind_sites(self) -> None:
        params = self.leaf_params
        blocks: dict[tuple[int, ...], list] = {}
        for site in self.plan.sites:
            slot = self._slot(site.tensor)
            self._provided.add(id(site.tensor))
            if site.storage == "qdq":
                leaf = self.plan.leaves[site.leaves[0]]
                q = leaf.quant
                scale, zp = torch.from_numpy(q.scale.astype(np.float32)), torch.from_numpy(
                    q.zero_point.astype(np.float32))
                p = params[site.leaves[0]]
                self._derived.append(([slot], lambda p=p, s=scale, z=zp, q=q: [(
                    fake_quantize(p, s, z, q.qmin, q.qmax) - z) * s]))
            elif site.index is None:
                self._derived.append(([slot], lambda p=params[site.leaves[0]]: [p]))
            else:
                blocks.setdefault(tuple(site.leaves), []).append((slot, site))
        for leaves, members in blocks.items():
            self._derived.append(([slot for slot, _ in members], self._gather(leaves, [s for _, s in members])))
        trained = {id(s.tensor) for s in self.plan.sites}
        for key, value in self.plan.fixed.items():
            if key in trained:
                continue
            if key not in self._slots:
                self._slots[key] = len(self._base)
                self._base.append(None)
            self._base[self._slots[key]] = _torch(value)
            self._provided.add(key)

    def _gather(self, leaves: tuple[int, ...], sites: list):
        """The weights of one compact block, gathered from its leaves in one indexing (its
        gradient is one scatter-add into the leaves, not one per layer)."""
        zero = torch.zeros(1)
        index = torch.from_numpy(np.concatenate([s.index.ravel() for s in sites]).astype(np.int64))
        base = None
        if any(s.base is not None for s in sites):
            base = torch.from_numpy(np.concatenate([
                (s.base if s.base is not None else np.zeros(s.index.shape, np.float32)).ravel() for s in sites]))
        sizes = [int(s.index.size) for s in sites]
        shapes = [tuple(s.index.shape) for s in sites]

        def build():
            src = torch.cat([zero] + [self.leaf_params[k].reshape(-1) for k in leaves])
            w = src[index]
            if base is not None:
                w = w + base
            return [part.reshape(shape) for part, shape in zip(torch.split(w, sizes), shapes)]
        return build

    def _constant(self, t: gs.Tensor) -> bool:
        """Give ``t`` a fixed value if it is a constant not already provided."""
        if id(t) in self._provided:
            return True
        value = const_value(t, load=False)
        if value is None:
            return False
        try:
            self._base[self._slot(t)] = _torch(value)
        except TypeError as exc:
            raise Unsupported(None, f"no torch tensor of {exc}", name=f"constant '{t.name}'") from None
        self._provided.add(id(t))
        return True

    def _compile(self, graph: gs.Graph, wanted: list[gs.Tensor]) -> list[_Step]:
        producer = {id(t): n for n in graph.nodes for t in n.outputs}
        needed: set[int] = set()
        stack = list(wanted)
        seen: set[int] = set()
        while stack:
            t = stack.pop()
            if id(t) in seen:
                continue
            seen.add(id(t))
            if not (t.name or isinstance(t, gs.Constant)) or self._constant(t):
                continue
            node = producer.get(id(t))
            if node is None or id(node) in needed:
                continue
            needed.add(id(node))
            stack.extend(node.inputs)
            stack.extend(implicit_inputs(node))
        steps = []
        for node in _ordered(graph.nodes, needed):
            steps.append(self._step(node))
        return steps

    def _step(self, node: gs.Node) -> _Step:
        for t in node.inputs:
            if t.name or isinstance(t, gs.Constant):
                self._constant(t)
        ins = [self._slot(t) if (t.name or isinstance(t, gs.Constant)) else -1 for t in node.inputs]
        outs = [self._slot(t) if t.name else -1 for t in node.outputs]
        if node.domain not in (None, "", "ai.onnx"):
            raise Unsupported(node, "no torch form for a custom-domain op")
        if node.op == "If":
            return _Step(self._if(node), ins, outs, node, control=True)
        if node_subgraphs(node):
            raise Unsupported(node, "no torch form for this control-flow op")
        builder = OPS.get(node.op)
        if builder is None:
            raise Unsupported(node, "not in the op table")
        try:
            fn = builder(node, self.opset)
        except (NotImplementedError, KeyError, ValueError) as exc:
            raise Unsupported(node, str(exc) or "attributes not supported") from None
        return _Step(fn, ins, outs, node)

    def _if(self, node: gs.Node):
        branches = {}
        for key in ("then_branch", "else_branch"):
            g = node.attrs[key]
            for t in implicit_inputs(node):
                self._constant(t)
            branches[key] = (self._compile(g, list(g.outputs)), [self._slot(t) for t in g.outputs])

        def run(args, env):
            steps, outs = branches["then_branch" if bool(args[0].reshape(-1)[0]) else "else_branch"]
            self._run(steps, env)
            return tuple(env[s] for s in outs)
        return run

    # ---- running ----------------------------------------------------------------------

    def _run(self, steps: list[_Step], env: list) -> None:
        for step in steps:
            args = [env[i] if i >= 0 else None for i in step.ins]
            try:
                y = step.fn(args, env) if step.control else step.fn(args)
            except (Unsupported, OpFailed):
                raise
            except Exception as exc:
                raise OpFailed(step.node, exc) from exc
            if len(step.outs) == 1:
                env[step.outs[0]] = y[0] if isinstance(y, (tuple, list)) else y
            else:
                for slot, value in zip(step.outs, y):
                    if slot >= 0:
                        env[slot] = value

    def weights(self) -> list[torch.Tensor]:
        """The graph's trained tensors as built from the leaves (masks, codebooks and
        quantization grids applied), in the order :meth:`forward` takes them."""
        return [value for _, build in self._derived for value in build()]

    def forward(self, feeds: dict[str, torch.Tensor], want: Sequence[str] | None = None,
                record: bool = False, weights: Sequence[torch.Tensor] | None = None):
        """The tensors ``want`` (default: the graph outputs) for ``feeds``; with
        ``record`` also the whole environment by tensor name (top graph). ``weights``:
        what :meth:`weights` returned, to run several samples on one build of them."""
        env = list(self._base)
        for name, slot in zip(self.input_names, self._inputs):
            env[slot] = feeds[name]
        for slot, value in zip(self._weight_slots, self.weights() if weights is None else weights):
            env[slot] = value
        self._run(self._program, env)
        want = self.output_names if want is None else want
        out = [env[self._wanted[n]] for n in want]
        if not record:
            return out
        named = {name: env[self._slots[id(t)]] for name, t in self._names.items()
                 if id(t) in self._slots and env[self._slots[id(t)]] is not None}
        return out, named

    def steps(self) -> list[gs.Node]:
        """The top-graph nodes in the order they run."""
        return [s.node for s in self._program]

    def leaf_values(self) -> list[np.ndarray]:
        return [p.detach().numpy().copy() for p in self.leaf_params]

    def set_leaf_values(self, values: Sequence[np.ndarray]) -> None:
        with torch.no_grad():
            for p, value in zip(self.leaf_params, values):
                p.copy_(torch.from_numpy(value))


def _ordered(nodes: Sequence[gs.Node], needed: set[int]) -> list[gs.Node]:
    """The needed nodes, producers before consumers (stable), outer-scope reads included."""
    chosen = [n for n in nodes if id(n) in needed]
    producer = {id(t): i for i, n in enumerate(chosen) for t in n.outputs}
    deps = []
    for n in chosen:
        d = {producer[id(t)] for t in list(n.inputs) + implicit_inputs(n) if id(t) in producer}
        deps.append(d)
    done: set[int] = set()
    order: list[gs.Node] = []
    pending = list(range(len(chosen)))
    while pending:
        rest = []
        for i in pending:
            if deps[i] <= done:
                done.add(i)
                order.append(chosen[i])
            else:
                rest.append(i)
        if len(rest) == len(pending):
            raise ValueError("graph has a cycle")
        pending = rest
    return order
