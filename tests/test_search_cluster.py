"""A two-node Ray cluster simulated on this machine (a head and a second node, each with
its own CPU and resources) runs the same search unchanged and chooses what one node
chooses with the same seed. Slow: run with ``make test-slow``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.search_helpers import feeds, small_mlp

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
pytest.importorskip("ray", reason="Ray is not installed (pip install 'onnxopt[search]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    found = Path(sys.executable).with_name("ray")
    return str(found) if found.exists() else shutil.which("ray") or "ray"


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    # its own session: the node and everything it starts can be stopped by its group id
    return subprocess.Popen([_ray_cli(), "start", "--block", *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    head = _start(["--head", f"--port={port}", "--include-dashboard=false", *common,
                   "--resources={\"head_node\": 1}", f"--temp-dir={tmp / 'ray'}"], env, tmp / "head.log")
    nodes = [head]
    try:
        address = f"127.0.0.1:{port}"
        _wait_for(address, env, 1, head, tmp / "head.log")
        nodes.append(_start([f"--address={address}", *common, "--resources={\"second_node\": 1}"], env,
                            tmp / "node.log"))
        _wait_for(address, env, 2, nodes[1], tmp / "node.log")
        yield address, env
    finally:
        for proc in reversed(nodes):
            _stop(proc)


def _wait_for(address: str, env: dict, count: int, proc: subprocess.Popen, log: Path) -> None:
    code = (f"import ray; ray.init(address='{address}', log_to_driver=False); "
            f"print(len([n for n in ray.nodes() if n['Alive']]))")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited ({proc.returncode}): {log.read_text()[-800:]}")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    pytest.fail(f"the cluster did not reach {count} node(s): {log.read_text()[-800:]}")


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
