"""The README's blocks run, and its pass table matches the registry.

``bash`` blocks run line by line in a fresh folder (with this environment's ``onnxopt``
on PATH and the repository on PYTHONPATH); ``python`` blocks run in order in one
interpreter; ``text`` blocks are pipelines and must parse. The quick start (``sh``) is
``make demo``/``make test`` themselves, which CI runs.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from onnxopt.cli import pass_table_markdown
from onnxopt.framework import parse_pipeline
from tests.helpers import ROOT

README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_readme_has_the_two_quick_start_commands():
    (quick,) = _blocks("sh")
    assert [line.split("#")[0].strip() for line in quick.strip().splitlines()] == ["make demo", "make test"]


def test_bash_blocks_run(tmp_path):
    blocks = _blocks("bash")
    assert blocks
    for block in blocks:
        for line in block.strip().splitlines():
            command = line.split("  #")[0].strip()
            if not command:
                continue
            redirect = None
            if ">" in command:
                command, redirect = (part.strip() for part in command.split(">", 1))
            args = shlex.split(command)
            if args[0] == "python":
                args[0] = sys.executable
            proc = subprocess.run(args, cwd=tmp_path, env=_env(), capture_output=True, text=True)
            assert proc.returncode == 0, f"{line!r} failed: {proc.stderr[-2000:]}"
            if redirect:
                (tmp_path / redirect).write_text(proc.stdout)


def test_python_blocks_run(tmp_path):
    code = "\n\n".join(_blocks("python"))
    assert code
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("pipeline", [b.strip() for b in _blocks("text")])
def test_text_blocks_are_valid_pipelines(pipeline):
    assert parse_pipeline(pipeline)


def test_pass_table_matches_the_registry():
    table = re.search(r"<!-- passes:begin -->\n(.*?)\n<!-- passes:end -->", README, flags=re.S).group(1)
    assert table.strip() == pass_table_markdown().strip(), "run `onnxopt passes --markdown` and paste it"
