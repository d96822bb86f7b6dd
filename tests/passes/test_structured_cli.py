"""The structured-pruning pipelines exactly as the command line is used, the original
model being the teacher: ``onnxopt optimize m.onnx -o lean.onnx -p "..." --calib calib.npz``."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from models import builders
from models.digits import accuracy, digits_mlp, digits_split
from onnxopt import Model
from onnxopt.channels import CHANNEL_MAP_KEY
from onnxopt.cli import main
from onnxopt.errors import EXIT_USAGE
from tests.helpers import io_signature


@pytest.fixture
def digits_files(tmp_path):
    x_train = digits_split()[0]
    onnx.save(digits_mlp(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", input=x_train[:512])
    return tmp_path


@pytest.mark.parametrize("pipeline", ["prune-channels(ratio=0.3),reconstruct",
                                      "prune-channels(ratio=0.5),merge-neurons,reconstruct"])
def test_optimize_prunes_and_reconstructs_from_the_command_line(digits_files, pipeline, capsys):
    d = digits_files
    code = main(["optimize", str(d / "m.onnx"), "-o", str(d / "lean.onnx"), "-p", pipeline,
                 "--calib", str(d / "calib.npz"), "--report", str(d / "r.json"), "-q"])
    assert code == 0, capsys.readouterr().err
    lean = Model.load(d / "lean.onnx")
    original = Model.load(d / "m.onnx")
    onnx.checker.check_model(onnx.load(d / "lean.onnx"))
    assert io_signature(lean) == io_signature(original)
    assert lean.summary().parameters < 0.75 * original.summary().parameters
    assert CHANNEL_MAP_KEY in dict(lean.metadata_props)
    report = json.loads((d / "r.json").read_text())
    assert report["validation_mode"] == "fidelity" and report["validation_bound"] == {"min_cosine": 0.99}
    assert all(p["passed"] for p in report["validation"])
    steps = {p["name"]: p for p in report["passes"]}
    assert steps["prune-channels"]["stats"]["channels_removed"] > 0
    assert steps["reconstruct"]["modified"] and steps["reconstruct"]["stats"]["refit"] >= 1
    _, x_test, _, y_test = digits_split()
    assert accuracy(original, x_test, y_test) - accuracy(lean, x_test, y_test) <= 0.01


def test_reconstruct_without_calibration_is_one_clear_error(digits_files, capsys):
    d = digits_files
    code = main(["optimize", str(d / "m.onnx"), "-o", str(d / "lean.onnx"), "-p", "prune-channels,reconstruct"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "reconstruct" in err and "calibration" in err
    assert len(err.strip().splitlines()) == 1
    assert not (d / "lean.onnx").exists()


def test_a_residual_cnn_from_the_command_line(tmp_path, capsys):
    onnx.save(builders.cnn(), tmp_path / "cnn.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input=rng.standard_normal((32, 1, 3, 32, 32)).astype(np.float32))
    code = main(["optimize", str(tmp_path / "cnn.onnx"), "-o", str(tmp_path / "lean.onnx"), "-q",
                 "-p", "prune-channels(ratio=0.5),merge-neurons,reconstruct", "--calib", str(tmp_path / "calib.npz")])
    assert code == 0, capsys.readouterr().err
    assert Model.load(tmp_path / "lean.onnx").summary().parameters < Model.load(tmp_path / "cnn.onnx").summary().parameters
