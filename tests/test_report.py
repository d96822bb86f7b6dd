"""The JSON report keeps its documented schema."""

from __future__ import annotations

import json

from models import builders
from onnxopt import optimize

TOP = {"schema", "onnxopt", "pipeline", "input", "output", "passes", "converged", "groups", "validated",
       "validation", "validation_mode", "validation_bound", "feeds", "seconds", "notes",
       "layers", "search"}  # added within schema 1
MODEL = {"path", "bytes", "nodes", "nodes_total", "initializers", "parameters", "tensor_bytes",
         "ir_version", "opsets", "ops"}  # the last three added within schema 1
LAYER = {"layer", "name", "op", "weight", "parameters", "channels", "channels_before", "bits", "float_by_guard"}
PASS = {"name", "options", "exact", "modified", "seconds", "nodes_before", "nodes_after", "bytes_before",
        "bytes_after", "stats", "group", "round", "rolled_back", "error"}
PROVIDER = {"provider", "passed", "outputs", "latency_ms", "error"}
OUTPUT = {"name", "shape", "dtype", "max_abs", "max_rel", "cosine", "top1_agreement", "equal_fraction",
          "passed", "reason"}


def test_report_schema_is_stable(tmp_path):
    out = tmp_path / "out.onnx"
    _, report = optimize(builders.dead_branches(), "default", output=out, runs=2)
    data = json.loads(report.to_json())
    assert set(data) == TOP and data["schema"] == 1
    assert set(data["input"]) == MODEL and set(data["output"]) == MODEL
    assert data["output"]["path"] == str(out) and data["output"]["bytes"] == out.stat().st_size
    assert data["input"]["nodes"] > data["output"]["nodes"]
    assert all(set(p) == PASS for p in data["passes"])
    (provider,) = data["validation"]
    assert set(provider) == PROVIDER and provider["passed"]
    assert all(set(o) == OUTPUT for o in provider["outputs"])
    assert set(provider["latency_ms"]) == {"reference", "candidate"}
    assert set(provider["latency_ms"]["reference"]) == {"median", "p90"}
    assert data["converged"] and data["groups"][0]["converged"]
    assert data["validation_mode"] == "exact" and data["feeds"]["source"] == "generated"
    assert data["search"] is None
    assert sum(data["input"]["ops"].values()) == data["input"]["nodes_total"]
    assert data["layers"] and all(set(r) == LAYER for r in data["layers"])


def test_no_validate_is_recorded():
    _, report = optimize(builders.mlp(), "dead-nodes", validate_output=False)
    data = report.as_dict()
    assert data["validated"] is False and data["validation"] is None
