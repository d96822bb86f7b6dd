"""A model over 2 GB (generated, external data) goes through
``[dead-nodes,fold-constants,eliminate-noops,fuse]``: the passes act on it, its weights
are never loaded (peak memory stays below twice the model's bytes), and it comes out
with external data and the right outputs — peers fail at the 2 GB protobuf limit here."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from tests.large_model import COLS, ROWS, TABLES, table_block, write_tables

PIPELINE = "[dead-nodes,fold-constants,eliminate-noops,fuse]"


def _write(folder) -> tuple:
    data, inits = write_tables(folder)
    c1 = np.linspace(0, 1, COLS, dtype=np.float32)
    inits += [numpy_helper.from_array(c1, "c1"), numpy_helper.from_array(2 * c1, "c2"),
              numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    nodes = [helper.make_node("Gather", [f"table{t}", "idx"], [f"g{t}"]) for t in range(TABLES)]
    nodes += [helper.make_node("Sum", [f"g{t}" for t in range(TABLES)], ["s"]),
              helper.make_node("Add", ["c1", "c2"], ["b"]),          # folds
              helper.make_node("Add", ["s", "b"], ["z"]),
              helper.make_node("Mul", ["z", "one"], ["m"]),          # x * 1
              helper.make_node("Identity", ["m"], ["y"]),            # no-op on the output
              helper.make_node("Neg", ["g0"], ["dead"])]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("idx", onnx.TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, COLS])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    idx = np.array([3, ROWS - 1], np.int64)
    expected = sum(np.stack([table_block(t, i, i + 1)[0] for i in idx]) for t in range(TABLES)) + 3 * c1
    return path, idx, expected, data.stat().st_size


@pytest.mark.slow
def test_model_over_2gb_goes_through_the_simplification_passes(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    path, idx, expected, data_bytes = _write(src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "big.opt.onnx"
    report = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "onnxopt.cli", "optimize", str(path), "-o", str(out),
                           "-p", PIPELINE, "--no-validate", "--report", str(report), "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert peak < 2 * data_bytes, f"peak RSS {peak / 2**30:.2f} GiB for a {data_bytes / 2**30:.2f} GiB model"
    stats = {r["name"]: r["stats"] for r in json.loads(report.read_text())["passes"] if r["modified"]}
    assert stats["fold-constants"]["folded"] == 1
    assert stats["eliminate-noops"]["removed"] == 2
    proto = onnx.load(out, load_external_data=False)
    assert [n.op_type for n in proto.graph.node] == ["Gather"] * 3 + ["Sum", "Add"]
    assert [o.name for o in proto.graph.output] == ["y"]
    big = [t for t in proto.graph.initializer if t.name.startswith("table")]
    assert len(big) == 3 and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    assert (out_dir / "big.opt.onnx.data").stat().st_size >= ROWS * COLS * 4 * TABLES
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"idx": idx})
    np.testing.assert_allclose(y, expected, rtol=1e-6)
