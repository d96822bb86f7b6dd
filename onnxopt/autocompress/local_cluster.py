"""A multi-node Ray cluster simulated on this machine: a head and more nodes, each a
``ray start --block`` process with its own CPUs and a resource of its own.

What a search does on a real cluster can be tried here first: ``search(address=cluster.
address)`` joins it exactly as it would join a remote one. Every node runs in a process
group of its own and is stopped by that group's id, so nothing else running Ray on the
machine is touched. The nodes advertise 127.0.0.1 and token authentication is off for
them (``RAY_AUTH_MODE=disabled`` in their environment and in :attr:`env`, which a driver
joining them needs too): by default a head advertises the machine's outward address and
token authentication rejects the second node and the driver.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import UsageError

__all__ = ["LocalCluster"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else shutil.which("ray") or "ray"


class LocalCluster:
    """``nodes`` Ray nodes on this machine with ``cpus`` CPUs each; a context manager."""

    def __init__(self, nodes: int = 2, cpus: int = 1, timeout: float = 120.0):
        if nodes < 1 or cpus < 1:
            raise UsageError("a local cluster needs at least one node with one CPU")
        self.nodes, self.cpus, self.timeout = nodes, cpus, timeout
        self.address = ""
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        self.folder = Path(tempfile.mkdtemp(prefix="onnxopt-ray-"))
        self._procs: list[subprocess.Popen] = []

    def _start(self, args: list[str], name: str) -> None:
        log = (self.folder / f"{name}.log").open("w")
        common = ["--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}", "--disable-usage-stats",
                  f"--resources={json.dumps({name: 1})}"]
        # its own session: the node and what it starts are stopped together by group id
        self._procs.append(subprocess.Popen([_ray_cli(), "start", "--block", *args, *common], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def start(self) -> LocalCluster:
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        try:
            self._start(["--head", f"--port={port}", "--include-dashboard=false",
                         f"--temp-dir={self.folder / 'ray'}"], "node_0")
            self._wait(1)
            for i in range(1, self.nodes):
                self._start([f"--address={self.address}"], f"node_{i}")
            self._wait(self.nodes)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, count: int) -> None:
        code = (f"import ray; ray.init(address='{self.address}', log_to_driver=False); "
                "print(len([n for n in ray.nodes() if n['Alive']]))")
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise UsageError(f"ray start exited with {proc.returncode}; logs in {self.folder}")
            out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                                 timeout=self.timeout)
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(1.0)
        raise UsageError(f"the local Ray cluster did not reach {count} node(s) in {self.timeout:.0f} s; "
                         f"logs in {self.folder}")

    def stop(self) -> None:
        for proc in reversed(self._procs):
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._procs.clear()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
