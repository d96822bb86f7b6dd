"""finetune from the command line: each bad input is one line with exit 2 or 3, nothing
is written and the input is untouched; and the core and every other pass import and work
in a process where torch cannot be imported, where finetune says which extra it needs."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from models.digits import digits_mlp, digits_split
from onnxopt.cli import main
from tests.helpers import ROOT

BLOCK_TORCH = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
sys.meta_path.insert(0, _NoTorch())
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune-cli")
    model = folder / "digits.onnx"
    model.write_bytes(digits_mlp().SerializeToString())
    x_train = digits_split()[0]
    np.savez(folder / "calib.npz", input=x_train[:40])
    np.savez(folder / "one.npz", input=x_train[:1])
    return folder, model


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_bad_inputs_are_one_line_nothing_written_input_untouched(files, tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    folder, model = files
    digest = _digest(model)
    out = tmp_path / "out.onnx"
    cases = [
        (["-p", "prune-magnitude(sparsity=0.8),finetune(steps=2)", "--calib", str(folder / "one.npz")], 2,
         "too few to hold any out"),
        (["-p", "finetune(steps=2,labels=" + str(folder / "missing.npy") + ")", "--calib",
          str(folder / "calib.npz")], 2, "no such file"),
        (["-p", "finetune(loss=nope)"], 2, "must be one of"),
    ]
    for extra, code, text in cases:
        got, err = _run(["optimize", str(model), "-o", str(out), "--min-cosine", "0", *extra], capsys)
        assert got == code and text in err and len(err.splitlines()) == 1, err
        assert not out.exists() and _digest(model) == digest

    from onnxopt.passes.finetune import ops_tensor

    monkeypatch.setitem(ops_tensor.OPS, "Relu", lambda node, opset: lambda args: -args[0])
    got, err = _run(["optimize", str(model), "-o", str(out), "-p", "prune-magnitude(sparsity=0.8),finetune(steps=2)",
                     "--calib", str(folder / "calib.npz"), "--min-cosine", "0"], capsys)
    assert got == 3 and "disagrees with onnxruntime" in err and "(Relu)" in err and len(err.splitlines()) == 1
    assert not out.exists() and _digest(model) == digest


def test_the_core_and_other_passes_work_without_torch(files, tmp_path):
    folder, model = files
    out = tmp_path / "small.onnx"
    script = BLOCK_TORCH + f"""
import onnxopt
from onnxopt.cli import main
from onnxopt.framework import registered_passes
assert "finetune" in registered_passes()
model, report = onnxopt.optimize({str(model)!r}, "default,prune-magnitude(sparsity=0.5),share-weights(bits=5)",
                                 min_cosine=0.9, runs=0, output={str(out)!r})
assert report.passed
code = main(["optimize", {str(model)!r}, "-o", {str(tmp_path / "ft.onnx")!r}, "-p", "finetune",
             "--calib", {str(folder / "calib.npz")!r}])
assert "torch" not in sys.modules or sys.modules["torch"] is None
sys.exit(code)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'onnxopt[train]'" in lines[0], proc.stderr
    assert out.exists() and not (tmp_path / "ft.onnx").exists()
