"""onnxopt.weights.report: block bytes counted once, shares per layer, the file figures."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.weights.report import compression_report, format_report
from tests.weights.helpers import mlp, write


def test_report_counts_blocks_once_and_measures_the_file(rng):
    w0 = np.where(rng.random((32, 48)) < 0.8, 0, rng.standard_normal((32, 48))).astype(np.float32)
    w1 = np.where(rng.random((48, 16)) < 0.8, 0, rng.standard_normal((48, 16))).astype(np.float32)
    model = mlp(rng.standard_normal((32, 48)).astype(np.float32), rng.standard_normal((48, 16)).astype(np.float32))
    out = write(model, {"w0": w0, "w1": w1})
    report = compression_report(out, model)
    rows = {r["layer"]: r for r in report["layers"]}
    total = report["total"]
    assert rows["w0"]["storage"] == "sparse" and rows["w0"]["nonzeros"] == np.count_nonzero(w0)
    assert abs(sum(r["bytes"] for r in rows.values()) - total["bytes"]) <= 2  # shares of one block
    assert total["dense_bytes"] == (w0.size + w1.size) * 4
    assert total["file_bytes"] == len(out.to_bytes())
    assert total["original_file_bytes"] == len(model.to_bytes())
    assert total["file_ratio"] == pytest.approx(len(model.to_bytes()) / len(out.to_bytes()), rel=1e-3)
    assert total["file_gzip_bytes"] < total["file_bytes"]
    text = format_report(report)
    assert "w0" in text and "total" in text and "smaller" in text
    plain = compression_report(model)
    assert {r["storage"] for r in plain["layers"]} == {"dense"} and "original_file_bytes" not in plain["total"]
