"""materialize: turn compact weight storage back into plain dense weights.

``prune-magnitude`` and ``share-weights`` store layers as small constants plus the
ordinary ONNX ops that expand them (see :mod:`onnxopt.weights`). Onnxruntime folds those
ops when it creates a session, but other runtimes, converters and tools may want plain
weights: this pass evaluates each expansion exactly (the ops involved do no float
arithmetic) and writes the result as an initializer — a Constant node in IR < 4 models,
whose initializers would be overridable inputs — under the weight's own name. The
outputs are bit-identical to the compressed model's, so the pass is exact; the
pruning and clustering stay (zeros and shared values are still there), only the
storage grows back.

It is a pass rather than an option of the two compression passes because it composes:
it works on a model compressed earlier (a file), after either pass or both, and in any
pipeline (``prune-magnitude,share-weights,materialize`` gives dense clustered weights).
Expansions that feed a graph output directly are left alone (an initializer cannot be
a graph output of the same name without changing the signature's nature).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.framework import Pass, PassContext, PassResult, register
from onnxopt.graph import GraphIndex
from onnxopt.model import Model, iter_graphs
from onnxopt.weights.decode import COMPACT, decoder_cone, decoder_ends, storage_of, tensor_value
from onnxopt.weights.sites import WeightSite
from onnxopt.weights.writer import StorageWriter

__all__ = ["Materialize"]

log = logging.getLogger(__name__)

@register
class Materialize(Pass):
    """Replace every compact weight storage (codebook lookups, sparse scatters) by the
    plain dense tensor it expands to; outputs stay bit-identical."""

    name = "materialize"
    summary = "expand compact weight storage (codebook, sparse) back into plain dense weights"
    exact = True
    options = {}

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        index = GraphIndex(model)
        outputs = {id(t) for g in iter_graphs(model.graph) for t in g.outputs}
        roots: list[tuple[gs.Graph, gs.Tensor, str]] = []
        skipped = 0
        # Match: the tensors where an expansion ends (read by a node that is not part of
        # one), and their values.
        for _, node, t in decoder_ends(model.graph):
            kind = storage_of(t)
            if kind not in COMPACT:
                continue
            if id(t) in outputs:
                log.debug("%s is a graph output: left compact", t.name)
                skipped += 1
                continue
            roots.append((index.graph_of[id(node)], t, kind))
        planned = []
        memo: dict = {}
        for g, t, kind in roots:
            value = tensor_value(t, memo)
            if value is None:
                skipped += 1
                continue
            planned.append((WeightSite(t, np.asarray(value), [], g, "decoded", kind, decoder_cone(t) or []), kind))

        # Mutate.
        before = model.tensor_bytes()
        writer = StorageWriter(model, memo)
        for site, _ in planned:
            writer.write(site, site.value, dense=True)
        writer.commit()
        kinds: dict[str, int] = {}
        for _, kind in planned:
            kinds[kind] = kinds.get(kind, 0) + 1
        stats = {
            "layers_materialized": len(planned),
            "tensor_bytes_before": before,
            "tensor_bytes_after": model.tensor_bytes(),
            "storages": dict(sorted(kinds.items())),
            "skipped": skipped,
        }
        return PassResult(modified=bool(planned), stats=stats)
