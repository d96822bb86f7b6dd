"""Conversion between ``onnx.GraphProto`` and the ``gs.Graph`` that passes mutate.

Importing is our own (not ``gs.import_onnx``) because graphsurgeon drops initializers
that are also graph inputs from the input list (changing the signature of IR 3 models),
drops unused initializers, node doc strings and attribute types (an empty ``ints``
attribute cannot be re-exported), and cannot read external data relative to the model's
folder lazily. The importer therefore keeps on the graphsurgeon objects everything it
would lose (see :mod:`onnxopt.graph_extras`), leaves weight data lazy, and the exporter
writes it all back: a graph that no pass touched exports to the proto it came from.
The exporter also finds a home for the constants that passes created, once, in the
innermost graph enclosing all their readers.

Large tensors stored in the file are held apart from the proto on load
(:func:`hold_apart`, :class:`onnxopt.model_files.InlineValues`); the exporter writes them
back whole, or as markers naming entries of a ``held`` list (a copy of the model shares
them, a save streams them), or leaves the largest initializers out as typed graph inputs
(what shape inference needs).
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from .errors import ModelSaveError
from .graph_extras import GraphExtras, RawAttribute, extras, iter_graphs, node_subgraphs
from .model_files import (
    HELD_APART_MIN_BYTES,
    ExternalValues,
    InlineValues,
    held_data,
    held_index,
    held_marker,
)

__all__ = ["constant_data_bytes", "constant_type", "graph_from_proto", "graph_to_proto", "hold_apart",
           "norm_domain"]


def graph_from_proto(proto: onnx.GraphProto, base_dir: str | None,
                     held: list | None = None) -> gs.Graph:
    """The top graph of a model as a ``gs.Graph``, subgraphs included. Initializer data
    stays lazy; external data is read relative to ``base_dir`` when first needed.

    ``held`` resolves markers (see the module doc): the proto is then ours, and the
    tensors carrying a marker lose it."""
    return _Importer(base_dir, held).graph(proto, {})


def graph_to_proto(graph: gs.Graph, into: onnx.GraphProto | None = None, *, held: list | None = None,
                   as_input: Callable[[gs.Constant, bool], bool] | None = None
                   ) -> tuple[onnx.GraphProto, set[str]]:
    """The top graph back as a ``GraphProto`` (``into``, or a new one), and the domains its
    nodes use (normalized by :func:`norm_domain`) so that the model can import an opset
    for each.

    With ``held``, large tensors are written as markers appended to it; initializers for
    which ``as_input(tensor, in_top_graph)`` is true are written as graph inputs of their
    type and shape, without data, and so are the Constant nodes of the top graph whose
    value it is true for (unless they give a graph output)."""
    exporter = _Exporter(_place_new_constants(graph), held, as_input)
    return exporter.graph(graph, set(), into, top=True), exporter.domains


def hold_apart(proto: onnx.ModelProto) -> list[bytes]:
    """Take the bytes of every large tensor the importer turns into a constant (graph
    initializers and Constant nodes, in If/Loop/Scan bodies too) out of ``proto``, which
    must be ours; each keeps a marker naming its entry of the returned list."""
    held: list[bytes] = []

    def take(t: onnx.TensorProto) -> None:
        if (t.HasField("raw_data") and t.data_location != onnx.TensorProto.EXTERNAL
                and not t.HasField("segment") and _estimated_bytes(t) >= HELD_APART_MIN_BYTES):
            held.append(t.raw_data)
            t.raw_data = held_marker(len(held) - 1)

    def graph(g: onnx.GraphProto) -> None:
        for t in g.initializer:
            take(t)
        for node in g.node:
            if node.op_type not in _HOLDING_OPS:
                continue
            for a in node.attribute:
                if a.ref_attr_name:
                    continue
                if a.type == onnx.AttributeProto.TENSOR:
                    take(a.t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    graph(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        graph(sub)

    graph(proto.graph)
    return held


#: Nodes whose attributes :func:`hold_apart` looks into (others keep their tensors inline).
_HOLDING_OPS = frozenset({"Constant", "If", "Loop", "Scan"})

_ITEM_BYTES = {onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.INT64: 8, onnx.TensorProto.UINT64: 8,
               onnx.TensorProto.COMPLEX128: 16, onnx.TensorProto.FLOAT: 4, onnx.TensorProto.INT32: 4,
               onnx.TensorProto.UINT32: 4, onnx.TensorProto.COMPLEX64: 8, onnx.TensorProto.FLOAT16: 2,
               onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2}


def _estimated_bytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor from its header (one byte an element for the types not listed)."""
    n = _ITEM_BYTES.get(t.data_type, 1)
    for d in t.dims:
        n *= d
    return n


# --------------------------------------------------------------------------------------
# Import: GraphProto -> gs.Graph
# --------------------------------------------------------------------------------------

_SIMPLE_ATTRS = {
    onnx.AttributeProto.FLOAT: "f",
    onnx.AttributeProto.INT: "i",
    onnx.AttributeProto.FLOATS: "floats",
    onnx.AttributeProto.INTS: "ints",
}


def norm_domain(domain: str | None) -> str:
    """The ONNX domain with its two spellings of the default (``""``, ``"ai.onnx"``) as ``""``."""
    return "" if domain in (None, "", "ai.onnx") else domain


class _Importer:
    def __init__(self, base_dir: str | None, held: list | None = None):
        self.base_dir = base_dir
        self.held = held

    def constant(self, proto: onnx.TensorProto | onnx.SparseTensorProto) -> gs.Constant:
        if isinstance(proto, onnx.SparseTensorProto):
            return gs.Constant(proto.values.name, values=SparseValues(proto))
        if proto.data_location == onnx.TensorProto.EXTERNAL:
            values: LazyValues = ExternalValues(proto, self.base_dir or "")
        else:
            values = (self.held is not None and self.held_values(proto)) or LazyValues(proto)
        loc = int(proto.data_location) if proto.HasField("data_location") else None
        const = gs.Constant(proto.name, values=values, data_location=loc)
        if proto.doc_string:
            const.doc_string = proto.doc_string
        return const

    def held_values(self, proto: onnx.TensorProto) -> LazyValues | None:
        """The values a marker names: shared when they are lazy values (a copy of a model),
        held apart around this proto when they are bytes; None for any other tensor."""
        if not proto.HasField("raw_data") or _estimated_bytes(proto) < HELD_APART_MIN_BYTES:
            return None
        index = held_index(proto.raw_data)
        if index is None:
            return None
        entry = self.held[index]
        if isinstance(entry, LazyValues):
            return entry
        proto.ClearField("raw_data")
        return InlineValues(proto, entry if isinstance(entry, bytes) else bytes(held_data(entry)))

    def graph(self, proto: onnx.GraphProto, outer) -> gs.Graph:
        local: dict[str, gs.Tensor] = {}
        scope = ChainMap(local, outer)
        used: set[str] = set()

        def declared(name: str) -> gs.Tensor:
            """The tensor this graph itself names ``name`` (a new Variable at first sight)."""
            t = local.get(name)
            if t is None:
                t = local[name] = gs.Variable(name)
            return t

        def lookup(name: str) -> gs.Tensor:
            if not name:
                return gs.Variable.empty()
            used.add(name)
            t = local.get(name)
            if t is None:
                t = outer.get(name)
            if t is None:
                t = local[name] = gs.Variable(name)
            return t

        initializers = []
        for init in proto.initializer:
            const = self.constant(init)
            local[init.name] = const
            initializers.append(const)
        for init in proto.sparse_initializer:
            const = self.constant(init)
            local[const.name] = const
            initializers.append(const)

        for vi in proto.value_info:
            t = declared(vi.name)
            if isinstance(t, gs.Variable):
                _apply_value_info(t, vi)

        inputs = [_with_value_info(declared(vi.name), vi, "input") for vi in proto.input]
        used.update(vi.name for vi in proto.input)

        nodes = []
        for np_ in proto.node:
            node = gs.Node(
                op=np_.op_type,
                name=np_.name,
                attrs=self.attributes(np_.attribute, scope),
                inputs=[lookup(n) for n in np_.input],
                outputs=[],
                domain=np_.domain if np_.HasField("domain") else None,
            )
            outs = []
            for name in np_.output:
                if not name:
                    outs.append(gs.Variable.empty())
                    continue
                used.add(name)
                outs.append(declared(name))
            node.outputs = outs
            node.attr_types = {a.name: a.type for a in np_.attribute}
            if np_.doc_string:
                node.doc_string = np_.doc_string
            if np_.metadata_props:
                node.metadata_props = [(p.key, p.value) for p in np_.metadata_props]
            if getattr(np_, "overload", ""):
                node.overload = np_.overload
            nodes.append(node)

        outputs = [_with_value_info(lookup(vi.name), vi, "output") for vi in proto.output]

        # value_info naming no tensor of the graph (or naming an initializer) is kept
        # aside for a faithful round-trip.
        orphans = [vi for vi in proto.value_info
                   if vi.name not in used or not isinstance(local.get(vi.name), gs.Variable)]
        g = gs.Graph(nodes=nodes, inputs=inputs, outputs=outputs, name=proto.name,
                     doc_string=proto.doc_string)
        g._onnxopt = GraphExtras(
            initializers=initializers,
            orphan_value_info=orphans,
            metadata_props=[(p.key, p.value) for p in getattr(proto, "metadata_props", [])],
            quantization_annotation=list(proto.quantization_annotation),
        )
        return g

    def attributes(self, attrs: Iterable[onnx.AttributeProto], scope: dict) -> dict:
        out: dict[str, Any] = {}
        A = onnx.AttributeProto
        for a in attrs:
            if a.ref_attr_name:
                out[a.name] = RawAttribute(a)
            elif a.type in _SIMPLE_ATTRS:
                value = getattr(a, _SIMPLE_ATTRS[a.type])
                out[a.name] = list(value) if a.type in (A.FLOATS, A.INTS) else value
            elif a.type == A.STRING:
                try:
                    out[a.name] = a.s.decode("utf-8")
                except UnicodeDecodeError:
                    out[a.name] = RawAttribute(a)
            elif a.type == A.STRINGS:
                try:
                    out[a.name] = [s.decode("utf-8") for s in a.strings]
                except UnicodeDecodeError:
                    out[a.name] = RawAttribute(a)
            elif a.type == A.TENSOR:
                out[a.name] = self.constant(a.t)
            elif a.type == A.GRAPH:
                out[a.name] = self.graph(a.g, scope)
            elif a.type == A.GRAPHS and a.graphs:
                out[a.name] = [self.graph(g, scope) for g in a.graphs]
            else:
                out[a.name] = RawAttribute(a)
        return out


def _with_value_info(t: gs.Tensor, vi: onnx.ValueInfoProto, role: str) -> gs.Tensor:
    """``t`` given the type a graph input or output declares for it: applied to a
    Variable; kept verbatim on a Constant (an initializer that is also a graph input or
    output), where the exporter finds it as ``input_value_info``/``output_value_info``."""
    if isinstance(t, gs.Variable):
        _apply_value_info(t, vi)
    else:
        setattr(t, f"{role}_value_info", vi)
    return t


def _apply_value_info(t: gs.Variable, vi: onnx.ValueInfoProto) -> None:
    if vi.type.ByteSize() == 0:
        return
    kind = vi.type.WhichOneof("value")
    if kind == "tensor_type" or kind == "sparse_tensor_type":
        tt = getattr(vi.type, kind)
        if tt.elem_type:
            t.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if tt.HasField("shape"):
            t.shape = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None)
                for d in tt.shape.dim
            ]
        t.type = kind
    # Keep the proto: export re-uses it unchanged when dtype and shape are untouched,
    # which preserves denotations, doc strings and non-tensor types (sequences, maps).
    t.value_info = vi
    t.value_info_key = (t.dtype, None if t.shape is None else tuple(t.shape))


# --------------------------------------------------------------------------------------
# Export: gs.Graph -> GraphProto
# --------------------------------------------------------------------------------------


def _place_new_constants(root: gs.Graph) -> dict[int, list[gs.Constant]]:
    """Where to write the constants that passes created (listed in no graph's
    initializers) and that nodes of several graphs read: in the innermost graph enclosing
    all those readers, once — not once in every If branch or Loop body that reads it.
    Constants read by a single graph need no entry: that graph writes them."""
    parent: dict[int, int | None] = {id(root): None}
    listed: set[int] = set()
    readers: dict[int, tuple[gs.Constant, list[int]]] = {}
    for g in iter_graphs(root):
        listed.update(id(t) for t in extras(g).initializers)
        for node in g.nodes:
            for sub in node_subgraphs(node):
                parent[id(sub)] = id(g)
            for t in node.inputs:
                if isinstance(t, gs.Constant):
                    entry = readers.setdefault(id(t), (t, []))
                    if id(g) not in entry[1]:
                        entry[1].append(id(g))

    def chain(gid: int | None) -> list[int]:
        out = []
        while gid is not None:
            out.append(gid)
            gid = parent.get(gid)
        return out

    placement: dict[int, list[gs.Constant]] = {}
    for cid, (t, gids) in readers.items():
        if cid in listed or len(gids) < 2:
            continue
        common = set(chain(gids[0]))
        for gid in gids[1:]:
            common &= set(chain(gid))
        home = next(gid for gid in chain(gids[0]) if gid in common)
        placement.setdefault(home, []).append(t)
    return placement


class _Exporter:
    def __init__(self, placement: dict[int, list[gs.Constant]] | None = None,
                 held: list | None = None, as_input: Callable[[gs.Constant, bool], bool] | None = None):
        self.domains: set[str] = set()
        self.placement = placement or {}
        self.held = held
        self.as_input = as_input

    def graph(self, g: gs.Graph, outer: set[str], proto: onnx.GraphProto | None = None,
              top: bool = False) -> onnx.GraphProto:
        ext = extras(g)
        proto = onnx.GraphProto() if proto is None else proto
        proto.name = g.name or ""
        if g.doc_string:
            proto.doc_string = g.doc_string

        # Initializers: the graph's own (used or not, in file order), then constants that
        # passes created and this graph's nodes use (in node order).
        constants: list[gs.Constant] = []
        seen: set[int] = set()
        names: dict[str, int] = {}

        def own(t: gs.Tensor) -> None:
            if isinstance(t, gs.Constant) and id(t) not in seen:
                if t.name in outer:
                    return
                prev = names.get(t.name)
                if prev is not None:
                    raise ModelSaveError(
                        f"graph '{g.name}': two different constants are named '{t.name}'")
                names[t.name] = id(t)
                seen.add(id(t))
                constants.append(t)

        for t in ext.initializers:
            own(t)
        for t in self.placement.get(id(g), ()):
            own(t)
        for t in g.inputs:
            own(t)
        for node in g.nodes:
            for t in node.inputs:
                own(t)
        for t in g.outputs:
            own(t)

        defined = set(outer)
        defined.update(t.name for t in constants)
        defined.update(t.name for t in g.inputs)
        for node in g.nodes:
            defined.update(t.name for t in node.outputs if t.name)

        for t in g.inputs:
            proto.input.append(_value_info(t, "input"))
        for t in g.outputs:
            proto.output.append(_value_info(t, "output"))

        input_names = {t.name for t in g.inputs}
        for t in constants:
            values = t._values
            if isinstance(values, SparseValues):
                sp = proto.sparse_initializer.add()
                sp.CopyFrom(values.tensor)
                sp.values.name = t.name
            elif self.as_input is not None and self.as_input(t, top):
                if t.name not in input_names:  # its type and shape, without the data
                    elem, dims = constant_type(t)
                    proto.input.append(onnx.helper.make_tensor_value_info(t.name, elem, dims))
            else:
                _fill_tensor(t, proto.initializer.add(), self.held)

        io_ids = {id(t) for t in g.inputs} | {id(t) for t in g.outputs}
        vi_seen: set[int] = set()
        for node in g.nodes:
            if top and self.as_input is not None and self._constant_as_input(node, io_ids, proto):
                continue
            self.node(node, defined, proto.node.add())
            for t in node.outputs:
                if (isinstance(t, gs.Variable) and t.name and id(t) not in io_ids
                        and id(t) not in vi_seen):
                    vi_seen.add(id(t))
                    if t.dtype is not None or t.shape is not None:
                        proto.value_info.append(_value_info(t, "value_info"))
        proto.value_info.extend(ext.orphan_value_info)
        live = defined
        for qa in ext.quantization_annotation:
            if qa.tensor_name in live:
                proto.quantization_annotation.append(qa)
        for key, value in ext.metadata_props:
            proto.metadata_props.add(key=key, value=value)
        return proto

    def _constant_as_input(self, node: gs.Node, io_ids: set[int], proto: onnx.GraphProto) -> bool:
        """Write a Constant node whose value ``as_input`` is true for as a typed graph input."""
        if (node.op != "Constant" or node.domain not in (None, "", "ai.onnx") or node.inputs
                or len(node.outputs) != 1 or not node.outputs[0].name or id(node.outputs[0]) in io_ids
                or list(node.attrs) != ["value"]):
            return False
        value = node.attrs["value"]
        if not isinstance(value, gs.Constant) or isinstance(value._values, SparseValues) \
                or not self.as_input(value, True):
            return False
        elem, dims = constant_type(value)
        proto.input.append(onnx.helper.make_tensor_value_info(node.outputs[0].name, elem, dims))
        return True

    def node(self, node: gs.Node, scope: set[str], p: onnx.NodeProto) -> None:
        p.op_type = node.op
        if node.name:
            p.name = node.name
        if node.domain is not None:
            p.domain = node.domain
        self.domains.add(norm_domain(node.domain))
        p.input.extend(t.name for t in node.inputs)
        p.output.extend(t.name for t in node.outputs)
        types = vars(node).get("attr_types", {})
        for key, value in node.attrs.items():
            self.attribute(key, value, types.get(key), scope, p.attribute)
        doc = vars(node).get("doc_string")
        if doc:
            p.doc_string = doc
        for key, value in vars(node).get("metadata_props", []):
            p.metadata_props.add(key=key, value=value)
        overload = vars(node).get("overload")
        if overload:
            p.overload = overload

    def attribute(self, key: str, value: Any, attr_type: int | None, scope: set[str], into) -> None:
        A = onnx.AttributeProto
        if isinstance(value, RawAttribute):
            into.append(value.proto)
            return
        if isinstance(value, gs.Graph):
            a = into.add(name=key, type=A.GRAPH)
            self.graph(value, scope, a.g)
            return
        if isinstance(value, list) and value and isinstance(value[0], gs.Graph):
            a = into.add(name=key, type=A.GRAPHS)
            for v in value:
                self.graph(v, scope, a.graphs.add())
            return
        if isinstance(value, gs.Constant):
            a = into.add(name=key, type=A.TENSOR)
            _fill_tensor(value, a.t, self.held)
            return
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        if attr_type is not None:
            try:
                into.append(onnx.helper.make_attribute(key, value, attr_type=attr_type))
                return
            except (TypeError, ValueError):
                pass  # the pass changed the value's kind: infer it below
        if isinstance(value, list) and not value:
            raise ModelSaveError(f"attribute '{key}' is an empty list of unknown type")
        into.append(onnx.helper.make_attribute(key, value))


_PLAIN_KINDS = frozenset("biufc")


def _plain_array(arr: np.ndarray) -> bool:
    """Whether ``from_array`` writes this array's bytes as they are (no strings, no
    packed or ml_dtypes element types)."""
    return arr.dtype.kind in _PLAIN_KINDS and arr.dtype.names is None and arr.dtype.itemsize >= 1 \
        and arr.dtype.type.__module__ == "numpy"


def _fill_tensor(t: gs.Constant, dst: onnx.TensorProto, held: list | None) -> None:
    """Write constant ``t`` into ``dst``: the proto it came from, or ``from_array`` of its
    value; with ``held``, a large tensor's data is a marker appended to it."""
    values = t._values
    if isinstance(values, LazyValues) and not isinstance(values, SparseValues):
        if isinstance(values, InlineValues):
            dst.CopyFrom(values.header)
            if held is None:
                dst.raw_data = values.raw
            else:
                dst.raw_data = held_marker(len(held))
                held.append(values)
        elif (held is not None and not isinstance(values, ExternalValues) and values.tensor.HasField("raw_data")
              and _estimated_bytes(values.tensor) >= HELD_APART_MIN_BYTES):
            _copy_header(values.tensor, dst)
            dst.raw_data = held_marker(len(held))
            held.append(values)
        else:
            dst.CopyFrom(values.tensor)
        dst.name = t.name
        return
    arr = np.asarray(values)
    if held is not None and arr.nbytes >= HELD_APART_MIN_BYTES and _plain_array(arr):
        dst.dims.extend(arr.shape)  # what from_array writes, the bytes held apart
        if t.name:
            dst.name = t.name
        dst.raw_data = held_marker(len(held))
        held.append(arr)
        dst.data_type = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
    else:
        dst.CopyFrom(numpy_helper.from_array(arr, t.name))
    doc = vars(t).get("doc_string")
    if doc:
        dst.doc_string = doc


def _copy_header(src: onnx.TensorProto, dst: onnx.TensorProto) -> None:
    """Every field of ``src`` but ``raw_data`` into ``dst``, without copying the data."""
    for field in src.DESCRIPTOR.fields:
        name = field.name
        if name == "raw_data":
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            items = getattr(src, name)
            if len(items):
                getattr(dst, name).extend(items)
        elif src.HasField(name):
            if field.type == field.TYPE_MESSAGE:
                getattr(dst, name).CopyFrom(getattr(src, name))
            else:
                setattr(dst, name, getattr(src, name))


def constant_data_bytes(t: gs.Constant) -> int:
    """Bytes of data the exported tensor proto carries: its ``raw_data``, else four per
    element of the typed fields; external data counts as larger than any limit."""
    values = t._values
    if isinstance(values, ExternalValues):
        return 1 << 62
    if isinstance(values, InlineValues):
        return len(values.raw)
    if isinstance(values, LazyValues):
        proto = values.tensor
    else:
        arr = np.asarray(values)
        if _plain_array(arr):
            return int(arr.nbytes)
        proto = numpy_helper.from_array(arr)
    if proto.HasField("raw_data"):
        return len(proto.raw_data)
    return int(np.prod(proto.dims)) * 4 if proto.dims else 4


def constant_type(t: gs.Constant) -> tuple[int, list[int]]:
    """ONNX element type and dimensions of a constant, from its header."""
    values = t._values
    if isinstance(values, InlineValues):
        return values.header.data_type, list(values.header.dims)
    if isinstance(values, LazyValues):
        return values.tensor.data_type, list(values.tensor.dims)
    arr = np.asarray(values)
    if _plain_array(arr):
        return onnx.helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape)
    proto = numpy_helper.from_array(arr)
    return proto.data_type, list(proto.dims)


def _value_info(t: gs.Tensor, role: str) -> onnx.ValueInfoProto:
    if isinstance(t, gs.Constant):
        raw = vars(t).get(f"{role}_value_info")
        if raw is not None:
            return raw
        return onnx.helper.make_tensor_value_info(
            t.name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)), list(t.shape))
    raw = vars(t).get("value_info")
    key = (t.dtype, None if t.shape is None else tuple(t.shape))
    if raw is not None and vars(t).get("value_info_key") == key:
        return raw
    if t.dtype is None:
        return onnx.helper.make_empty_tensor_value_info(t.name)
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
    shape = None if t.shape is None else [d if isinstance(d, (int, str)) else None for d in t.shape]
    if t.type == "sequence_type":
        return onnx.helper.make_tensor_sequence_value_info(t.name, elem, shape)
    if t.type == "sparse_tensor_type":
        return onnx.helper.make_sparse_tensor_value_info(t.name, elem, shape)
    return onnx.helper.make_tensor_value_info(t.name, elem, shape)
