"""Shapes and types inferred from the graph itself, never from its declarations.

Exporters often declare value_info and output shapes that disagree with what the graph
computes; a rewrite that trusts them can silently change a model's outputs. So
:func:`infer_shapes` strips every declaration but the graph inputs' before running ONNX
shape inference (with data propagation, so ``Shape``→``Gather``→``Concat`` chains give
values), and large weights are given to it as typed inputs (never copied for it) so that
inference never serializes gigabytes.

Its answers are keyed by tensor *name*, for the whole model. That is the engine of
:class:`onnxopt.tensorinfo.ShapeIndex` — what passes ask about a gs tensor, by identity —
and the right tool for whole-model proto work on a throwaway copy (declaring the types of
intermediate tensors added as outputs to a copy, say). A rewrite does not read it directly:
names are unique only per scope, and a name says nothing about a tensor created since.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import shape_inference

from .model import Model
from .proto_convert import constant_data_bytes, constant_type

__all__ = ["TensorInfo", "infer_shapes", "static_shape"]

_BIG = 1 << 20  # weights above this many bytes are given to inference as typed inputs


@dataclass(frozen=True)
class TensorInfo:
    """Inferred dtype (numpy, or None) and shape (ints, dim names, None) of a tensor."""

    dtype: np.dtype | None
    shape: tuple | None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)


def _strip(g: onnx.GraphProto, top: bool) -> None:
    del g.value_info[:]
    for out in g.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    for node in g.node:
        for a in node.attribute:
            if a.HasField("g"):
                _strip(a.g, False)
            for sub in a.graphs:
                _strip(sub, False)


#: Floating-point element types: no inference function reads the values of a float input
#: of more than a few elements (scales, Range's scalars: one element per axis at most).
_FLOATS = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                     onnx.TensorProto.BFLOAT16})
_FEW = 64


def _data_not_needed(t, top: bool) -> bool:
    """Whether inference gets initializer ``t`` as a typed input instead of its data: any
    above 1 MB, and in the top graph a float tensor of more than a few elements (a body
    of an If or Loop must not change its inputs for that)."""
    if top:
        elem, dims = constant_type(t)
        if elem in _FLOATS and math.prod(dims) > _FEW:
            return True
    return constant_data_bytes(t) > _BIG


def _info(vi: onnx.ValueInfoProto) -> TensorInfo | None:
    if not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else None
    if not tt.HasField("shape"):
        return TensorInfo(dtype, None)
    dims = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorInfo(dtype, tuple(dims))


def infer_shapes(model: Model) -> dict[str, TensorInfo]:
    """Name -> :class:`TensorInfo` for every tensor ONNX shape inference can type,
    subgraphs included. Declared value_info and output shapes are ignored; graph input
    declarations are kept (they are the model's contract). Never raises: a graph that
    inference cannot handle yields what it could infer (possibly nothing). Passes that
    follow passes that changed nothing share one inference (:meth:`Model.analysis`)."""
    return model.analysis("infer_shapes", lambda: _infer_shapes(model))


def _infer_shapes(model: Model) -> dict[str, TensorInfo]:
    proto = model.to_proto(weights_as_inputs=_data_not_needed)
    _strip(proto.graph, True)
    try:
        inferred = shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        return {}
    out: dict[str, TensorInfo] = {}

    def collect(g: onnx.GraphProto) -> None:
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            info = _info(vi)
            if info is not None and (vi.name not in out or out[vi.name].shape is None):
                out[vi.name] = info
        for node in g.node:
            for a in node.attribute:
                if a.HasField("g"):
                    collect(a.g)
                for sub in a.graphs:
                    collect(sub)

    collect(inferred.graph)
    for t in model.constants():
        if t.name and t.name not in out:
            out[t.name] = TensorInfo(np.dtype(t.dtype) if t.dtype is not None else None,
                                     tuple(int(d) for d in t.shape))
    return out


def static_shape(info: TensorInfo | None) -> tuple[int, ...] | None:
    """The shape if every dimension is a known integer, else None."""
    if info is None or not info.static:
        return None
    return tuple(int(d) for d in info.shape)
