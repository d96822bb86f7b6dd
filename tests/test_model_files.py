"""External data (lazy, copied, inlined, checked for unsafe locations) and refusal of
files that are not models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from models import builders
from onnxopt import Model
from onnxopt.errors import ModelLoadError, UnsafePathError
from onnxopt.graph_extras import extras
from onnxopt.model_files import ExternalValues, external_info, inline_external_data, write_external_data
from tests.helpers import assert_same_outputs


def _external_model(folder, location="weights.bin", size=(64, 64)):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(size).astype(np.float32)
    init = numpy_helper.from_array(w, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, size[0]])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, size[1]])], [init])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "ext.onnx"
    onnx.save(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=0)
    return path, w


def test_external_data_stays_lazy_until_read(tmp_path):
    path, w = _external_model(tmp_path)
    model = Model.load(path)
    const = extras(model.graph).initializers[0]
    assert isinstance(const._values, ExternalValues)
    assert model.has_external_data()
    np.testing.assert_array_equal(const.values, w)


def test_external_data_is_copied_on_save_and_model_runs(tmp_path):
    path, _ = _external_model(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    model = Model.load(path)
    model.save(out / "m.onnx", external_data=True)
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert_same_outputs(Model.load(path), Model.load(out / "m.onnx"))
    # Inlining on request gives a single self-contained file.
    model.save(out / "inline.onnx", external_data=False)
    reloaded = Model.load(out / "inline.onnx")
    assert not reloaded.has_external_data()


@pytest.mark.parametrize("location", ["/etc/passwd", "../outside.bin", "sub/../../outside.bin"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, location):
    folder = tmp_path / "model"
    folder.mkdir()
    path, _ = _external_model(folder)
    proto = onnx.load(path, load_external_data=False)
    proto.graph.initializer[0].external_data[0].value = location
    (tmp_path / "outside.bin").write_bytes(b"\0" * 64 * 64 * 4)
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(UnsafePathError):
        Model.load(path)


def test_external_data_symlink_pointing_out_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    path, _ = _external_model(folder)
    (tmp_path / "secret.bin").write_bytes((folder / "weights.bin").read_bytes())
    (folder / "weights.bin").unlink()
    (folder / "weights.bin").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(UnsafePathError, match="leaves"):
        Model.load(path)


def test_external_data_past_end_of_file_is_refused(tmp_path):
    path, _ = _external_model(tmp_path)
    data = tmp_path / "weights.bin"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="past the end"):
        Model.load(path)


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"this is not a protobuf at all \xff\xfe", "not an ONNX model"),
])
def test_garbage_is_not_a_model(tmp_path, content, match):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=match):
        Model.load(path)


def test_truncated_model_is_refused(tmp_path):
    data = builders.cnn().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        Model.load(path)


def test_external_data_file_aligns_tensors_and_keeps_small_ones_inline(tmp_path):
    path, w = _external_model(tmp_path)
    proto = onnx.load(path, load_external_data=False)
    extra = {"small": np.ones(4, np.float32), "b": np.arange(300, dtype=np.float32),
             "c": np.arange(400, dtype=np.float32)}
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in extra.items())
    write_external_data(proto, str(tmp_path), str(tmp_path / "out.bin"), "out.bin")
    external = {t.name: external_info(t) for t in proto.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}
    assert sorted(external) == ["b", "c", "w"]
    assert {i["location"] for i in external.values()} == {"out.bin"}
    # every tensor starts on a 4 KiB boundary: "c" follows 16384 + 1200 bytes, padded
    assert [int(external[k]["offset"]) for k in ("w", "b", "c")] == [0, 16384, 20480]
    inline_external_data(proto, str(tmp_path))
    arrays = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in proto.graph.initializer)
    np.testing.assert_array_equal(arrays["w"], w)
    for name, value in extra.items():
        np.testing.assert_array_equal(arrays[name], value)
