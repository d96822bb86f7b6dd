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

Large tensors stored inside the model file are *held apart* once it is parsed: their
bytes leave the proto and stay in one bytes object each (:class:`InlineValues`), and the
proto that remains is small. Where a whole model has to pass through a proto again (a
copy, a save, a serialization), each such tensor is written as a short *marker* that
names an entry of a ``held`` list; a copy takes the entries back without copying them,
and :func:`spliced_chunks` puts their bytes where the markers stand in the serialized
proto, so that a model is written to disk without ever being assembled in memory. The
bytes written are those protobuf itself would write for the complete proto.
"""

from __future__ import annotations

import bisect
import os
import sys
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
    "HELD_APART_MIN_BYTES",
    "ExternalValues",
    "InlineValues",
    "all_tensor_protos",
    "check_external_data",
    "check_text",
    "external_info",
    "held_data",
    "held_index",
    "held_marker",
    "inline_external_data",
    "parse_model_bytes",
    "proto_data_bytes",
    "spliced_chunks",
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


#: Tensors of at least this many bytes stored inside the model are held apart from the
#: parsed proto (:class:`InlineValues`).
HELD_APART_MIN_BYTES = 64 * 1024

_T = onnx.TensorProto
#: Element types whose ``raw_data`` numpy reads as it is (little-endian, one element per
#: item): decoded here without the round trip through a complete proto.
_PLAIN_NUMPY = {
    _T.FLOAT: np.float32, _T.DOUBLE: np.float64, _T.FLOAT16: np.float16, _T.BOOL: np.bool_,
    _T.INT8: np.int8, _T.INT16: np.int16, _T.INT32: np.int32, _T.INT64: np.int64,
    _T.UINT8: np.uint8, _T.UINT16: np.uint16, _T.UINT32: np.uint32, _T.UINT64: np.uint64,
    _T.COMPLEX64: np.complex64, _T.COMPLEX128: np.complex128,
}


class InlineValues(LazyValues):
    """Lazy values of a tensor stored inside the model file, held apart from the proto.

    ``header`` is the tensor's proto without ``raw_data``; ``raw`` holds those bytes. They
    are decoded on first use like any lazy value; ``tensor`` gives the complete proto (a
    copy, for code that needs one). Instances are never modified, so copies of a model
    share them.
    """

    def __init__(self, header: onnx.TensorProto, raw: bytes):
        # LazyValues.__init__ would read ``tensor``: the same figures, from the header
        from onnx_graphsurgeon.importers.onnx_importer import (
            get_itemsize,
            get_onnx_tensor_dtype,
            get_onnx_tensor_shape,
        )
        from onnx_graphsurgeon.util import misc

        self.header = header
        self.raw = raw
        self.shape = get_onnx_tensor_shape(header)
        self.dtype = get_onnx_tensor_dtype(header)
        self.nbytes = misc.volume(self.shape) * get_itemsize(self.dtype)

    @property
    def tensor(self) -> onnx.TensorProto:
        full = onnx.TensorProto()
        full.CopyFrom(self.header)
        full.raw_data = self.raw
        return full

    @tensor.setter
    def tensor(self, header: onnx.TensorProto) -> None:
        self.header = header

    def load(self) -> np.ndarray:
        h = self.header
        dtype = _PLAIN_NUMPY.get(h.data_type)
        if dtype is None or sys.byteorder != "little" or h.HasField("segment"):
            return super().load()  # through the complete proto, as graphsurgeon does
        return np.frombuffer(self.raw, dtype=dtype).reshape(tuple(h.dims)).copy()


_MARKER = b"\x00onnxopt:held:" + os.urandom(8)  # random: no stored tensor holds it by chance
_MARKER_LEN = len(_MARKER) + 8


def held_marker(index: int) -> bytes:
    """The ``raw_data`` that stands for entry ``index`` of a ``held`` list."""
    return _MARKER + index.to_bytes(8, "little")


def held_index(raw: bytes) -> int | None:
    """The entry a marker names, or None if ``raw`` is not a marker."""
    if len(raw) != _MARKER_LEN or not raw.startswith(_MARKER):
        return None
    return int.from_bytes(raw[len(_MARKER):], "little")


def held_data(entry) -> bytes | memoryview:
    """The bytes an entry of a ``held`` list stands for: the raw bytes of held-apart
    values, or of a lazy proto, or of a numpy array (little-endian, as ``from_array``
    writes them)."""
    if isinstance(entry, InlineValues):
        return entry.raw
    if isinstance(entry, LazyValues):
        return entry.tensor.raw_data
    if isinstance(entry, np.ndarray):
        arr = np.ascontiguousarray(entry)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        return memoryview(arr).cast("B")
    return entry


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def spliced_chunks(data: bytes, held: list) -> tuple[list, int]:
    """The pieces of ``data`` (a serialized proto whose held-apart tensors are markers)
    with every marker replaced by the bytes of its ``held`` entry, and their total length.

    Written one after the other they are exactly the serialization of the complete proto:
    protobuf lays fields out in field-number order whatever they hold, so only the length
    prefixes of the messages enclosing a marker change. Only those messages are walked."""
    positions = []
    at = data.find(_MARKER)
    while at >= 0:
        positions.append(at)
        at = data.find(_MARKER, at + _MARKER_LEN)
    if not positions:
        return [data], len(data)
    view = memoryview(data)
    return _splice(data, view, 0, len(data), positions, held)


def _splice(data: bytes, view: memoryview, start: int, end: int, positions: list[int],
            held: list) -> tuple[list, int]:
    """Chunks and length of the message ``data[start:end]``, markers replaced."""
    chunks: list = []
    total = 0
    run = start  # start of the pending unchanged bytes
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _read_varint(data, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _read_varint(data, pos)
            continue
        if wire == 1:
            pos += 8
            continue
        if wire == 5:
            pos += 4
            continue
        if wire != 2:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        tag_end = pos
        length, body = _read_varint(data, pos)
        pos = body + length
        first = bisect.bisect_left(positions, body)
        if first == len(positions) or positions[first] >= pos:
            continue  # no marker inside: stays in the unchanged run
        if run < field_start:
            chunks.append(view[run:field_start])
            total += field_start - run
        index = held_index(data[body:pos]) if length == _MARKER_LEN and positions[first] == body else None
        if index is not None:
            inner: list = [held_data(held[index])]
            inner_len = len(inner[0])
        else:
            inner, inner_len = _splice(data, view, body, pos, positions, held)
        head = data[field_start:tag_end] + _varint(inner_len)
        chunks.append(head)
        chunks.extend(inner)
        total += len(head) + inner_len
        run = pos
    if run < end:
        chunks.append(view[run:end])
        total += end - run
    return chunks, total


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
                        location: str, held: list | None = None) -> None:
    """Move every tensor of at least 1 KiB into ``data_path``, copying external data
    file-to-file so that a large model is never held twice in memory.

    Tensors already external are read relative to ``base_dir``, markers from ``held``;
    each tensor starts on a 4 KiB boundary and ``proto`` is rewritten to point at
    ``location``."""
    with open(data_path, "wb") as out:
        for tensor in all_tensor_protos(proto):
            ext = tensor.data_location == onnx.TensorProto.EXTERNAL
            raw = tensor.raw_data if not ext and tensor.HasField("raw_data") else b""
            index = held_index(raw) if held is not None else None
            if index is not None:
                raw = held_data(held[index])
            if not ext and len(raw) < EXTERNAL_MIN_TENSOR_BYTES:
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
                out.write(raw)
                length = len(raw)
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
