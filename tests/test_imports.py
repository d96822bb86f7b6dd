"""A command imports what it uses: onnxruntime, networkx and rich stay out of a run that
needs none of them, pass modules load when their pass is asked for, and the public API
is unchanged (names resolve on first use)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import onnx
import pytest

import onnxopt
from models import builders
from onnxopt import framework
from tests.helpers import ROOT

HEAVY = ("onnxruntime", "networkx", "rich", "matplotlib")


def _imported_by(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; the heavy modules and pass modules it imported."""
    probe = code + (
        "\nimport sys, json\n"
        f"print(json.dumps({{'heavy': sorted(m for m in {HEAVY!r} if m in sys.modules),"
        " 'passes': sorted(m.rsplit('.', 1)[1] for m in sys.modules if m.startswith('onnxopt.passes.'))}))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cli(*args: str) -> str:
    return f"import sys\nfrom onnxopt.cli import main\nrc = main({list(args)!r})\nassert rc == 0, rc\n"


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("imports") / "cnn.onnx"
    onnx.save(builders.cnn(), path)
    return str(path)


def test_importing_the_package_imports_nothing_heavy():
    found = _imported_by("import sys\nimport onnxopt\nimport onnxopt.cli\nassert 'onnx' not in sys.modules")
    assert found == {"heavy": [], "passes": []}


def test_optimize_without_validation_needs_neither_onnxruntime_nor_networkx_nor_rich(cnn_path, tmp_path):
    found = _imported_by(_cli("-q", "optimize", cnn_path, "-o", str(tmp_path / "o.onnx"), "--no-validate"))
    assert found["heavy"] == []
    default = framework.presets()["default"][0].strip("[]").split(",")
    assert found["passes"] == sorted(p.replace("-", "_") for p in default)  # only the preset's passes


def test_inspect_json_and_passes_json_need_nothing_heavy(cnn_path):
    assert _imported_by(_cli("inspect", cnn_path, "--json"))["heavy"] == []
    assert _imported_by(_cli("passes", "--json"))["heavy"] == []


def test_what_is_needed_is_imported(cnn_path, tmp_path):
    """Printing tables imports rich; validating imports onnxruntime."""
    assert "rich" in _imported_by(_cli("inspect", cnn_path))["heavy"]
    found = _imported_by(_cli("-q", "optimize", cnn_path, "-o", str(tmp_path / "o.onnx"), "--runs", "0"))
    assert "onnxruntime" in found["heavy"]


def test_public_names_resolve_and_validate_stays_the_function():
    importlib.import_module("onnxopt.validate")  # binds the submodule to the package

    assert callable(onnxopt.validate) and onnxopt.validate.__module__ == "onnxopt.validate"
    for name in onnxopt.__all__:
        assert getattr(onnxopt, name) is not None
    assert set(onnxopt.__all__) <= set(dir(onnxopt))
    namespace: dict = {}
    exec("from onnxopt import *", namespace)
    assert namespace["PassManager"] is onnxopt.PassManager and namespace["optimize"] is onnxopt.optimize
    with pytest.raises(AttributeError):
        onnxopt.no_such_name  # noqa: B018


def test_every_declared_pass_is_registered_by_its_module():
    passes = framework.registered_passes()
    assert set(framework._MODULES) <= set(passes)
    for name, module in framework._MODULES.items():
        assert passes[name].__module__ == module


def test_a_plugin_pass_cannot_take_a_declared_name():
    class Impostor(framework.Pass):
        name = "fuse"
        summary = "not the real one"

        def run(self, model, ctx):
            return framework.PassResult(False)

    saved = framework._PASSES.pop("fuse", None)
    try:
        with pytest.raises(ValueError, match="two passes are named 'fuse'"):
            framework.register(Impostor)
    finally:
        if saved is not None:
            framework._PASSES["fuse"] = saved
