"""The compression pipeline end to end: the command line exactly as documented, the
fidelity bound and its clear failure, the JSON report, byte-identical output, the
CUDA provider where there is one, and the light architectures left untouched."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.digits import accuracy, digits_mlp, digits_split
from models.fetch import light_models
from onnxopt import Model, PassManager, optimize
from onnxopt.cli import main
from onnxopt.validate import available_providers
from tests.helpers import io_signature, real_model
from tests.passes.compress_helpers import weights

PIPELINE = "prune-magnitude(sparsity=0.9),share-weights(bits=5)"


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    onnx.save(digits_mlp(), folder / "m.onnx")
    _, x_test, _, y_test = digits_split()
    np.savez(folder / "test.npz", input=x_test[:200])
    return folder


def test_cli_stops_with_one_clear_line_when_the_fidelity_bound_is_missed(digits_files, capsys):
    out = digits_files / "small.onnx"
    code = main(["optimize", str(digits_files / "m.onnx"), "-o", str(out), "-p", PIPELINE, "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("onnxopt: error: validation failed: cpu: output 'logits': cosine")
    assert "< 0.99" in err[0] and "output not written" in err[0]
    assert not out.exists()


def test_cli_compresses_with_a_bound_the_user_gives(digits_files, capsys):
    out, report = digits_files / "small.onnx", digits_files / "report.json"
    args = ["optimize", str(digits_files / "m.onnx"), "-o", str(out), "-p", PIPELINE, "--min-cosine", "0.3",
            "--inputs", str(digits_files / "test.npz"), "--report", str(report)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "share-weights: per layer" in printed and "smaller" in printed
    original = (digits_files / "m.onnx").stat().st_size
    assert out.stat().st_size < original / 12
    onnx.checker.check_model(onnx.load(out), full_check=True)
    _, x_test, _, y_test = digits_split()
    assert accuracy(str(out), x_test, y_test) > 0.5  # heavily pruned without retraining, still a classifier
    data = json.loads(report.read_text())
    prune, share = data["passes"]
    assert prune["name"] == "prune-magnitude" and prune["stats"]["sparsity"] == 0.9
    rows = share["stats"]["layers"]
    assert [r["layer"] for r in rows] == ["fc0.weight", "fc1.weight", "fc2.weight"]
    assert {"params", "nonzeros", "bits_per_weight", "bytes", "gzip_bytes", "ratio", "storage"} <= set(rows[0])
    total = share["stats"]["total"]
    assert total["file_bytes"] == out.stat().st_size and total["original_file_bytes"] == original
    assert data["output"]["bytes"] == out.stat().st_size
    # The same options give the same bytes.
    again = digits_files / "again.onnx"
    assert main(args[:3] + [str(again)] + args[4:-2] + ["-q"]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_api_pipeline_with_materialize_gives_dense_shared_weights():
    model, report = optimize(digits_mlp(), "prune-magnitude(sparsity=0.5),share-weights(bits=5),materialize",
                             min_cosine=0.9, runs=0)
    assert report.passed
    for value in weights(model).values():
        assert len(np.unique(value)) <= 32 and (value == 0).mean() >= 0.5
    assert [n.op for n in model.graph.nodes] == ["MatMul", "Add", "Relu", "MatMul", "Add", "Relu", "MatMul", "Add"]


@pytest.mark.parametrize("path", light_models(), ids=lambda p: p.stem)
def test_light_architectures_have_nothing_to_compress(path):
    """Their weights are generated from initializers listed as graph inputs (a user may
    override them): nothing is constant, nothing changes."""
    model = Model.load(path)
    result = PassManager("prune-magnitude(min_size=0),share-weights(min_size=0)").run(model)
    assert not result.modified
    assert io_signature(model) == io_signature(Model.load(path))


@pytest.mark.skipif("cuda" not in available_providers(),
                    reason="onnxruntime here has no CUDA provider (install onnxruntime-gpu on a GPU machine)")
def test_compressed_model_runs_on_cuda_like_on_cpu():
    model = Model.load(real_model("ppocr-cls"))
    PassManager("prune-magnitude(sparsity=0.3),share-weights(bits=6)").run(model)
    from models.ocr import ocr_feeds

    (feeds,) = ocr_feeds("ppocr-cls")
    cpu = ort.InferenceSession(model.to_bytes(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    gpu = ort.InferenceSession(model.to_bytes(), providers=["CUDAExecutionProvider"]).run(None, feeds)[0]
    assert np.allclose(cpu, gpu, atol=1e-3)
