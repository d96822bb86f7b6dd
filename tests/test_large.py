"""A model over 2 GB (generated with external data): it loads, goes through the pipeline
and is saved with external data, without holding the weights twice in memory."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.large_model import COLS, ROWS, TABLES, write_tables


def _write_large_model(folder):
    _, inits = write_tables(folder)
    nodes = [helper.make_node("Gather", [f"table{t}", "idx"], [f"g{t}"]) for t in range(TABLES)]
    nodes += [helper.make_node("Sum", [f"g{t}" for t in range(TABLES)], ["y"]),
              helper.make_node("Neg", ["g0"], ["dead"])]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("idx", onnx.TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, COLS])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.slow
def test_model_over_2gb_goes_through_dead_nodes_with_external_data(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    path = _write_large_model(src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "big.opt.onnx"
    np.savez(tmp_path / "feeds.npz", idx=np.array([3, ROWS - 1], np.int64))
    proc = subprocess.run([sys.executable, "-m", "onnxopt.cli", "optimize", str(path), "-o", str(out), "-p", "dead-nodes",
                           "--inputs", str(tmp_path / "feeds.npz"), "--runs", "0", "--report",
                           str(tmp_path / "r.json"), "-q"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (out_dir / "big.opt.onnx.data").stat().st_size >= ROWS * COLS * 4 * TABLES
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passes"][0]["stats"]["nodes_removed"] == 1
    assert report["validation"][0]["passed"]
    proto = onnx.load(out, load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
