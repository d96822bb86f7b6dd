"""The conformance check every exact pipeline must pass on every model of the suites:
runs on onnxruntime, same outputs as the original, same inputs and outputs, passes the
checker, and a second run changes nothing. Written once here; the pass tests assert only
what is particular to their pass."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxopt import Model, PassManager
from onnxopt.framework import registered_passes
from onnxopt.validate import compare_outputs

#: The pipeline the suites hold to by default: every exact pass, to a fixed point.
PIPELINE = "default"
#: Every suite runs each of these: the first pass alone, and the whole default preset.
PIPELINES = ["dead-nodes", "default"]
#: Every exact pass, each run alone on the PP-OCR models and silero-vad. The node cases,
#: the light architectures and minilm run PIPELINES only, to keep the suite's time.
EXACT_PASSES = [name for name, cls in registered_passes().items() if cls.exact]


def ort_session(proto_bytes: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    return ort.InferenceSession(proto_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def _same(a, b, rtol: float, atol: float, where: str) -> None:
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: sequence differs"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, rtol, atol, f"{where}[{i}]")
        return
    if a is None or b is None:
        assert a is None and b is None, f"{where}: optional differs"
        return
    m = compare_outputs(where, np.asarray(a), np.asarray(b), exact=True, rtol=rtol, atol=atol)
    assert m.passed, f"{where}: {m.reason}"


def check_pipeline_on(proto: onnx.ModelProto, feeds: dict, *, pipeline: str = PIPELINE,
                      rtol: float = 1e-4, atol: float = 1e-5) -> dict:
    """Run ``pipeline`` on ``proto`` and hold the result to the conformance contract.
    Skips (with the reason) when onnxruntime cannot run the original. Returns the node
    counts before and after, the rewritten ``model``, the pipeline's ``result`` and both
    models' output arrays (``reference``, ``outputs``) for a caller's further checks."""
    original = proto.SerializeToString()
    try:
        ref_sess = ort_session(original)
        ref = ref_sess.run(None, feeds)
    except Exception as exc:  # the original itself is out of onnxruntime's reach
        pytest.skip(f"onnxruntime cannot run the original: {str(exc).splitlines()[0][:120]}")
    model = Model.from_proto(proto)
    result = PassManager(pipeline).run(model)
    assert result.converged
    out = model.to_proto()
    onnx.checker.check_model(out)
    assert [i.name for i in out.graph.input] == [i.name for i in proto.graph.input]
    assert [(o.name, o.type) for o in out.graph.output] == [(o.name, o.type) for o in proto.graph.output]
    sess = ort_session(out.SerializeToString())
    got = sess.run(None, feeds)
    names = [o.name for o in ref_sess.get_outputs()]
    assert names == [o.name for o in sess.get_outputs()]
    for name, a, b in zip(names, ref, got):
        _same(a, b, rtol, atol, name)
    again = PassManager(pipeline).run(model)
    assert not again.modified, f"not idempotent: {[r.name for r in again.records if r.modified]}"
    return {"nodes_before": len(proto.graph.node), "nodes_after": len(out.graph.node), "model": model,
            "result": result, "reference": ref, "outputs": got}
