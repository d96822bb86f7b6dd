"""Input feeds: generated from the model's signature, read from ``.npz``/``.npy`` files,
and calibration data streamed sample by sample.

Generated feeds are deterministic (seeded). A dynamic dimension without a value from
``--shape`` gets :data:`DEFAULT_BATCH` when it is the first axis and :data:`DEFAULT_DIM`
otherwise; :func:`resolve_shapes` says which dimensions were defaulted so that the report
can show it. Integer inputs get values in a valid range: below the size of the table they
index when they feed a Gather/Embedding-like op, otherwise in ``[0, DEFAULT_INT_HIGH)``.

Calibration data (:class:`Calibration`) is a re-iterable of feed dicts read lazily: from
a ``.npz`` whose first axis is the samples (read straight from the archive, one sample at
a time, so memory does not grow with the number of samples), from a folder of ``.npz``
files (one feed each, shapes may differ between files), or from any Python iterable.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from numpy.lib import format as npy_format

from .errors import CalibrationError, FeedError, UsageError
from .model import Model

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_DIM",
    "DEFAULT_INT_HIGH",
    "MAX_GENERATED_BYTES",
    "InputSpec",
    "input_specs",
    "parse_shape",
    "resolve_shapes",
    "random_feeds",
    "random_array",
    "load_feeds",
    "check_feeds",
    "Calibration",
    "open_calibration",
]

DEFAULT_BATCH = 1
DEFAULT_DIM = 64
DEFAULT_INT_HIGH = 8
#: Generated feeds larger than this (all inputs together) are refused: a model that
#: declares a huge dimension gets a clear error instead of running out of memory.
MAX_GENERATED_BYTES = 2**30


@dataclass
class InputSpec:
    """A graph input a user feeds: name, numpy dtype and shape (ints, names or None)."""

    name: str
    dtype: np.dtype
    shape: list | None

    def describe(self) -> str:
        dims = "?" if self.shape is None else "x".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype} [{dims}]"


def input_specs(model: Model) -> list[InputSpec]:
    """The inputs a user must feed (initializers listed as inputs are optional and left out)."""
    specs = []
    for t in model.graph.inputs:
        if isinstance(t, gs.Constant):
            continue
        dtype = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
        if t.dtype is not None and not isinstance(t.dtype, np.dtype):
            dtype = np.dtype(t.dtype) if not isinstance(t.dtype, int) else np.dtype(
                onnx.helper.tensor_dtype_to_np_dtype(t.dtype))
        shape = None if t.shape is None else list(t.shape)
        specs.append(InputSpec(t.name, dtype, shape))
    return specs


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``NAME=1x3x224x224`` (``,`` also separates dims)."""
    m = re.fullmatch(r"\s*(.+?)\s*=\s*([0-9xX, ]*)\s*", text)
    if not m:
        raise UsageError(f"--shape {text!r}: expected NAME=DIMxDIMx... (e.g. images=1x3x640x640)")
    dims = [d for d in re.split(r"[xX, ]+", m.group(2)) if d]
    if not dims and m.group(2).strip() not in ("",):
        raise UsageError(f"--shape {text!r}: no dimensions")
    try:
        shape = tuple(int(d) for d in dims)
    except ValueError:
        raise UsageError(f"--shape {text!r}: dimensions must be integers") from None
    if any(d < 0 for d in shape):
        raise UsageError(f"--shape {text!r}: dimensions must not be negative")
    return m.group(1), shape


def resolve_shapes(model: Model, shapes: Mapping[str, Iterable[int]] | None = None
                   ) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Concrete shapes for every fed input, and notes on the dimensions that were defaulted.

    Raises :class:`UsageError` for a shape given for an unknown input, or one that
    contradicts a fixed dimension or the input's rank.
    """
    shapes = dict(shapes or {})
    specs = input_specs(model)
    names = {s.name for s in specs}
    for name in shapes:
        if name not in names:
            raise UsageError(f"--shape names input '{name}', but the model's inputs are: "
                             f"{', '.join(sorted(names)) or '(none)'}")
    symbols: dict[str, int] = {}
    for spec in specs:
        given = shapes.get(spec.name)
        if given is not None and spec.shape is not None:
            given = tuple(given)
            if len(given) != len(spec.shape):
                raise UsageError(f"--shape {spec.name}: rank {len(given)} given, the model's input has "
                                 f"rank {len(spec.shape)} ({spec.describe()})")
            for d, g in zip(spec.shape, given):
                if isinstance(d, int) and d > 0 and d != g:
                    raise UsageError(f"--shape {spec.name}={'x'.join(map(str, given))} contradicts the "
                                     f"model's fixed dimension {d} ({spec.describe()})")
                if isinstance(d, str) and d:
                    symbols.setdefault(d, g)
    out: dict[str, tuple[int, ...]] = {}
    notes: list[str] = []
    for spec in specs:
        if spec.name in shapes:
            out[spec.name] = tuple(shapes[spec.name])
            continue
        if spec.shape is None:
            raise UsageError(f"input '{spec.name}' has no known rank; give --shape {spec.name}=...")
        dims = []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif isinstance(d, str) and d in symbols:
                dims.append(symbols[d])
            else:
                value = DEFAULT_BATCH if axis == 0 else DEFAULT_DIM
                if isinstance(d, str) and d:
                    symbols[d] = value
                dims.append(value)
                notes.append(f"{spec.name}[{axis}] ({d or '?'}) defaulted to {value}")
        out[spec.name] = tuple(dims)
    return out, notes


def _int_high(model: Model, name: str) -> int:
    """An exclusive upper bound for integer values of input ``name`` that keeps the ops
    reading them in range (the smallest table size it indexes)."""
    tensor = next(t for t in model.graph.inputs if t.name == name)
    bound = None
    for node in tensor.outputs:
        if node.op in ("Gather", "GatherElements", "Embedding") and len(node.inputs) > 1 \
                and node.inputs[1] is tensor:
            data = node.inputs[0]
            axis = int(node.attrs.get("axis", 0))
            shape = data.shape
            if shape is not None and len(shape) > abs(axis) and isinstance(shape[axis], int) \
                    and shape[axis] > 0:
                bound = shape[axis] if bound is None else min(bound, shape[axis])
    return bound if bound is not None else DEFAULT_INT_HIGH


def random_feeds(model: Model, shapes: Mapping[str, Iterable[int]] | None = None, *,
                 seed: int = 0) -> tuple[dict[str, np.ndarray], list[str]]:
    """Deterministic random feeds matching the model's signature, and defaulting notes."""
    concrete, notes = resolve_shapes(model, shapes)
    _check_generated_size(input_specs(model), concrete)
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in input_specs(model):
        high = _int_high(model, spec.name) if _integer_range(spec.dtype) else DEFAULT_INT_HIGH
        feeds[spec.name] = random_array(rng, spec.dtype, concrete[spec.name], high)
    return feeds, notes


def _check_generated_size(specs: list[InputSpec], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse feeds that would not fit in memory, before allocating any of them."""
    total = 0
    for spec in specs:
        count = 1
        for d in shapes[spec.name]:
            count *= int(d)
        nbytes = count * max(spec.dtype.itemsize, 1)
        total += nbytes
        if total > MAX_GENERATED_BYTES:
            dims = "x".join(map(str, shapes[spec.name]))
            raise FeedError(f"generated feeds would take {total / 2**30:.3g} GiB (input '{spec.name}' is "
                            f"{dims} {spec.dtype}); give smaller dimensions with --shape or feeds with --inputs")


def _integer_range(dt: np.dtype) -> tuple[int, int] | None:
    """``(min, max)`` of an integer dtype, the 2- and 4-bit ones included; None otherwise."""
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        return int(info.min), int(info.max)
    if dt.kind == "V":  # ml_dtypes' int4/uint4/int2/uint2 (and its floats, which are not integers)
        import ml_dtypes

        try:
            info = ml_dtypes.iinfo(dt)
        except ValueError:
            return None
        return int(info.min), int(info.max)
    return None


def random_array(rng: np.random.Generator, dt: np.dtype, shape: tuple[int, ...],
                 high: int = DEFAULT_INT_HIGH) -> np.ndarray:
    """An array of dtype ``dt`` and shape ``shape`` (rank 0 included: always an
    ``ndarray``, never a numpy scalar, which onnxruntime refuses): booleans half true,
    integers in ``[0, high)`` (within the dtype's range), strings ``"a"``, anything else
    standard-normal values converted from float32."""
    shape = tuple(int(d) for d in shape)
    dt = np.dtype(dt)
    if dt == np.bool_:
        arr = rng.random(shape) < 0.5
    elif (bounds := _integer_range(dt)) is not None:
        arr = rng.integers(0, max(1, min(high, bounds[1] + 1)), size=shape)
    elif dt.kind in "OSU":
        return np.full(shape, "a", dtype=object)
    else:
        arr = rng.standard_normal(shape).astype(np.float32)
    return np.asarray(arr).astype(dt).reshape(shape)


def check_feeds(model: Model, feeds: Mapping[str, np.ndarray], *, what: str = "feeds",
                error: type[FeedError] = FeedError) -> None:
    """Raise ``error`` unless ``feeds`` gives every input, with its dtype and a compatible
    shape, and nothing else."""
    specs = {s.name: s for s in input_specs(model)}
    optional = {t.name for t in model.graph.inputs if isinstance(t, gs.Constant)}
    extra = sorted(set(feeds) - set(specs) - optional)
    if extra:
        raise error(f"{what} give {', '.join(repr(e) for e in extra)}, which the model does not take; "
                    f"its inputs are: {', '.join(sorted(specs)) or '(none)'}")
    missing = sorted(set(specs) - set(feeds))
    if missing:
        raise error(f"{what} lack input {', '.join(repr(m) for m in missing)} "
                    f"({'; '.join(specs[m].describe() for m in missing)})")
    symbols: dict[str, int] = {}
    for name, spec in specs.items():
        arr = np.asarray(feeds[name])
        if arr.dtype != spec.dtype and not (arr.dtype.kind in "OSU" and spec.dtype.kind in "OSU"):
            raise error(f"{what}: input '{name}' must be {spec.dtype}, got {arr.dtype}")
        if spec.shape is None:
            continue
        if arr.ndim != len(spec.shape):
            raise error(f"{what}: input '{name}' must have rank {len(spec.shape)} "
                        f"({spec.describe()}), got shape {list(arr.shape)}")
        for axis, (d, n) in enumerate(zip(spec.shape, arr.shape)):
            if isinstance(d, int) and d > 0 and d != n:
                raise error(f"{what}: input '{name}' has {n} on axis {axis}, the model wants {d} "
                            f"({spec.describe()})")
            if isinstance(d, str) and d and d != "?":  # '?' is an exporter's "unknown", not a name
                if symbols.setdefault(d, n) != n:
                    raise error(f"{what}: dimension '{d}' is {symbols[d]} in one input and {n} "
                                f"in '{name}'")


def load_feeds(path: str | os.PathLike, model: Model) -> dict[str, np.ndarray]:
    """Feeds from a ``.npz`` (keys = input names) or a ``.npy`` (single-input models)."""
    path = Path(path)
    if not path.is_file():
        raise FeedError(f"{path}: no such file")
    try:
        if path.suffix == ".npy":
            specs = input_specs(model)
            if len(specs) != 1:
                raise FeedError(f"{path}: a .npy file can feed a single-input model only; "
                                f"this one has {len(specs)} inputs: use a .npz")
            feeds = {specs[0].name: np.load(path, allow_pickle=False)}
        else:
            with np.load(path, allow_pickle=False) as npz:
                feeds = {k: npz[k] for k in npz.files}
    except FeedError:
        raise
    except Exception as exc:
        raise FeedError(f"{path}: cannot read feeds ({exc})") from exc
    check_feeds(model, feeds, what=str(path))
    return feeds


# --------------------------------------------------------------------------------------
# Calibration data
# --------------------------------------------------------------------------------------


class Calibration:
    """A re-iterable source of feed dicts for passes that calibrate or refit.

    Build one with :func:`open_calibration`. Iterating yields one feed dict per sample;
    ``len()`` is the number of samples. Every sample is checked against the model's
    inputs; a mismatch raises :class:`CalibrationError` naming the sample.
    """

    def __init__(self, model: Model, factory: Callable[[], Iterator[dict]], count: int | None,
                 source: str):
        self._model = model
        self._factory = factory
        self._count = count
        self.source = source

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i, feeds in enumerate(self._factory()):
            feeds = _fit_batch_axis(self._model, feeds)
            check_feeds(self._model, feeds, what=f"calibration sample {i} of {self.source}",
                        error=CalibrationError)
            yield feeds

    def __len__(self) -> int:
        if self._count is None:
            self._count = sum(1 for _ in self._factory())
        return self._count

    def take(self, n: int) -> Calibration:
        """The first ``n`` samples only."""
        parent = self

        def factory() -> Iterator[dict]:
            for i, feeds in enumerate(parent._factory()):
                if i >= n:
                    return
                yield feeds

        count = None if self._count is None else min(n, self._count)
        return Calibration(self._model, factory, count, f"{self.source} (first {n})")

    def __repr__(self) -> str:
        return f"Calibration({self.source}, samples={self._count})"


def _fit_batch_axis(model: Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A sample stored without the model's leading batch axis of 1 gets it back."""
    specs = {s.name: s for s in input_specs(model)}
    out = {}
    for name, arr in feeds.items():
        arr = np.asarray(arr)
        spec = specs.get(name)
        if (spec is not None and spec.shape is not None and arr.ndim == len(spec.shape) - 1
                and (spec.shape[0] in (1, None) or isinstance(spec.shape[0], str) or spec.shape[0] < 1)):
            arr = arr[None]
        out[name] = arr
    return out


def open_calibration(source, model: Model, *, limit: int | None = None) -> Calibration:
    """Calibration data from a ``.npz`` (first axis = samples), a folder of ``.npz`` files
    (one feed each, read in sorted name order), a list of feed dicts, or a callable that
    returns a fresh iterator of feed dicts. The first sample is checked at once."""
    if isinstance(source, Calibration):
        cal = source
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            cal = _folder_calibration(path, model)
        elif path.is_file():
            cal = _npz_calibration(path, model)
        else:
            raise CalibrationError(f"{path}: no such file or folder")
    elif callable(source):
        cal = Calibration(model, source, None, "calibration callable")
    elif isinstance(source, Iterable):
        items = source if isinstance(source, (list, tuple)) else list(source)
        cal = Calibration(model, lambda: iter(items), len(items), f"{len(items)} feed dicts")
    else:
        raise CalibrationError(f"cannot use {type(source).__name__} as calibration data")
    if limit is not None:
        cal = cal.take(limit)
    first = next(iter(cal), None)
    if first is None:
        raise CalibrationError(f"{cal.source}: no calibration samples")
    return cal


def _folder_calibration(path: Path, model: Model) -> Calibration:
    files = sorted(p for p in path.iterdir() if p.suffix == ".npz")
    if not files:
        raise CalibrationError(f"{path}: the folder holds no .npz files")

    def factory() -> Iterator[dict]:
        for f in files:
            try:
                with np.load(f, allow_pickle=False) as npz:
                    yield {k: npz[k] for k in npz.files}
            except CalibrationError:
                raise
            except Exception as exc:
                raise CalibrationError(f"{f}: cannot read ({exc})") from exc

    return Calibration(model, factory, len(files), str(path))


def _npz_calibration(path: Path, model: Model) -> Calibration:
    try:
        with zipfile.ZipFile(path) as zf:
            members = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
            counts = {}
            for key, member in members.items():
                with zf.open(member) as f:
                    shape, _, _ = _read_npy_header(f)
                if not shape:
                    raise CalibrationError(f"{path}: '{key}' is a scalar; the first axis must "
                                           "be the samples")
                counts[key] = shape[0]
    except CalibrationError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: not a readable .npz ({exc})") from exc
    if not members:
        raise CalibrationError(f"{path}: holds no arrays")
    if len(set(counts.values())) > 1:
        raise CalibrationError(f"{path}: arrays disagree on the number of samples: {counts}")
    count = next(iter(counts.values()))

    def factory() -> Iterator[dict]:
        with zipfile.ZipFile(path) as zf:
            readers = {}
            try:
                for key, member in members.items():
                    f = zf.open(member)
                    shape, fortran, dtype = _read_npy_header(f)
                    if fortran or dtype.hasobject:
                        f.close()
                        arr = np.load(zf.open(member), allow_pickle=False)
                        readers[key] = (None, arr, None, None)
                    else:
                        per = int(np.prod(shape[1:])) * dtype.itemsize
                        readers[key] = (f, None, (shape[1:], dtype), per)
                for i in range(count):
                    sample = {}
                    for key, (f, arr, meta, per) in readers.items():
                        if f is None:
                            sample[key] = arr[i]
                        else:
                            buf = f.read(per)
                            if len(buf) != per:
                                raise CalibrationError(f"{path}: '{key}' is truncated at sample {i}")
                            sample[key] = np.frombuffer(buf, dtype=meta[1]).reshape(meta[0]).copy()
                    yield sample
            finally:
                for f, *_ in readers.values():
                    if f is not None:
                        f.close()

    return Calibration(model, factory, count, str(path))


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = npy_format.read_magic(f)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(f)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(f)
    shape, fortran, dtype = npy_format._read_array_header(f, version)  # noqa: SLF001 - v3
    return shape, fortran, dtype
