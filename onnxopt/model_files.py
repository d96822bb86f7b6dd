"""How a model's bytes sit on disk: external data files and atomic writes.

A model over 2 GB keeps its tensors in a separate data file whose locations are taken
from the model itself, so every location is checked on load before anything is read: it
must stay inside the model's folder (no absolute path, no ``..``, no symlink pointing
out) and lie within its file. On save, external tensors are copied file-to-file in
chunks (a large model is never held twice in memory) or inlined on request, and every
file is first written to a temporary file beside its target and then renamed, so a
failed save leaves nothing half-written behind.

:class:`ExternalValues` is the lazy value of a tensor whose data lives in such a file;
graphsurgeon reads it only when a pass asks for the values.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from .errors import ModelLoadError, UnsafePathError

__all__ = [
    "EXTERNAL_MIN_TENSOR_BYTES",
    "ExternalValues",
    "all_tensor_protos",
    "check_external_data",
    "check_text",
    "external_info",
    "inline_external_data",
    "parse_model_bytes",
    "proto_data_bytes",
    "temp_file_beside",
    "write_external_data",
]


#: Tensors smaller than this stay inline when saving with external data.
EXTERNAL_MIN_TENSOR_BYTES = 1024
_ALIGN = 4096
_COPY_CHUNK = 64 * 2**20


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
        info = external_info(self.tensor)
        with open(os.path.join(self.base_dir, info["location"]), "rb") as f:
            f.seek(int(info.get("offset", 0)))
            length = info.get("length")
            return f.read(int(length)) if length is not None else f.read()


def parse_model_bytes(data: bytes, where: str) -> onnx.ModelProto:
    """``data`` parsed as a ``ModelProto``; :class:`ModelLoadError` naming ``where`` if it
    is empty, corrupt or not a model."""
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


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    """A tensor's ``external_data`` entries (location, offset, length ...) as a dict."""
    return {e.key: e.value for e in tensor.external_data}


def proto_data_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor proto's data, inline or external, without reading it."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        length = external_info(tensor).get("length")
        return int(length) if length is not None else 0
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:
        itemsize = 4
    return int(np.prod(tensor.dims)) * itemsize if tensor.dims else itemsize


def all_tensor_protos(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor proto of a model that can hold data: initializers, sparse parts and
    attribute tensors, in subgraphs and local functions too."""
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


# Attribute types whose payload may hold text fields (AttributeProto.AttributeType).
_ATTR_GRAPH, _ATTR_GRAPHS, _ATTR_TENSOR, _ATTR_TENSORS = 5, 10, 4, 9


def check_text(proto: onnx.ModelProto, where: str) -> None:
    """Refuse a model whose names or other text fields are not valid UTF-8
    (:class:`ModelLoadError`, naming the first such field).

    protobuf parses such a field without complaint and hands it over as ``bytes``; every
    later step that treats the name as text (a pass, the report, writing the model back)
    would then fail far from the cause. The walk joins each node's names in one call and
    never touches tensor data, so it costs a few microseconds per node.
    """
    try:
        _text_of_model(proto)
    except TypeError:
        path = _first_bytes_field(proto, "model")
        raise ModelLoadError(f"{where}: not a valid ONNX model: {path or 'a text field'} "
                             "is not valid UTF-8") from None


def _text_of_model(m: onnx.ModelProto) -> None:
    join = "".join
    join((m.producer_name, m.producer_version, m.domain, m.doc_string))
    join([o.domain for o in m.opset_import])
    for p in m.metadata_props:
        join((p.key, p.value))
    _text_of_graph(m.graph)
    for f in m.functions:
        _text_generic(f)
    for t in m.training_info:
        _text_generic(t)


def _text_of_graph(g: onnx.GraphProto) -> None:
    join = "".join
    join((g.name, g.doc_string))
    for n in g.node:
        join(n.input)
        join(n.output)
        join((n.op_type, n.domain, n.name, n.doc_string, n.overload))
        for p in n.metadata_props:
            join((p.key, p.value))
        for a in n.attribute:
            join((a.name, a.ref_attr_name, a.doc_string))
            kind = a.type
            if kind == _ATTR_GRAPH:
                _text_of_graph(a.g)
            elif kind == _ATTR_GRAPHS:
                for sub in a.graphs:
                    _text_of_graph(sub)
            elif kind == _ATTR_TENSOR:
                _text_of_tensor(a.t)
            elif kind == _ATTR_TENSORS:
                for t in a.tensors:
                    _text_of_tensor(t)
            elif kind > _ATTR_GRAPHS:  # sparse tensors, type protos
                _text_generic(a)
    for t in g.initializer:
        _text_of_tensor(t)
    for sp in g.sparse_initializer:
        _text_of_tensor(sp.values)
        _text_of_tensor(sp.indices)
    for values in (g.input, g.output, g.value_info, g.quantization_annotation):
        for v in values:
            _text_generic(v)
    for p in g.metadata_props:
        join((p.key, p.value))


def _text_of_tensor(t: onnx.TensorProto) -> None:
    "".join((t.name, t.doc_string))
    for e in t.external_data:
        "".join((e.key, e.value))


def _text_generic(msg) -> None:
    """Every string field of a small message (value infos, functions), by reflection."""
    for fd, value in msg.ListFields():
        if fd.type == fd.TYPE_STRING:
            "".join(value if fd.is_repeated else (value,))
        elif fd.type == fd.TYPE_MESSAGE:
            for v in (value if fd.is_repeated else (value,)):
                if isinstance(v, onnx.TensorProto):
                    _text_of_tensor(v)
                else:
                    _text_generic(v)


def _first_bytes_field(msg, path: str) -> str | None:
    """The path of the first text field of ``msg`` that protobuf returned as bytes (slow;
    only run once the fast walk found one)."""
    for fd, value in msg.ListFields():
        items = list(value) if fd.is_repeated else [value]
        for i, v in enumerate(items):
            here = f"{path}.{fd.name}" + (f"[{i}]" if fd.is_repeated else "")
            if fd.type == fd.TYPE_STRING and isinstance(v, bytes):
                return f"{here} ({v[:40]!r})"
            if fd.type == fd.TYPE_MESSAGE:
                found = _first_bytes_field(v, here)
                if found:
                    return found
    return None


def check_external_data(proto: onnx.ModelProto, base_dir: str | None, where: str) -> None:
    """Refuse external data that is unsafe or unreadable before anything reads it: a
    location that is absolute or leaves ``base_dir`` (:class:`UnsafePathError`), a missing
    file, or an offset/length outside its file (:class:`ModelLoadError`)."""
    sizes: dict[str, int] = {}
    for tensor in all_tensor_protos(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = external_info(tensor)
        location = info.get("location", "")
        if not location:
            raise ModelLoadError(f"{where}: tensor '{tensor.name}' has external data without a location")
        if base_dir is None:
            raise ModelLoadError(
                f"{where}: tensor '{tensor.name}' has external data but the model's folder is unknown")
        if "\0" in location:
            raise ModelLoadError(f"{where}: external data location of tensor '{tensor.name}' holds a NUL byte")
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


def write_external_data(proto: onnx.ModelProto, base_dir: str, data_path: str,
                        location: str) -> None:
    """Move every tensor of at least 1 KiB into ``data_path``, copying external data
    file-to-file so that a large model is never held twice in memory.

    Tensors already external are read relative to ``base_dir``; each tensor starts on a
    4 KiB boundary and ``proto`` is rewritten to point at ``location``."""
    with open(data_path, "wb") as out:
        for tensor in all_tensor_protos(proto):
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
                info = external_info(tensor)
                length = _copy_external(os.path.join(base_dir, info["location"]),
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


def inline_external_data(proto: onnx.ModelProto, base_dir: str) -> None:
    """Read every external tensor of ``proto`` (relative to ``base_dir``) into the proto."""
    for tensor in all_tensor_protos(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = external_info(tensor)
            with open(os.path.join(base_dir, info["location"]), "rb") as f:
                f.seek(int(info.get("offset", 0)))
                length = info.get("length")
                tensor.raw_data = f.read(int(length)) if length is not None else f.read()
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT


def temp_file_beside(folder: Path, name: str) -> str:
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
