"""The fuzzing tools themselves: mutators, cases, the oracle, the graph generator, the
differential check and the shrinker — and a small campaign of each. The fixed-seed
corpus and the 1,000 differential graphs run in CI as ``make fuzz-ci``."""

from __future__ import annotations

import random

import onnx
import onnx.parser
import onnx.printer
import onnxruntime as ort
import pytest

from models import builders
from onnxopt import framework
from onnxopt.framework import Pass, PassResult, register
from tests.fuzz.cases import TEXT_SEEDS, Case, make_case, seed_corpus
from tests.fuzz.differential import check_graph, shrink
from tests.fuzz.graphs import random_graph
from tests.fuzz.mutate import MUTATORS, mutate_bytes
from tests.fuzz.runner import _hashes, check_case, run_campaign


def _seeds() -> list[onnx.ModelProto]:
    return [builders.control_flow(), builders.cnn(), onnx.parser.parse_model(TEXT_SEEDS["if-bool-input"])]


@pytest.mark.parametrize("name", sorted(MUTATORS))
def test_every_mutator_changes_some_model(name):
    changed = 0
    for i, seed in enumerate(_seeds()):
        for k in range(4):
            m = onnx.ModelProto()
            m.CopyFrom(seed)
            if MUTATORS[name](m, random.Random(100 * i + k)) is not None:
                changed += m.SerializeToString() != seed.SerializeToString()
    assert changed >= 3, name


def test_byte_mutation_changes_the_bytes():
    data = builders.mlp().SerializeToString()
    outs = {mutate_bytes(data, random.Random(i))[0] for i in range(20)}
    assert data not in outs and len(outs) >= 15


@pytest.fixture(scope="module")
def corpus():
    return seed_corpus(node_cases=0, real=[])


def test_a_case_is_reproduced_by_its_number(corpus, tmp_path):
    a = make_case(corpus, 17, tmp_path / "a")
    b = make_case(corpus, 17, tmp_path / "b")
    assert a.argv == b.argv and a.files == b.files and a.mutations == b.mutations
    assert make_case(corpus, 18, tmp_path).files != a.files or make_case(corpus, 18, tmp_path).argv != a.argv


def _finished(tmp_path, rc: int, stderr: str, *, argv=None, touch=None) -> tuple[Case, dict]:
    case = Case(1, "build:mlp", [], argv or ["optimize", "m/model.onnx", "-o", "m/out.onnx"], tmp_path / "c",
                {"m/model.onnx": builders.mlp().SerializeToString()})
    case.write()
    before = _hashes(case.folder)
    (case.folder / "stderr.txt").write_text(stderr)
    (case.folder / "stdout.txt").write_text("")
    if touch:
        touch(case.folder / "m")
    return case, before


def test_the_oracle_passes_a_clean_error_and_flags_each_broken_promise(tmp_path):
    case, before = _finished(tmp_path, 2, "onnxopt: error: m/model.onnx: not an ONNX model\n")
    assert check_case(case, {"rc": 2}, before) == []
    broken = {
        "exit 3": (3, "onnxopt: internal error: KeyError: 1\n", None),
        "traceback": (2, "Traceback (most recent call last):\nonnxopt: error: x\n", None),
        "stray stderr": (2, "\x1b[1;31m2026 [E:onnxruntime:, x.cc:1] boom\nonnxopt: error: x\n", None),
        "exit 2 with 2 error lines": (2, "onnxopt: error: a\nonnxopt: error: b\n", None),
        "input model.onnx modified": (2, "onnxopt: error: x\n", lambda m: (m / "model.onnx").write_bytes(b"x")),
        "files left behind": (2, "onnxopt: error: x\n", lambda m: (m / ".out.onnx.tmp1").write_bytes(b"x")),
        "output written although exit 2": (2, "onnxopt: error: x\n", lambda m: (m / "out.onnx").write_bytes(b"x")),
        "output unreadable": (0, "", lambda m: (m / "out.onnx").write_bytes(b"not a model")),
    }
    for i, (what, (rc, stderr, touch)) in enumerate(broken.items()):
        case, before = _finished(tmp_path / str(i), rc, stderr, touch=touch)
        problems = check_case(case, {"rc": rc, "signature": ""}, before)
        assert any(sig.startswith(what) for sig, _ in problems), (what, problems)


def test_a_small_cli_campaign_keeps_the_contract(tmp_path):
    """A dozen cases through worker processes, one through a fresh process."""
    c = run_campaign(range(12), root=tmp_path, workers=1, timeout=120, fresh_every=6, real=[], node_cases=0)
    assert c.cases == 12 and sum(c.exits.values()) == 12
    assert not c.findings, [f.__dict__ for f in c.findings.values()]


def test_random_graphs_are_valid_and_run():
    for seed in range(12):
        m = random_graph(seed)
        onnx.checker.check_model(m, full_check=True)
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    assert random_graph(3).SerializeToString() == random_graph(3).SerializeToString()


def test_the_default_preset_keeps_random_graphs_exact():
    kinds = [check_graph(random_graph(seed))[0] for seed in range(8)]
    assert set(kinds) <= {"ok", "skipped"} and kinds.count("ok") >= 6, kinds


class _FlipRelu(Pass):
    name = "test-fuzz-flip-relu"
    summary = "claims exact, turns a Relu into a Sigmoid (tests only)"
    options = {}

    def run(self, model, ctx):
        for node in model.graph.nodes:
            if node.op == "Relu":
                node.op = "Sigmoid"
                return PassResult(True)
        return PassResult(False)


@pytest.fixture
def flip_relu():
    register(_FlipRelu)
    yield _FlipRelu.name
    framework._PASSES.pop(_FlipRelu.name, None)


def test_a_wrong_pass_is_caught_and_shrunk_to_onnx_text(flip_relu):
    proto = onnx.parser.parse_model("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2, 3] x) => (float[2, 3] y, float[2, 3] z) {
            a = Abs(x)  b = Neg(a)  c = Relu(b)  d = Tanh(c)  y = Add(d, x)  z = Sigmoid(x)
        }""")
    kind, detail, _ = check_graph(proto, pipeline=flip_relu)
    assert kind == "wrong", (kind, detail)
    small = shrink(proto, kind, detail, pipeline=flip_relu)
    assert len(small.graph.node) < len(proto.graph.node) and len(small.graph.output) == 1
    assert any(n.op_type == "Relu" for n in small.graph.node)
    again = onnx.parser.parse_model(onnx.printer.to_text(small))
    assert check_graph(again, pipeline=flip_relu)[0] == "wrong"
