"""Model: an ONNX model as an onnx-graphsurgeon graph plus what graphsurgeon does not carry.

Passes mutate ``model.graph`` (a ``gs.Graph``). Everything else a ``ModelProto`` holds —
opset imports, IR version, producer, metadata, local functions, training info, node doc
strings and metadata, the exact attribute types, initializers that nobody uses yet,
initializers that are also graph inputs (IR < 4), value_info — is kept here or on the
graph objects, so that ``Model.load(p).save(q)`` loses nothing.

Loading is our own (not ``gs.import_onnx``) for three reasons: graphsurgeon drops
initializers that are also graph inputs from the input list (changing the signature of
IR 3 models), drops unused initializers, node doc strings and attribute types (an empty
``ints`` attribute cannot be re-exported), and cannot read external data relative to the
model's folder lazily. Weight data stays lazy: a tensor that no pass reads is never loaded,
and external data is copied file-to-file on save.

Saving is atomic (temporary files in the target folder, then rename) and deterministic
(the same model and options give the same bytes). Models whose tensors pass 2 GB are
saved with external data automatically.
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
from collections import ChainMap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from .errors import ModelLoadError, ModelSaveError, UnsafePathError

__all__ = [
    "Model",
    "ModelSummary",
    "ExternalValues",
    "RawAttribute",
    "GraphExtras",
    "extras",
    "iter_graphs",
    "node_subgraphs",
    "tensor_nbytes",
    "gc_paused",
    "EXTERNAL_DATA_THRESHOLD",
]

#: Above this many bytes of tensor data, ``save`` writes external data by default
#: (protobuf cannot serialize a message of 2 GiB or more).
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27  # 2 GiB with 128 MiB left for the graph itself
#: Tensors smaller than this stay inline when saving with external data.
EXTERNAL_MIN_TENSOR_BYTES = 1024
_ALIGN = 4096
_COPY_CHUNK = 64 * 2**20


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector for bulk graph work.

    graphsurgeon's tensors and nodes reference each other, so building or walking a large
    graph triggers collection passes that scan every live object again and again
    (importing 100k nodes took twice as long with the collector running). Nothing here
    creates garbage cycles worth collecting mid-way; the collector resumes afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------------------------
# What graphsurgeon objects carry for us
# --------------------------------------------------------------------------------------


class ExternalValues(LazyValues):
    """Lazy values of a tensor whose data lives in an external file.

    ``tensor`` keeps its ``external_data`` entries; ``base_dir`` is the folder they are
    relative to. ``load`` reads them on first use (``gs.Constant.values``).
    """

    def __init__(self, tensor: onnx.TensorProto, base_dir: str):
        super().__init__(tensor)
        self.base_dir = base_dir

    def load(self) -> np.ndarray:
        return np.array(numpy_helper.to_array(self.tensor, base_dir=self.base_dir))

    def read_bytes(self) -> bytes:
        """The raw little-endian bytes of the tensor, as stored."""
        info = _external_info(self.tensor)
        with open(os.path.join(self.base_dir, info["location"]), "rb") as f:
            f.seek(int(info.get("offset", 0)))
            length = info.get("length")
            return f.read(int(length)) if length is not None else f.read()


class RawAttribute:
    """An attribute kept as its ``AttributeProto`` because no pass needs to look inside
    (sparse tensors, type protos, lists of tensors, references inside functions)."""

    def __init__(self, proto: onnx.AttributeProto):
        self.proto = proto

    def __repr__(self) -> str:
        return f"RawAttribute({onnx.AttributeProto.AttributeType.Name(self.proto.type)})"


@dataclass
class GraphExtras:
    """Per-graph state that ``gs.Graph`` has no field for.

    ``initializers``: the graph's own initializers in file order, used or not. A pass that
    drops a weight removes it here; constants that passes create are found on save and
    need not be listed. ``orphan_value_info``: value_info entries naming no tensor of the
    graph (kept for a faithful round-trip; ``dead-nodes`` drops them).
    """

    initializers: list
    orphan_value_info: list
    metadata_props: list
    quantization_annotation: list


def extras(graph: gs.Graph) -> GraphExtras:
    """The :class:`GraphExtras` of ``graph`` (created empty for graphs a pass built)."""
    found = vars(graph).get("_onnxopt")
    if found is None:
        found = GraphExtras([], [], [], [])
        graph._onnxopt = found
    return found


def node_subgraphs(node: gs.Node) -> list[gs.Graph]:
    """The graphs held by ``node``'s attributes (If branches, Loop/Scan bodies)."""
    found = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            found.append(value)
        elif isinstance(value, list) and value and isinstance(value[0], gs.Graph):
            found.extend(value)
    return found


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """``graph`` and every graph nested in it, outer before inner."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for node in reversed(g.nodes):
            stack.extend(reversed(node_subgraphs(node)))


def tensor_nbytes(tensor: gs.Constant) -> int:
    """Bytes of a constant's data without loading it."""
    values = tensor._values
    if isinstance(values, np.ndarray):
        return int(values.nbytes)
    if isinstance(values, SparseValues):
        proto = values.tensor
        return int(_proto_data_bytes(proto.values) + _proto_data_bytes(proto.indices))
    return int(values.nbytes)


# --------------------------------------------------------------------------------------
# Summary figures
# --------------------------------------------------------------------------------------


@dataclass
class ModelSummary:
    """Counts of a model, as the report shows them."""

    nodes: int  # top graph
    nodes_total: int  # including every subgraph
    initializers: int  # including subgraphs
    parameters: int  # elements of every constant tensor (initializers and Constant nodes)
    tensor_bytes: int  # bytes of every constant tensor
    subgraphs: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------

_MODEL_FIELDS = ("producer_name", "producer_version", "domain", "model_version", "doc_string")


class Model:
    """An ONNX model whose graph is an onnx-graphsurgeon ``Graph``.

    Load with :meth:`load` (path, bytes or ``onnx.ModelProto``); get a ``ModelProto`` back
    with :meth:`to_proto`, or write a file with :meth:`save`. ``graph`` is what passes
    mutate; ``opset_imports`` maps domain to version; ``functions`` holds the model's
    local functions as ``FunctionProto`` (passes treat calls to them as opaque nodes).
    """

    def __init__(self, graph: gs.Graph, *, ir_version: int, opset_imports: dict[str, int],
                 functions: list | None = None, base_dir: str | None = None,
                 source_path: str | None = None, **fields: Any):
        self.graph = graph
        self.ir_version = ir_version
        self.opset_imports = dict(opset_imports)
        self.functions: list[onnx.FunctionProto] = list(functions or [])
        self.base_dir = base_dir
        self.source_path = source_path
        self.producer_name: str = fields.pop("producer_name", "")
        self.producer_version: str = fields.pop("producer_version", "")
        self.domain: str = fields.pop("domain", "")
        self.model_version: int = fields.pop("model_version", 0)
        self.doc_string: str = fields.pop("doc_string", "")
        self.metadata_props: list[tuple[str, str]] = list(fields.pop("metadata_props", []))
        self.training_info: list = list(fields.pop("training_info", []))
        self.configuration: list = list(fields.pop("configuration", []))
        # Scalar fields the source set explicitly, even to their default (proto2 presence).
        self.present_fields: set[str] = set(fields.pop("present_fields", ()))
        if fields:
            raise TypeError(f"unknown model fields: {sorted(fields)}")

    # ---- loading ---------------------------------------------------------------------

    @classmethod
    def load(cls, source: str | os.PathLike | bytes | onnx.ModelProto, *,
             base_dir: str | os.PathLike | None = None) -> Model:
        """Load a model from a file path, serialized bytes or a ``ModelProto``.

        External data is resolved relative to the model's folder (or ``base_dir``) and
        read only when a pass needs the values. A location that is absolute, leaves the
        folder (``../x`` or a symlink pointing out) or points past the end of its file
        raises :class:`UnsafePathError` / :class:`ModelLoadError`.
        """
        source_path = None
        if isinstance(source, onnx.ModelProto):
            proto = source
        elif isinstance(source, (bytes, bytearray, memoryview)):
            proto = _parse(bytes(source), "<bytes>")
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.exists():
                raise ModelLoadError(f"{path}: no such file")
            if path.is_dir():
                raise ModelLoadError(f"{path}: is a folder, not an ONNX file")
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ModelLoadError(f"{path}: cannot read ({exc.strerror})") from exc
            proto = _parse(data, str(path))
            source_path = str(path.resolve())
            if base_dir is None:
                base_dir = str(path.resolve().parent)
        else:
            raise TypeError(f"cannot load a model from {type(source).__name__}")
        base = str(Path(base_dir).resolve()) if base_dir is not None else None
        _check_external_data(proto, base, source_path or "<model>")
        return cls.from_proto(proto, base_dir=base, source_path=source_path)

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, *, base_dir: str | None = None,
                   source_path: str | None = None) -> Model:
        if not proto.HasField("graph"):
            raise ModelLoadError(f"{source_path or '<model>'}: not an ONNX model (no graph)")
        opsets: dict[str, int] = {}
        for op in proto.opset_import:
            opsets[_norm_domain(op.domain)] = op.version
        importer = _Importer(base_dir)
        with gc_paused():
            graph = importer.graph(proto.graph, {})
        graph.opset = opsets.get("", graph.opset)
        graph.ir_version = proto.ir_version
        return cls(
            graph,
            ir_version=proto.ir_version,
            opset_imports=opsets,
            functions=list(proto.functions),
            base_dir=base_dir,
            source_path=source_path,
            producer_name=proto.producer_name,
            producer_version=proto.producer_version,
            domain=proto.domain,
            model_version=proto.model_version,
            doc_string=proto.doc_string,
            metadata_props=[(p.key, p.value) for p in proto.metadata_props],
            training_info=list(proto.training_info),
            configuration=list(proto.configuration),
            present_fields={f for f in _MODEL_FIELDS if proto.HasField(f)},
        )

    # ---- exporting -------------------------------------------------------------------

    def to_proto(self) -> onnx.ModelProto:
        """The model as a ``ModelProto``. Tensors still in external files stay external
        (their locations are relative to :attr:`base_dir`)."""
        with gc_paused():
            exporter = _Exporter(_place_new_constants(self.graph))
            graph_proto = exporter.graph(self.graph, set())
        proto = onnx.ModelProto()
        proto.ir_version = self.ir_version
        for name in _MODEL_FIELDS:
            value = getattr(self, name)
            if value or name in self.present_fields:
                setattr(proto, name, value)
        proto.graph.CopyFrom(graph_proto)
        used = exporter.domains | {_norm_domain(f.domain) for f in self.functions}
        opsets = dict(self.opset_imports)
        for domain in sorted(used - set(opsets)):
            opsets[domain] = 1 if domain else self.graph.opset
        for domain, version in opsets.items():
            proto.opset_import.add(domain=domain, version=version)
        proto.functions.extend(self.functions)
        for key, value in self.metadata_props:
            proto.metadata_props.add(key=key, value=value)
        proto.training_info.extend(self.training_info)
        proto.configuration.extend(self.configuration)
        return proto

    def to_bytes(self) -> bytes:
        """Serialized model, deterministic. External tensors must be inline for this to
        be loadable on its own: see :meth:`has_external_data`."""
        return self.to_proto().SerializeToString(deterministic=True)

    def copy(self) -> Model:
        """An independent copy (a snapshot: passes on one do not affect the other)."""
        return Model.from_proto(self.to_proto(), base_dir=self.base_dir,
                                source_path=self.source_path)

    def constants(self) -> Iterator[gs.Constant]:
        """Every constant tensor once: initializers (subgraphs too) and Constant-node values."""
        seen: set[int] = set()
        for g in iter_graphs(self.graph):
            yield from _graph_constants(g, seen)
            for node in g.nodes:
                for value in node.attrs.values():
                    if isinstance(value, gs.Constant) and id(value) not in seen:
                        seen.add(id(value))
                        yield value

    def restore(self, snapshot: Model) -> None:
        """Make this model the snapshot again (rollback of a failed pass)."""
        self.__dict__.update(snapshot.copy().__dict__)

    def has_external_data(self) -> bool:
        """Whether any tensor still reads its data from an external file."""
        return any(isinstance(t._values, ExternalValues) for t in self.constants())

    def check_output_path(self, path: str | os.PathLike) -> None:
        """Raise :class:`ModelSaveError` unless ``path`` can take this model: its folder
        exists and is writable, it is not a folder, and it is not the model's own source
        (call it before long work, so that a bad output path fails at once)."""
        path = Path(path)
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise ModelSaveError(f"{path}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise ModelSaveError(f"{path}: folder {folder} is not writable")
        if path.is_dir():
            raise ModelSaveError(f"{path}: is a folder")
        if self.source_path and str(path.resolve()) == self.source_path:
            raise ModelSaveError(f"{path}: is the input model; write the output elsewhere")

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None,
             location: str | None = None) -> Path:
        """Write the model to ``path`` atomically and deterministically.

        ``external_data``: ``None`` (default) writes external data only when the tensors
        pass 2 GB; ``True`` always; ``False`` never (tensors read from external files are
        inlined). ``location`` is the data file's name, beside the model
        (default ``<file name>.data``). Nothing is left at ``path`` if writing fails.
        """
        path = Path(path)
        self.check_output_path(path)
        folder = path.parent if str(path.parent) else Path(".")
        target = str(path.resolve())
        if external_data is None:
            external_data = self.tensor_bytes() > EXTERNAL_DATA_THRESHOLD
        location = location or (path.name + ".data")
        if external_data:
            if os.path.basename(location) != location or location in ("", ".", ".."):
                raise ModelSaveError(f"external data location must be a plain file name: {location!r}")
            data_target = os.path.join(str(folder.resolve()), location)
            if data_target in self._source_data_files():
                raise ModelSaveError(f"{location}: is the input model's external data; "
                                     "write the output elsewhere")
        proto = self.to_proto()
        tmp_files: list[str] = []
        try:
            if external_data:
                data_tmp = _tmp_name(folder, location)
                tmp_files.append(data_tmp)
                self._write_external(proto, data_tmp, location)
            else:
                self._inline_external(proto)
            if proto.ByteSize() >= 2**31:
                raise ModelSaveError(
                    f"{path}: the model is over 2 GB; save it with external data")
            model_tmp = _tmp_name(folder, path.name)
            tmp_files.append(model_tmp)
            with open(model_tmp, "wb") as f:
                f.write(proto.SerializeToString(deterministic=True))
            if external_data:
                os.replace(data_tmp, data_target)
            os.replace(model_tmp, target)
        except OSError as exc:
            raise ModelSaveError(f"{path}: cannot write ({exc.strerror or exc})") from exc
        finally:
            for tmp in tmp_files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        return path

    def _source_data_files(self) -> set[str]:
        found = set()
        for t in self.constants():
            if isinstance(t._values, ExternalValues):
                loc = _external_info(t._values.tensor)["location"]
                found.add(os.path.realpath(os.path.join(t._values.base_dir, loc)))
        return found

    def _write_external(self, proto: onnx.ModelProto, data_path: str, location: str) -> None:
        """Move every tensor of at least 1 KiB into ``data_path``, copying external data
        file-to-file so that a large model is never held twice in memory."""
        base = self.base_dir or ""
        with open(data_path, "wb") as out:
            for tensor in _all_tensor_protos(proto):
                ext = tensor.data_location == onnx.TensorProto.EXTERNAL
                if not ext and (not tensor.HasField("raw_data")
                                or len(tensor.raw_data) < EXTERNAL_MIN_TENSOR_BYTES):
                    continue
                offset = out.tell()
                pad = (-offset) % _ALIGN
                if pad:
                    out.write(b"\0" * pad)
                    offset += pad
                if ext:
                    info = _external_info(tensor)
                    length = _copy_external(os.path.join(base, info["location"]),
                                            int(info.get("offset", 0)), info.get("length"), out)
                else:
                    out.write(tensor.raw_data)
                    length = len(tensor.raw_data)
                    tensor.ClearField("raw_data")
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", location), ("offset", str(offset)),
                                   ("length", str(length))):
                    tensor.external_data.add(key=key, value=value)

    def _inline_external(self, proto: onnx.ModelProto) -> None:
        base = self.base_dir or ""
        for tensor in _all_tensor_protos(proto):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = _external_info(tensor)
                with open(os.path.join(base, info["location"]), "rb") as f:
                    f.seek(int(info.get("offset", 0)))
                    length = info.get("length")
                    tensor.raw_data = f.read(int(length)) if length is not None else f.read()
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT

    # ---- figures ---------------------------------------------------------------------

    def tensor_bytes(self) -> int:
        """Bytes of every constant tensor (initializers and Constant nodes, subgraphs too)."""
        return self.summary().tensor_bytes

    def summary(self) -> ModelSummary:
        nodes_total = inits = subgraphs = 0
        seen: set[int] = set()
        for g in iter_graphs(self.graph):
            subgraphs += g is not self.graph
            nodes_total += len(g.nodes)
            inits += len(_graph_constants(g, seen))
        params = nbytes = 0
        for t in self.constants():
            params += int(np.prod(t.shape)) if t.shape is not None else 0
            nbytes += tensor_nbytes(t)
        return ModelSummary(len(self.graph.nodes), nodes_total, inits, params, nbytes, subgraphs)

    def __repr__(self) -> str:
        s = self.summary()
        return (f"Model({self.graph.name!r}, ir={self.ir_version}, opset={self.opset_imports}, "
                f"nodes={s.nodes_total}, initializers={s.initializers})")


# --------------------------------------------------------------------------------------
# Import: ModelProto -> gs.Graph
# --------------------------------------------------------------------------------------

_SIMPLE_ATTRS = {
    onnx.AttributeProto.FLOAT: "f",
    onnx.AttributeProto.INT: "i",
    onnx.AttributeProto.FLOATS: "floats",
    onnx.AttributeProto.INTS: "ints",
}


def _norm_domain(domain: str | None) -> str:
    return "" if domain in (None, "", "ai.onnx") else domain


class _Importer:
    def __init__(self, base_dir: str | None):
        self.base_dir = base_dir

    def constant(self, proto: onnx.TensorProto | onnx.SparseTensorProto) -> gs.Constant:
        if isinstance(proto, onnx.SparseTensorProto):
            return gs.Constant(proto.values.name, values=SparseValues(proto))
        if proto.data_location == onnx.TensorProto.EXTERNAL:
            values: LazyValues = ExternalValues(proto, self.base_dir or "")
        else:
            values = LazyValues(proto)
        loc = int(proto.data_location) if proto.HasField("data_location") else None
        const = gs.Constant(proto.name, values=values, data_location=loc)
        if proto.doc_string:
            const.doc_string = proto.doc_string
        return const

    def graph(self, proto: onnx.GraphProto, outer) -> gs.Graph:
        local: dict[str, gs.Tensor] = {}
        scope = ChainMap(local, outer)
        used: set[str] = set()

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
            t = local.get(vi.name)
            if t is None:
                t = local[vi.name] = gs.Variable(vi.name)
            if isinstance(t, gs.Variable):
                _apply_value_info(t, vi)

        inputs = []
        for vi in proto.input:
            t = local.get(vi.name)
            if t is None:
                t = local[vi.name] = gs.Variable(vi.name)
            if isinstance(t, gs.Variable):
                _apply_value_info(t, vi)
            else:
                t.input_value_info = vi
            inputs.append(t)
            used.add(vi.name)

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
                t = local.get(name)
                if t is None:
                    t = local[name] = gs.Variable(name)
                used.add(name)
                outs.append(t)
            node.outputs = outs
            node.attr_types = {a.name: a.type for a in np_.attribute}
            if np_.doc_string:
                node.doc_string = np_.doc_string
            if np_.metadata_props:
                node.metadata_props = [(p.key, p.value) for p in np_.metadata_props]
            if getattr(np_, "overload", ""):
                node.overload = np_.overload
            nodes.append(node)

        outputs = []
        for vi in proto.output:
            t = lookup(vi.name)
            if isinstance(t, gs.Variable):
                _apply_value_info(t, vi)
            else:
                t.output_value_info = vi
            outputs.append(t)

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
    def __init__(self, placement: dict[int, list[gs.Constant]] | None = None):
        self.domains: set[str] = set()
        self.placement = placement or {}

    def graph(self, g: gs.Graph, outer: set[str]) -> onnx.GraphProto:
        ext = extras(g)
        proto = onnx.GraphProto()
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

        for t in constants:
            values = t._values
            if isinstance(values, SparseValues):
                sp = proto.sparse_initializer.add()
                sp.CopyFrom(values.tensor)
                sp.values.name = t.name
            else:
                proto.initializer.append(_tensor_proto(t))

        io_ids = {id(t) for t in g.inputs} | {id(t) for t in g.outputs}
        vi_seen: set[int] = set()
        for node in g.nodes:
            proto.node.append(self.node(node, defined))
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

    def node(self, node: gs.Node, scope: set[str]) -> onnx.NodeProto:
        p = onnx.NodeProto()
        p.op_type = node.op
        if node.name:
            p.name = node.name
        if node.domain is not None:
            p.domain = node.domain
        self.domains.add(_norm_domain(node.domain))
        p.input.extend(t.name for t in node.inputs)
        p.output.extend(t.name for t in node.outputs)
        types = vars(node).get("attr_types", {})
        for key, value in node.attrs.items():
            p.attribute.append(self.attribute(key, value, types.get(key), scope))
        doc = vars(node).get("doc_string")
        if doc:
            p.doc_string = doc
        for key, value in vars(node).get("metadata_props", []):
            p.metadata_props.add(key=key, value=value)
        overload = vars(node).get("overload")
        if overload:
            p.overload = overload
        return p

    def attribute(self, key: str, value: Any, attr_type: int | None, scope: set[str]):
        A = onnx.AttributeProto
        if isinstance(value, RawAttribute):
            return value.proto
        if isinstance(value, gs.Graph):
            a = A(name=key, type=A.GRAPH)
            a.g.CopyFrom(self.graph(value, scope))
            return a
        if isinstance(value, list) and value and isinstance(value[0], gs.Graph):
            a = A(name=key, type=A.GRAPHS)
            a.graphs.extend(self.graph(v, scope) for v in value)
            return a
        if isinstance(value, gs.Constant):
            a = A(name=key, type=A.TENSOR)
            a.t.CopyFrom(_tensor_proto(value))
            return a
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        if attr_type is not None:
            try:
                return onnx.helper.make_attribute(key, value, attr_type=attr_type)
            except (TypeError, ValueError):
                pass  # the pass changed the value's kind: infer it below
        if isinstance(value, list) and not value:
            raise ModelSaveError(f"attribute '{key}' is an empty list of unknown type")
        return onnx.helper.make_attribute(key, value)


def _tensor_proto(t: gs.Constant) -> onnx.TensorProto:
    values = t._values
    if isinstance(values, LazyValues) and not isinstance(values, SparseValues):
        proto = onnx.TensorProto()
        proto.CopyFrom(values.tensor)
        proto.name = t.name
        return proto
    arr = np.asarray(values)
    proto = numpy_helper.from_array(arr, t.name)
    doc = vars(t).get("doc_string")
    if doc:
        proto.doc_string = doc
    return proto


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


def _graph_constants(g: gs.Graph, seen: set[int]) -> list[gs.Constant]:
    """The initializers a graph owns: listed ones, then constants its nodes use that are
    not listed (created by passes). ``seen`` holds the ids of constants owned by enclosing
    graphs (visit outer graphs first); it is updated."""
    out: list[gs.Constant] = []
    for t in extras(g).initializers:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    for node in g.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant) and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    for t in list(g.inputs) + list(g.outputs):
        if isinstance(t, gs.Constant) and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


# --------------------------------------------------------------------------------------
# External data and file helpers
# --------------------------------------------------------------------------------------


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    if not data:
        raise ModelLoadError(f"{where}: empty file, not an ONNX model")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as exc:
        raise ModelLoadError(f"{where}: not an ONNX model or truncated ({exc})") from exc
    except Exception as exc:  # protobuf raises RuntimeError for some corrupt inputs
        raise ModelLoadError(f"{where}: not an ONNX model ({exc})") from exc
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise ModelLoadError(f"{where}: not an ONNX model (no graph or IR version)")
    return proto


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _proto_data_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        length = _external_info(tensor).get("length")
        return int(length) if length is not None else 0
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:
        itemsize = 4
    return int(np.prod(tensor.dims)) * itemsize if tensor.dims else itemsize


def _all_tensor_protos(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    def from_graph(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        for node in g.node:
            yield from from_attrs(node.attribute)

    def from_attrs(attrs) -> Iterator[onnx.TensorProto]:
        for a in attrs:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("sparse_tensor"):
                yield a.sparse_tensor.values
                yield a.sparse_tensor.indices
            if a.HasField("g"):
                yield from from_graph(a.g)
            for sub in a.graphs:
                yield from from_graph(sub)

    yield from from_graph(proto.graph)
    for f in proto.functions:
        for node in f.node:
            yield from from_attrs(node.attribute)


def _check_external_data(proto: onnx.ModelProto, base_dir: str | None, where: str) -> None:
    sizes: dict[str, int] = {}
    for tensor in _all_tensor_protos(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = _external_info(tensor)
        location = info.get("location", "")
        if not location:
            raise ModelLoadError(f"{where}: tensor '{tensor.name}' has external data without a location")
        if base_dir is None:
            raise ModelLoadError(
                f"{where}: tensor '{tensor.name}' has external data but the model's folder is unknown")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
            raise UnsafePathError(
                f"{where}: external data location '{location}' of tensor '{tensor.name}' is absolute")
        full = os.path.realpath(os.path.join(base_dir, location))
        root = os.path.realpath(base_dir)
        if os.path.commonpath([full, root]) != root:
            raise UnsafePathError(
                f"{where}: external data location '{location}' of tensor '{tensor.name}' "
                "leaves the model's folder")
        if full not in sizes:
            if not os.path.isfile(full):
                raise ModelLoadError(
                    f"{where}: external data file '{location}' of tensor '{tensor.name}' is missing")
            sizes[full] = os.path.getsize(full)
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else sizes[full] - offset
        except ValueError as exc:
            raise ModelLoadError(
                f"{where}: tensor '{tensor.name}' has a malformed external data offset/length") from exc
        if offset < 0 or length < 0 or offset + length > sizes[full]:
            raise ModelLoadError(
                f"{where}: external data of tensor '{tensor.name}' runs past the end of '{location}'")


def _copy_external(src: str, offset: int, length: str | None, out) -> int:
    copied = 0
    with open(src, "rb") as f:
        f.seek(offset)
        remaining = int(length) if length is not None else None
        while remaining is None or remaining > 0:
            chunk = f.read(_COPY_CHUNK if remaining is None else min(_COPY_CHUNK, remaining))
            if not chunk:
                break
            out.write(chunk)
            copied += len(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return copied


def _tmp_name(folder: Path, name: str) -> str:
    """A fresh temporary file beside the target, with the permissions a plain ``open``
    would give (mkstemp makes it private, 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=str(folder))
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
