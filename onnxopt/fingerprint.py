"""Content identity of constant tensors, without decoding them.

Two constants hold the same value when they have the same element type, the same shape
and the same bytes. :func:`signature` gives the first two (and how the bytes are laid
out) from the ``TensorProto`` header alone, so that a pass can group candidates before
reading any data; :func:`content_bytes` gives the bytes — the ``raw_data`` of the proto
as stored, the external file's bytes, or the little-endian bytes of a numpy array — and
:func:`fingerprint` a short digest of both to use as a dictionary key.

Bytes are compared, not values: ``0.0`` and ``-0.0`` differ, two NaNs with the same bits
are the same. Values are never decoded to numpy where the stored bytes will do, so
exotic element types (bfloat16, float8, 4-bit) are compared exactly as stored and never
cast (graphsurgeon casts types numpy lacks when ``Constant.values`` is read).
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from .model_files import ExternalValues, InlineValues

__all__ = ["signature", "content_bytes", "fingerprint", "array_signature"]

_T = onnx.TensorProto
#: Element types narrower than a byte: packed two (or more) to a byte in ``raw_data`` but
#: one per element once decoded, so packed and decoded forms are never compared.
_SUB_BYTE = {getattr(_T, n) for n in ("UINT4", "INT4", "FLOAT4E2M1", "UINT2", "INT2",
                                      "FLOAT6E2M3", "FLOAT6E3M2") if hasattr(_T, n)}

Signature = tuple  # (element type, shape, layout)


def _proto_layout(proto: onnx.TensorProto) -> str:
    if proto.data_type not in _SUB_BYTE:
        return "std"
    if proto.data_location == _T.EXTERNAL or proto.HasField("raw_data"):
        return "packed"
    return "typed"


def array_signature(arr: np.ndarray) -> Signature | None:
    """The signature of a numpy value (None for a dtype ONNX cannot name)."""
    if arr.dtype == object:
        return (_T.STRING, tuple(arr.shape), "std")
    try:
        elem = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
    except (KeyError, TypeError, ValueError):
        return None
    return (elem, tuple(arr.shape), "array" if elem in _SUB_BYTE else "std")


def signature(tensor: gs.Constant | np.ndarray) -> Signature | None:
    """(element type, shape, layout) of a constant, read from its header only; None for
    sparse constants and values ONNX has no type for."""
    if isinstance(tensor, np.ndarray):
        return array_signature(tensor)
    values = tensor._values
    if isinstance(values, SparseValues):
        return None
    if isinstance(values, InlineValues):  # raw bytes held apart from the header
        h = values.header
        return (int(h.data_type), tuple(int(d) for d in h.dims), "packed" if h.data_type in _SUB_BYTE else "std")
    if isinstance(values, LazyValues):
        proto = values.tensor
        return (int(proto.data_type), tuple(int(d) for d in proto.dims), _proto_layout(proto))
    return array_signature(np.asarray(values))


def _strings(items) -> bytes:
    parts = []
    for s in items:
        b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
        parts.append(len(b).to_bytes(8, "little"))
        parts.append(b)
    return b"".join(parts)


def _array_bytes(arr: np.ndarray) -> bytes:
    if arr.dtype == object:
        return _strings(arr.reshape(-1).tolist())
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr.tobytes()


def content_bytes(tensor: gs.Constant | np.ndarray) -> bytes:
    """The bytes of a constant as :func:`signature` lays them out (see the module doc).
    Reads an external file or decodes typed proto fields only when called."""
    if isinstance(tensor, np.ndarray):
        return _array_bytes(tensor)
    values = tensor._values
    if isinstance(values, SparseValues):
        raise TypeError(f"sparse constant '{tensor.name}' has no dense bytes")
    if isinstance(values, ExternalValues):
        return values.read_bytes()
    if isinstance(values, InlineValues):  # the raw bytes as stored, held apart from the proto
        return values.raw
    if isinstance(values, LazyValues):
        proto = values.tensor
        if proto.HasField("raw_data"):
            return proto.raw_data
        if proto.data_type == _T.STRING:
            return _strings(proto.string_data)
        if proto.data_type in _SUB_BYTE:
            # packed types stored unpacked in int32_data: compare that field as stored
            return np.asarray(proto.int32_data, dtype="<i4").tobytes()
        return _array_bytes(np.asarray(numpy_helper.to_array(proto)))
    return _array_bytes(np.asarray(values))


def fingerprint(tensor: gs.Constant | np.ndarray) -> tuple | None:
    """``signature + (byte length, 128-bit BLAKE2b digest of the bytes)``: equal
    fingerprints mean equal contents with overwhelming probability (compare
    :func:`content_bytes` to be certain). None where :func:`signature` is None."""
    sig = signature(tensor)
    if sig is None:
        return None
    data = content_bytes(tensor)
    return sig + (len(data), hashlib.blake2b(data, digest_size=16).digest())
