"""A two-node Ray cluster simulated on this machine (a head and a second node, each with
its own CPU and resources) runs the same search unchanged and chooses what one node
chooses with the same seed. Slow: run with ``make test-slow``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxopt.autocompress.local_cluster import LocalCluster
from tests.search_helpers import feeds, small_mlp

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
pytest.importorskip("ray", reason="Ray is not installed (pip install 'onnxopt[search]')")


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(nodes=2, cpus=1) as running:
        yield running.address, running.env


def _search(tmp: Path, name: str, extra: list[str], env: dict) -> dict:
    model, calib = tmp / "m.onnx", tmp / "calib.npz"
    if not model.exists():
        model.write_bytes(small_mlp().SerializeToString())
        np.savez(calib, x=np.stack([f["x"] for f in feeds(24)]))
    report = tmp / f"{name}.json"
    cmd = [sys.executable, "-m", "onnxopt.cli", "-q", "search", str(model), "-o", str(tmp / f"{name}.onnx"),
           "--calib", str(calib), "--objective", "size", "--space", "int8,int4,fp16,share", "--seed", "3",
           "--no-cache", "--report", str(report), *extra]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return json.loads(report.read_text())


def test_two_node_cluster_chooses_as_one_node(cluster, tmp_path):
    address, env = cluster
    one = _search(tmp_path, "one", ["--backend", "ray", "--workers", "1"], env)
    two = _search(tmp_path, "two", ["--address", address], env)
    executor = two["search"]["executor"]
    assert executor["nodes"] == 2 and executor["nodes_used"] == 2 and two["search"]["workers"] == 2
    assert two["pipeline"] == one["pipeline"]
    assert (tmp_path / "one.onnx").read_bytes() == (tmp_path / "two.onnx").read_bytes()
