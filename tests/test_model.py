"""Model: loading from every source, safe and atomic saving, copies and figures."""

from __future__ import annotations

import os

import onnx
import pytest

from models import builders
from onnxopt import Model
from onnxopt.errors import ModelLoadError, ModelSaveError
from tests.helpers import assert_same_outputs


def test_load_from_path_bytes_and_proto_agree(tmp_path):
    proto = builders.cnn()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    a = Model.load(path).to_bytes()
    b = Model.load(path.read_bytes()).to_bytes()
    c = Model.load(proto).to_bytes()
    assert a == b == c
    assert onnx.load_from_string(a) == proto


def test_save_is_deterministic_and_reloads(tmp_path):
    model = Model.from_proto(builders.cnn())
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    model.save(a)
    Model.from_proto(builders.cnn()).save(b)
    assert a.read_bytes() == b.read_bytes()
    assert onnx.load(a) == builders.cnn()


def test_save_leaves_no_temporary_files_and_ordinary_permissions(tmp_path):
    Model.from_proto(builders.mlp()).save(tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    (tmp_path / "plain").write_bytes(b"")
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model = Model.from_proto(builders.mlp())
    target = tmp_path / "m.onnx"

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(ModelSaveError, match="No space left"):
        model.save(target)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_to_overwrite_the_input(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(builders.mlp(), path)
    before = path.read_bytes()
    with pytest.raises(ModelSaveError, match="input model"):
        Model.load(path).save(path)
    assert path.read_bytes() == before


def test_save_switches_to_external_data_above_the_threshold(tmp_path, monkeypatch):
    import onnxopt.model as model_module

    monkeypatch.setattr(model_module, "EXTERNAL_DATA_THRESHOLD", 1000)
    model = Model.from_proto(builders.cnn())
    model.save(tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").exists()
    assert Model.load(tmp_path / "m.onnx").has_external_data()
    assert_same_outputs(Model.from_proto(builders.cnn()), Model.load(tmp_path / "m.onnx"))


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        Model.load(tmp_path / "nope.onnx")


def test_summary_counts_subgraphs_and_constant_nodes():
    model = Model.from_proto(builders.control_flow())
    s = model.summary()
    assert s.nodes == 6 and s.nodes_total == 14 and s.subgraphs == 3
    assert s.initializers == 6
    assert s.parameters == 8 + 8 + 1 + 1 + 8 + 1


def test_copy_is_independent():
    model = Model.from_proto(builders.mlp())
    snapshot = model.copy()
    model.graph.nodes.pop()
    assert len(snapshot.graph.nodes) == len(model.graph.nodes) + 1
