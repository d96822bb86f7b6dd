"""The command line: every user-caused error is one line, the right exit code, no output
file and an untouched input; and the commands do what the README says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from models import builders
from onnxopt import framework
from onnxopt.cli import main
from onnxopt.framework import Pass, PassResult, register
from onnxopt.validate import available_providers


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(builders.dead_branches(), path)
    return path


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _external_with_location(folder, location):
    w = np.ones((16, 16), np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "ext.onnx"
    onnx.save(proto, path, save_as_external_data=True, location="w.bin", size_threshold=0)
    proto = onnx.load(path, load_external_data=False)
    proto.graph.initializer[0].external_data[0].value = location
    path.write_bytes(proto.SerializeToString())
    return path


class _Breaker(Pass):
    name = "test-cli-breaker"
    summary = "claims exact, changes the outputs (tests only)"
    options = {}

    def run(self, model, ctx):
        next(n for n in model.graph.nodes if n.op == "Relu").op = "Sigmoid"
        return PassResult(True)


@pytest.fixture
def breaker():
    register(_Breaker)
    yield
    framework._PASSES.pop(_Breaker.name, None)


def _error_cases(tmp_path, model_path):
    """(name, argv, expected exit code, text the line must contain, input path)."""
    out = tmp_path / "out.onnx"
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("hello, this is not a model")
    truncated = tmp_path / "cut.onnx"
    data = builders.cnn().SerializeToString()
    truncated.write_bytes(data[: len(data) // 3])
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    absolute = _external_with_location(ext_dir, "/etc/hostname")
    up_dir = tmp_path / "up" / "m"
    up_dir.mkdir(parents=True)
    (tmp_path / "up" / "w.bin").write_bytes(b"\0" * 1024)
    upward = _external_with_location(up_dir, "../w.bin")
    link_dir = tmp_path / "link"
    link_dir.mkdir()
    linked = _external_with_location(link_dir, "w.bin")
    (link_dir / "w.bin").rename(tmp_path / "secret.bin")
    (link_dir / "w.bin").symlink_to(tmp_path / "secret.bin")
    feeds_name = tmp_path / "feeds_name.npz"
    np.savez(feeds_name, image=np.zeros((1, 3, 16, 16), np.float32))
    feeds_dtype = tmp_path / "feeds_dtype.npz"
    np.savez(feeds_dtype, input=np.zeros((1, 3, 16, 16), np.float64))
    feeds_shape = tmp_path / "feeds_shape.npz"
    np.savez(feeds_shape, input=np.zeros((1, 3, 8, 16), np.float32))
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.zeros((4, 5, 16, 16), np.float32))
    m = model_path
    cases = [
        ("not-onnx", ["optimize", not_onnx, "-o", out], 2, "not an ONNX model", not_onnx),
        ("truncated", ["optimize", truncated, "-o", out], 2, "not an ONNX model or truncated", truncated),
        ("missing", ["optimize", tmp_path / "nope.onnx", "-o", out], 2, "no such file", None),
        ("ext-absolute", ["optimize", absolute, "-o", out], 2, "is absolute", absolute),
        ("ext-upward", ["optimize", upward, "-o", out], 2, "leaves the model's folder", upward),
        ("ext-symlink", ["optimize", linked, "-o", out], 2, "leaves the model's folder", linked),
        ("unknown-pass", ["optimize", m, "-o", out, "-p", "fold-everything"], 2,
         "unknown pass 'fold-everything'; valid passes: ", m),
        ("unknown-option", ["optimize", m, "-o", out, "-p", "dead-nodes(speed=11)"], 2,
         "has no option 'speed'", m),
        ("unknown-preset", ["optimize", m, "-o", out, "--preset", "turbo"], 2, "presets: ", m),
        ("feeds-name", ["optimize", m, "-o", out, "--inputs", feeds_name], 2, "give 'image'", m),
        ("feeds-dtype", ["optimize", m, "-o", out, "--inputs", feeds_dtype], 2, "must be float32", m),
        ("feeds-shape", ["optimize", m, "-o", out, "--inputs", feeds_shape], 2, "has 8 on axis 2", m),
        ("calib", ["optimize", m, "-o", out, "--calib", calib], 2, "has 5 on axis 1", m),
        ("bad-shape-arg", ["optimize", m, "-o", out, "--shape", "input:1x3"], 2, "expected NAME=", m),
        ("unwritable", ["optimize", m, "-o", tmp_path / "no" / "dir" / "out.onnx"], 2, "does not exist", m),
        ("proc-output", ["optimize", m, "-o", "/proc/onnxopt-out.onnx"], 2, "cannot write", m),
        ("same-as-input", ["optimize", m, "-o", m], 2, "is the input model", m),
        ("bad-flag", ["optimize", m, "-o", out, "--frobnicate"], 2, "unrecognized arguments", m),
    ]
    if "cuda" not in available_providers():
        cases.append(("no-cuda", ["optimize", m, "-o", out, "--providers", "cpu,cuda"], 2,
                      "provider 'cuda' is not available", m))
    return cases, out


def test_every_user_error_is_one_line_with_its_exit_code(tmp_path, model_path, capsys):
    cases, out = _error_cases(tmp_path, model_path)
    for name, argv, code, text, source in cases:
        before = source.read_bytes() if source is not None else None
        got, stdout, stderr = _run(capsys, *argv)
        lines = stderr.strip().splitlines()
        assert got == code, f"{name}: exit {got}, stderr {stderr!r}"
        assert len(lines) == 1 and lines[0].startswith("onnxopt: error: "), f"{name}: {stderr!r}"
        assert text in lines[0], f"{name}: {lines[0]!r}"
        assert "Traceback" not in stderr + stdout
        assert not out.exists(), f"{name}: an output file was written"
        assert not list(out.parent.glob(".out.onnx*")), f"{name}: a temporary file was left"
        if before is not None:
            assert source.read_bytes() == before, f"{name}: the input changed"


def test_failed_validation_exits_1_and_writes_nothing(tmp_path, model_path, capsys, breaker):
    out = tmp_path / "out.onnx"
    before = model_path.read_bytes()
    code, _, err = _run(capsys, "optimize", model_path, "-o", out, "-p", "test-cli-breaker", "-q")
    assert code == 1 and err.strip().startswith("onnxopt: error: validation failed")
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and model_path.read_bytes() == before
    code, _, err = _run(capsys, "optimize", model_path, "-o", out, "-p", "test-cli-breaker", "-q", "--force")
    assert code == 1 and out.exists()


def test_validate_command_exit_codes(tmp_path, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(builders.mlp(seed=0), a)
    onnx.save(builders.mlp(seed=1), b)
    assert _run(capsys, "validate", a, a, "--runs", "0", "-q")[0] == 0
    code, _, err = _run(capsys, "validate", a, b, "--runs", "0", "-q")
    assert code == 1 and "validation failed" in err and len(err.strip().splitlines()) == 1


def test_optimize_writes_model_and_report(tmp_path, model_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code, stdout, _ = _run(capsys, "optimize", model_path, "-o", out, "--report", report, "--runs", "2")
    assert code == 0 and out.exists() and "validation on cpu" in stdout
    data = json.loads(report.read_text())
    assert data["output"]["path"] == str(out) and data["validation"][0]["passed"]
    assert "dead-nodes" in {p["name"] for p in data["passes"]}


def test_optimize_is_deterministic(tmp_path, model_path, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert _run(capsys, "optimize", model_path, "-o", a, "-q", "--runs", "0")[0] == 0
    assert _run(capsys, "optimize", model_path, "-o", b, "-q", "--runs", "0")[0] == 0
    assert a.read_bytes() == b.read_bytes()


def test_passes_name_the_file_that_holds_each_pass(capsys):
    """A pass name in `onnxopt passes` leads to its file in one step."""
    from onnxopt.framework import registered_passes

    code, out, _ = _run(capsys, "passes", "--json")
    sources = {p["name"]: p["source"] for p in json.loads(out)["passes"]}
    assert code == 0 and sources["dead-nodes"] == "passes/dead_nodes.py"
    assert sources["quantize"] == "passes/quantize/__init__.py"
    root = Path(__file__).resolve().parent.parent
    for name in registered_passes():
        path = root / sources[name]
        assert path.is_file(), name
        assert f'name = "{name}"' in path.read_text()
    code, out, _ = _run(capsys, "passes")
    assert code == 0 and "passes/dead_nodes.py" in out


def test_passes_and_inspect(tmp_path, model_path, capsys):
    code, out, _ = _run(capsys, "passes", "--json")
    data = json.loads(out)
    assert code == 0 and "dead-nodes" in {p["name"] for p in data["passes"]} and "default" in data["presets"]
    code, out, _ = _run(capsys, "inspect", model_path, "--json")
    info = json.loads(out)
    assert code == 0 and info["inputs"][0]["name"] == "input" and info["ops"]["Conv"] == 3
    assert info["functions"] == ["local::Unused"] and info["nodes"] == 14


def test_console_script_runs_in_a_real_process(tmp_path, model_path):
    """The installed entry point: one line on stderr, no traceback, exit code 2."""
    proc = subprocess.run([sys.executable, "-m", "onnxopt.cli", "optimize", str(tmp_path / "x.onnx"),
                           "-o", str(tmp_path / "y.onnx")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"onnxopt: error: {tmp_path / 'x.onnx'}: no such file"]


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "onnxopt.cli", "--debug", "inspect", str(tmp_path / "x.onnx")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
