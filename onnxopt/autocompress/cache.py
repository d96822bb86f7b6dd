"""Results of probes and trials on disk, keyed by content.

The key of a result is a digest of everything that decides it: the original model's
bytes, the pipeline, the data it was calibrated and measured on, the kind of job and the
measurement settings. A search that is interrupted, or crashes, finds every finished
result again when it is run anew and redoes only what had not finished. Each entry is one
small JSON file written atomically (temporary file, then rename), so a crash never leaves
a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

__all__ = ["ResultCache", "digest", "data_digest", "default_cache_dir"]

log = logging.getLogger(__name__)

#: Bumped when what a cached result means changes (measurement method, fields).
FORMAT = 1


def default_cache_dir() -> Path:
    """``$ONNXOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/onnxopt/search`` (``~/.cache`` by default)."""
    if os.environ.get("ONNXOPT_CACHE_DIR"):
        return Path(os.environ["ONNXOPT_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "onnxopt" / "search"


def digest(*parts) -> str:
    """A hex digest of JSON-serialisable parts (bytes are hashed as bytes)."""
    h = hashlib.blake2b(digest_size=20)
    for part in parts:
        if isinstance(part, (bytes, bytearray, memoryview)):
            h.update(b"b")
            h.update(hashlib.blake2b(bytes(part), digest_size=20).digest())
        else:
            h.update(b"j")
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def data_digest(groups: Iterable[Iterable[Mapping[str, np.ndarray]]]) -> str:
    """A digest of lists of feed dicts (names, dtypes, shapes and bytes, in order)."""
    h = hashlib.blake2b(digest_size=20)
    for group in groups:
        h.update(b"|group|")
        for sample in group:
            for name in sorted(sample):
                arr = np.ascontiguousarray(sample[name])
                h.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode())
                h.update(arr.tobytes() if arr.dtype != object else repr(arr.tolist()).encode())
    return h.hexdigest()


class ResultCache:
    """A folder of JSON results; ``folder=None`` disables caching."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder) if folder is not None else None
        self.hits = 0
        self.writes = 0
        if self.folder is not None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                log.warning("search cache %s cannot be created (%s); results are not cached", self.folder, exc)
                self.folder = None

    def _path(self, key: str) -> Path:
        return Path(self.folder or ".") / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        if self.folder is None:
            return None
        path = self._path(key)
        try:
            value = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("search cache entry %s is unreadable (%s); measured again", path, exc)
            return None
        if value.get("format") != FORMAT:
            return None
        self.hits += 1
        return value["result"]

    def put(self, key: str, result: dict) -> None:
        if self.folder is None:
            return
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"format": FORMAT, "result": result}, default=_plain))
            os.replace(tmp, path)
            self.writes += 1
        except OSError as exc:
            log.warning("search cache entry %s cannot be written (%s)", path, exc)


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
