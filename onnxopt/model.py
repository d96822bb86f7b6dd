"""Model: an ONNX model as an onnx-graphsurgeon graph plus what graphsurgeon does not carry.

Passes mutate ``model.graph`` (a ``gs.Graph``). Everything else a ``ModelProto`` holds —
opset imports, IR version, producer, metadata, local functions, training info, node doc
strings and metadata, the exact attribute types, initializers that nobody uses yet,
initializers that are also graph inputs (IR < 4), value_info — is kept here or on the
graph objects, so that ``Model.load(p).save(q)`` loses nothing. Weight data stays lazy:
a tensor that no pass reads is never decoded, and external data is copied file-to-file
on save.

A weight is held in memory once: loading a file takes the bytes of its large tensors out
of the parsed proto (see :mod:`onnxopt.model_files`), a copy of the model shares them,
and a save streams them to the file instead of assembling the serialized model first.

Saving is atomic (temporary files in the target folder, then rename) and deterministic
(the same model and options give the same bytes). Models whose tensors pass 2 GB are
saved with external data automatically.

This module holds the ``Model`` itself; the work behind it lives beside it, and the
names the rest of the code imports from here are re-exported:

- :mod:`onnxopt.graph_extras` — what the graphs carry beyond graphsurgeon, and the
  helpers that walk nested graphs (``extras``, ``iter_graphs``, ``node_subgraphs``,
  ``tensor_nbytes``, ``gc_paused``);
- :mod:`onnxopt.proto_convert` — ``GraphProto`` to ``gs.Graph`` and back;
- :mod:`onnxopt.model_files` — external data checks, copying and inlining, and the
  temporary files behind atomic writes.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from .errors import ModelLoadError, ModelSaveError
from .graph_extras import (
    GraphExtras,
    RawAttribute,
    extras,
    gc_paused,
    iter_graphs,
    node_subgraphs,
    tensor_nbytes,
)
from .model_files import (
    ExternalValues,
    check_external_data,
    check_text,
    external_info,
    inline_external_data,
    parse_model_bytes,
    spliced_chunks,
    temp_file_beside,
    write_external_data,
)
from .model_files import temp_file_beside as _tmp_name  # noqa: F401  (onnxopt.report imports this name)
from .proto_convert import graph_from_proto, graph_to_proto, hold_apart, norm_domain

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
    @gc_paused()  # parsing and walking a large proto makes many objects at once
    def load(cls, source: str | os.PathLike | bytes | onnx.ModelProto, *,
             base_dir: str | os.PathLike | None = None) -> Model:
        """Load a model from a file path, serialized bytes or a ``ModelProto``.

        External data is resolved relative to the model's folder (or ``base_dir``) and
        read only when a pass needs the values. A location that is absolute, leaves the
        folder (``../x`` or a symlink pointing out) or points past the end of its file
        raises :class:`UnsafePathError` / :class:`ModelLoadError`.
        """
        source_path = None
        owned = not isinstance(source, onnx.ModelProto)  # a caller's proto is never modified
        if isinstance(source, onnx.ModelProto):
            proto = source
        elif isinstance(source, (bytes, bytearray, memoryview)):
            proto = parse_model_bytes(bytes(source), "<bytes>")
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
            proto = parse_model_bytes(data, str(path))
            del data  # the proto holds its own copy
            source_path = str(path.resolve())
            if base_dir is None:
                base_dir = str(path.resolve().parent)
        else:
            raise TypeError(f"cannot load a model from {type(source).__name__}")
        base = str(Path(base_dir).resolve()) if base_dir is not None else None
        check_text(proto, source_path or "<model>")
        check_external_data(proto, base, source_path or "<model>")
        held = None
        if owned:
            proto, held = _hold_apart(proto)
        return cls.from_proto(proto, base_dir=base, source_path=source_path, held=held)

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, *, base_dir: str | None = None,
                   source_path: str | None = None, held: list | None = None) -> Model:
        """The model of ``proto``, whose tensors the model reads lazily (keep it unchanged).
        ``held`` is for protos of this module's own making (see :mod:`onnxopt.model_files`)."""
        if not proto.HasField("graph"):
            raise ModelLoadError(f"{source_path or '<model>'}: not an ONNX model (no graph)")
        opsets: dict[str, int] = {}
        for op in proto.opset_import:
            opsets[norm_domain(op.domain)] = op.version
        with gc_paused():
            graph = graph_from_proto(proto.graph, base_dir, held)
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

    def to_proto(self, *, weights_as_inputs: Callable[[gs.Constant, bool], bool] | None = None
                 ) -> onnx.ModelProto:
        """The model as a ``ModelProto``. Tensors still in external files stay external
        (their locations are relative to :attr:`base_dir`).

        ``weights_as_inputs(tensor, in_top_graph)``: initializers for which it is true are
        written as graph inputs of their type and shape, without their data — what an analysis such as
        shape inference needs, without copying the weights (see
        :func:`onnxopt.proto_convert.constant_type` and ``constant_data_bytes``)."""
        return self._to_proto(None, weights_as_inputs)

    def _to_proto(self, held: list | None, as_input: Callable[[gs.Constant, bool], bool] | None = None
                  ) -> onnx.ModelProto:
        """:meth:`to_proto`; with ``held``, large tensors are markers appended to it."""
        proto = onnx.ModelProto()
        proto.ir_version = self.ir_version
        for name in _MODEL_FIELDS:
            value = getattr(self, name)
            if value or name in self.present_fields:
                setattr(proto, name, value)
        with gc_paused():
            _, domains = graph_to_proto(self.graph, proto.graph, held=held, as_input=as_input)
        used = domains | {norm_domain(f.domain) for f in self.functions}
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
        held: list = []
        chunks, _ = spliced_chunks(self._to_proto(held).SerializeToString(deterministic=True), held)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def copy(self) -> Model:
        """An independent copy (a snapshot: passes on one do not affect the other). Weight
        bytes that neither can change are shared, not copied."""
        held: list = []
        return Model.from_proto(self._to_proto(held), base_dir=self.base_dir,
                                source_path=self.source_path, held=held)

    def constants(self) -> Iterator[gs.Constant]:
        """Every constant tensor once: initializers (subgraphs too) and Constant-node values."""
        seen: set[int] = set()
        for g in iter_graphs(self.graph):
            yield from _graph_constants(g, seen)
            for value in _attribute_constants(g):
                if id(value) not in seen:
                    seen.add(id(value))
                    yield value

    def analysis(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, or what it gave for this same model state.

        A state is known to be the same only between the passes of a
        :class:`~onnxopt.manager.PassManager` run that changed nothing: the manager names
        each state (:meth:`settle`). Within one pass an analysis is reused at most on its
        first use, since the pass may have changed the model before asking again; outside
        a run nothing is reused."""
        state = self.__dict__.get("_state")
        if state is None:
            return compute()
        asked = self.__dict__.setdefault("_asked", set())
        if key in asked:
            return compute()
        asked.add(key)
        found = self.__dict__.setdefault("_analyses", {}).get(key)
        if found is not None and found[0] is state:
            return found[1]
        value = compute()
        self._analyses[key] = (state, value)
        return value

    def settle(self, state: object | None) -> None:
        """Name the model's state before a pass runs (a new object once the model
        changed, the same one while it did not); None forgets every analysis."""
        if state is None:
            for key in ("_state", "_asked", "_analyses"):
                self.__dict__.pop(key, None)
            return
        self._state = state
        self._asked = set()

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

    @gc_paused()
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
        held: list = []
        proto = self._to_proto(held)
        tmp_files: list[str] = []
        try:
            if external_data:
                data_tmp = temp_file_beside(folder, location)
                tmp_files.append(data_tmp)
                write_external_data(proto, self.base_dir or "", data_tmp, location, held)
            else:
                inline_external_data(proto, self.base_dir or "")
            chunks, total = spliced_chunks(proto.SerializeToString(deterministic=True), held)
            if total >= 2**31:
                raise ModelSaveError(
                    f"{path}: the model is over 2 GB; save it with external data")
            model_tmp = temp_file_beside(folder, path.name)
            tmp_files.append(model_tmp)
            with open(model_tmp, "wb") as f:
                for chunk in chunks:  # the weights go from where they are held to the file
                    f.write(chunk)
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
                loc = external_info(t._values.tensor)["location"]
                found.add(os.path.realpath(os.path.join(t._values.base_dir, loc)))
        return found

    # ---- figures ---------------------------------------------------------------------

    def tensor_bytes(self) -> int:
        """Bytes of every constant tensor (initializers and Constant nodes, subgraphs too)."""
        return self.summary().tensor_bytes

    def summary(self) -> ModelSummary:
        """The counts, in one walk: initializers as :func:`_graph_constants` finds them,
        parameters and bytes over :meth:`constants` (which adds Constant-node values)."""
        nodes_total = inits = subgraphs = params = nbytes = 0
        owned: set[int] = set()  # what _graph_constants gives: the initializer count
        seen: set[int] = set()  # what constants() gives: the figures
        for g in iter_graphs(self.graph):
            subgraphs += g is not self.graph
            nodes_total += len(g.nodes)
            for t in _constant_candidates(g):
                if id(t) not in owned:
                    owned.add(id(t))
                    inits += 1
                if id(t) not in seen:
                    seen.add(id(t))
                    params += int(math.prod(t.shape)) if t.shape is not None else 0
                    nbytes += tensor_nbytes(t)
            for t in _attribute_constants(g):
                if id(t) not in seen:
                    seen.add(id(t))
                    params += int(math.prod(t.shape)) if t.shape is not None else 0
                    nbytes += tensor_nbytes(t)
        return ModelSummary(len(self.graph.nodes), nodes_total, inits, params, nbytes, subgraphs)

    def __repr__(self) -> str:
        s = self.summary()
        return (f"Model({self.graph.name!r}, ir={self.ir_version}, opset={self.opset_imports}, "
                f"nodes={s.nodes_total}, initializers={s.initializers})")


#: Below this many bytes held apart, the proto they came from is kept as it is.
_REPARSE_MIN_BYTES = 1 << 20


def _hold_apart(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list | None]:
    """``proto`` (ours) with its large tensors held apart, and the held bytes. The parsed
    proto keeps the memory of the bytes taken out of it as long as it lives, so when they
    are many it is replaced by a parse of its own (now small) serialization."""
    held = hold_apart(proto)
    if not held:
        return proto, None
    if sum(len(b) for b in held) >= _REPARSE_MIN_BYTES:
        small = onnx.ModelProto()
        small.ParseFromString(proto.SerializeToString())
        proto = small
    return proto, held


def _graph_constants(g: gs.Graph, seen: set[int]) -> list[gs.Constant]:
    """The initializers a graph owns: listed ones, then constants its nodes use that are
    not listed (created by passes). ``seen`` holds the ids of constants owned by enclosing
    graphs (visit outer graphs first); it is updated."""
    out: list[gs.Constant] = []
    for t in _constant_candidates(g):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _constant_candidates(g: gs.Graph) -> Iterator[gs.Constant]:
    """What :func:`_graph_constants` looks at, in order, repeats included."""
    yield from extras(g).initializers
    for node in g.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant):
                yield t
    for t in itertools.chain(g.inputs, g.outputs):
        if isinstance(t, gs.Constant):
            yield t


def _attribute_constants(g: gs.Graph) -> Iterator[gs.Constant]:
    """The constants held by the attributes of ``g``'s nodes (Constant-node values)."""
    for node in g.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Constant):
                yield value
