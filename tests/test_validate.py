"""validate: metrics per output, the exact and fidelity bounds, providers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx.parser
import pytest

from models import builders
from onnxopt import Model
from onnxopt.errors import ProviderUnavailable, UsageError
from onnxopt.validate import available_providers, check_providers, compare_outputs, validate


def test_identical_outputs_pass_exactly():
    a = np.array([[1.0, 2.0, 3.0]], np.float32)
    m = compare_outputs("y", a, a.copy(), exact=True)
    assert m.passed and m.max_abs == 0 and m.cosine == pytest.approx(1.0) and m.top1_agreement == 1.0


def test_exact_bound_is_atol_plus_rtol_times_reference():
    ref = np.array([100.0, 0.0], np.float32)
    assert compare_outputs("y", ref, ref + np.array([0.05, 0.0], np.float32), exact=True).passed  # <= 1e-4 + 0.1
    bad = compare_outputs("y", ref, ref + np.array([0.0, 0.01], np.float32), exact=True)
    assert not bad.passed and "1 of 2 values differ" in bad.reason


def test_fidelity_bound_uses_cosine_and_reports_top1():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 10)).astype(np.float32)
    noisy = ref + 0.05 * rng.standard_normal(ref.shape).astype(np.float32)
    m = compare_outputs("logits", ref, noisy, exact=False, min_cosine=0.99)
    assert m.passed and 0.99 < m.cosine < 1.0 and m.top1_agreement is not None
    far = compare_outputs("logits", ref, -ref, exact=False, min_cosine=0.99)
    assert not far.passed and far.cosine == pytest.approx(-1.0) and far.top1_agreement < 0.5


def test_nan_matches_nan_and_mismatched_inf_fails():
    ref = np.array([np.nan, np.inf, 1.0], np.float32)
    assert compare_outputs("y", ref, ref.copy(), exact=True).passed
    assert not compare_outputs("y", ref, np.array([np.nan, -np.inf, 1.0], np.float32), exact=True).passed
    assert not compare_outputs("y", ref, np.array([1.0, np.inf, 1.0], np.float32), exact=True).passed


def test_dtype_and_shape_changes_fail():
    a = np.zeros((2, 2), np.float32)
    assert "dtype changed" in compare_outputs("y", a, a.astype(np.float16), exact=True).reason
    assert "shape changed" in compare_outputs("y", a, a.ravel(), exact=True).reason


def test_integer_and_string_outputs_compare_by_equality():
    assert compare_outputs("k", np.array([1, 2]), np.array([1, 2]), exact=True).passed
    m = compare_outputs("k", np.array([1, 2, 3, 4]), np.array([1, 2, 3, 5]), exact=False, min_cosine=0.7)
    assert m.passed and m.equal_fraction == 0.75
    s = compare_outputs("s", np.array(["a", "b"], object), np.array(["a", "c"], object), exact=True)
    assert not s.passed


def test_validate_two_models_reports_latency_and_feeds():
    ref = Model.from_proto(builders.cnn())
    v = validate(ref, ref.copy(), runs=3, warmup=1)
    assert v.passed and v.mode == "exact"
    (p,) = v.providers
    assert p.provider == "cpu" and p.outputs[0].name == "logits"
    assert set(p.latency_ms) == {"reference", "candidate"}
    assert p.latency_ms["candidate"]["p90"] >= p.latency_ms["candidate"]["median"] > 0
    assert v.feeds["source"] == "generated" and v.feeds["defaulted"] == ["input[0] (N) defaulted to 1"]


def test_validate_catches_a_changed_model():
    ref = Model.from_proto(builders.mlp())
    cand = ref.copy()
    next(n for n in cand.graph.nodes if n.op == "Relu").op = "Sigmoid"
    v = validate(ref, cand, runs=0)
    assert not v.passed and v.failures()


def test_validate_reports_a_signature_change_as_a_failure():
    ref = Model.from_proto(builders.mlp())
    cand = ref.copy()
    cand.graph.outputs[0].name = "renamed"
    v = validate(ref, cand, runs=0)
    assert not v.passed and "different outputs" in v.failures()[0]


def test_unknown_provider_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown provider 'tpu'"):
        check_providers(["tpu"])


@pytest.mark.skipif("cuda" in available_providers(), reason="onnxruntime-gpu is installed here")
def test_cuda_where_absent_is_a_clear_error_not_a_fallback():
    with pytest.raises(ProviderUnavailable, match="provider 'cuda' is not available"):
        check_providers(["cuda"])


@pytest.mark.skipif("cuda" not in available_providers(),
                    reason="CUDA provider not available (needs onnxruntime-gpu and a GPU)")
def test_validate_on_cuda():
    ref = Model.from_proto(builders.cnn())
    v = validate(ref, ref.copy(), providers=["cpu", "cuda"], runs=2)
    assert [p.provider for p in v.providers] == ["cpu", "cuda"] and v.passed


def test_a_failing_reference_is_one_line_and_onnxruntime_logs_only_with_debug(tmp_path):
    """onnxruntime logs a kernel that fails (in colour, several lines) before our error
    says the same in one line: its log reaches stderr only under --debug."""
    proto = onnx.parser.parse_model("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[N, M] x) => (float[3, 5] y) { s = Constant<value = int64[2] {3, 5}>()  y = Reshape(x, s) }
    """)
    path = tmp_path / "reshape.onnx"
    onnx.save(proto, path)
    argv = [sys.executable, "-m", "onnxopt.cli", "optimize", str(path), "-o", str(tmp_path / "out.onnx"), "-q"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxopt: error: the reference model does not run"), lines
    debug = subprocess.run(argv + ["--debug"], capture_output=True, text=True)
    assert "[E:onnxruntime" in debug.stderr and "Traceback" in debug.stderr


def test_a_node_ending_with_an_omitted_optional_input_does_not_crash_validation(tmp_path):
    """Found by fuzzing: onnxruntime's graph optimizer crashed the process (SIGSEGV) on a
    LayerNormalization whose bias is given as "" — a valid model; sessions get the same
    model without the trailing empty input."""
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,4,5] x, float[5] w) => (float[2,3,4,5] y) { y = LayerNormalization<axis = -1>(x, w, "") }
    """)
    path = tmp_path / "ln.onnx"
    onnx.save(proto, path)
    argv = [sys.executable, "-m", "onnxopt.cli", "optimize", str(path), "-o", str(tmp_path / "out.onnx"), "-q"]
    proc = subprocess.run(argv, capture_output=True, text=True)  # a crash would take pytest down with it
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert list(onnx.load(tmp_path / "out.onnx").graph.node[0].input) == ["x", "w", ""]  # the output keeps it
    model = Model.from_proto(proto)
    assert validate(model, model, runs=0).passed
    assert model.graph.nodes[0].inputs[-1].name == ""  # the model validated is left alone


def test_session_threads_caps_sessions_that_name_no_thread_count():
    from onnxopt.validate import make_session, session_threads, thread_cap

    model = Model.from_proto(builders.mlp())
    assert thread_cap() is None
    with session_threads(1):
        assert thread_cap() == 1
        assert make_session(model).get_session_options().intra_op_num_threads == 1
        assert make_session(model, threads=2).get_session_options().intra_op_num_threads == 2
    assert thread_cap() is None
    assert make_session(model).get_session_options().intra_op_num_threads == 0  # onnxruntime's default
