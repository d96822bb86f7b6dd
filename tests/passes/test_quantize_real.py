"""quantize on real models: PP-OCR det/rec/cls (Paddle exports, opset 11/12, weights as
Constant nodes, dynamic shapes) with rendered-text calibration, the MiniLM sentence
encoder (a PyTorch BERT export, padded ragged token batches), the digits classifier
(accuracy on real labels), the light architectures (IR 3), the CLI, streaming memory and
the CUDA provider where it exists."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxopt.passes.quantize.fusion import analyze_fusion

from models.fetch import light_models
from models.ocr import cls_labels, ctc_decode, mask_iou, ocr_feeds
from models.transformer import token_feeds, transformer
from onnxopt import Model
from onnxopt.framework import PassContext
from onnxopt.graph import const_value
from onnxopt.validate import available_providers, compare_outputs, run_model
from tests.helpers import cosine, io_signature, real_model, run_pass

OCR = ["ppocr-det", "ppocr-rec", "ppocr-cls"]
_cache: dict = {}


def quantized(name: str, **options):
    key = (name, tuple(sorted(options.items())))
    if key not in _cache:
        model = Model.load(real_model(name))
        cal = ocr_feeds(name, 8, seed=0)
        _cache[key] = (model, run_pass("quantize", model, PassContext(reference=model, calibration=cal), **options))
    return _cache[key]


@pytest.mark.parametrize("name", OCR)
def test_ppocr_static_u8_is_fused_at_least_95_percent(name):
    model, ran = quantized(name)
    s = ran.stats
    assert ran.modified and s["fused_fraction"] >= 0.95, s.get("unfused")
    assert s["folded"] > 0  # the Paddle exports' BatchNorm/affine ops were folded first
    assert s["per_channel"] is True and s["opset"] in ("11 -> 13", "12 -> 13")
    assert io_signature(ran.model) == io_signature(model)
    onnx.checker.check_model(ran.model.to_proto())
    assert analyze_fusion(ran.model).fraction == s["fused_fraction"]


def test_ppocr_det_keeps_its_text_mask():
    model, ran = quantized("ppocr-det")
    feeds = ocr_feeds("ppocr-det", 3, seed=50)
    for f in feeds:
        ref, got = run_model(model, f), run_model(ran.model, f)
        key = next(iter(ref))
        assert mask_iou(ref[key], got[key]) > 0.8
    assert cosine(model, ran.model, feeds) > 0.95


def test_ppocr_cls_keeps_its_accuracy_on_labelled_lines():
    model, ran = quantized("ppocr-cls")
    x, y = np.concatenate([f["x"] for f in ocr_feeds("ppocr-cls", 24, seed=77)]), cls_labels(24)
    ref = run_model(model, {"x": x})
    got = run_model(ran.model, {"x": x})
    key = next(iter(ref))
    acc_ref = float((ref[key].argmax(1) == y).mean())
    acc_q = float((got[key].argmax(1) == y).mean())
    assert acc_q >= acc_ref - 0.05 and acc_ref > 0.7


def test_ppocr_rec_decodes_mostly_the_same_text():
    model, ran = quantized("ppocr-rec", method="percentile")
    feeds = ocr_feeds("ppocr-rec", 6, seed=31)
    same = sum(ctc_decode(run_model(model, f)[k]) == ctc_decode(run_model(ran.model, f)[k])
               for f in feeds for k in [next(iter(run_model(model, f)))])
    assert same >= 3


def test_signed_activations_leave_real_models_unfused():
    """The CPU provider fuses QDQ with u8 activations; with s8 (onnxruntime's default)
    most units stay float with conversions around them."""
    model, _ = quantized("ppocr-cls")
    s8 = run_pass("quantize", model, PassContext(reference=model, calibration=ocr_feeds("ppocr-cls", 4)),
                  activations="s8", check_fusion=False)
    assert analyze_fusion(s8.model).fraction < 0.5


def test_tensorrt_profile_on_ppocr_det_passes_the_checker_and_the_rules():
    model = Model.load(real_model("ppocr-det"))
    ran = run_pass("quantize", model, PassContext(reference=model, calibration=ocr_feeds("ppocr-det", 4)),
                   profile="tensorrt")
    onnx.checker.check_model(ran.model.to_proto(), full_check=True)
    assert ran.model.opset_imports[""] >= 13
    convs = [n for n in ran.model.graph.nodes if n.op in ("Conv", "ConvTranspose")]
    assert ran.stats["quantized_ops"]["ConvTranspose"] == 2
    for conv in convs:
        dq_x, dq_w = conv.inputs[0].inputs[0], conv.inputs[1].inputs[0]
        assert dq_x.op == dq_w.op == "DequantizeLinear"
        assert not np.asarray(const_value(dq_x.inputs[2])).any()
        assert np.asarray(const_value(dq_w.inputs[0])).dtype == np.int8
        assert dq_w.attrs.get("axis") == (0 if conv.op == "Conv" else 1)
    feeds = ocr_feeds("ppocr-det", 1, seed=5)
    assert cosine(model, ran.model, feeds) > 0.9


def test_minilm_padded_ragged_batches_quantize_fuse_and_stay_close():
    model = Model.load(real_model("minilm"))
    cal = token_feeds(8, batch=2, seed=0)
    ran = run_pass("quantize", model, PassContext(reference=model, calibration=cal), method="percentile")
    s = ran.stats
    assert s["fused_fraction"] >= 0.95 and s["quantized_ops"]["MatMul"] >= 18
    assert s["float_tensors_nonfinite"] >= 1  # masked scores stay float
    assert io_signature(ran.model) == io_signature(model)
    assert cosine(model, ran.model, token_feeds(4, batch=2, seed=9)) > 0.99


def test_digits_loses_at_most_half_a_point_of_accuracy():
    from models.digits import accuracy, digits_mlp, digits_split

    model = Model.from_proto(digits_mlp())
    x_train, x_test, _, y_test = digits_split()
    cal = [{"input": x_train[i:i + 8]} for i in range(0, 512, 8)]
    ran = run_pass("quantize", model, PassContext(reference=model, calibration=cal))
    assert ran.stats["fused_fraction"] == 1.0
    assert accuracy(ran.model, x_test, y_test) >= accuracy(model, x_test, y_test) - 0.005


def test_transformer_int4_weight_only_is_five_times_smaller_and_runs():
    model = Model.from_proto(transformer())
    ran = run_pass("quantize", model, PassContext(reference=model), mode="weight-only", bits=4)
    assert ran.stats["quantized_ops"] == {"MatMul": 12}
    assert len(model.to_bytes()) >= 5 * len(ran.model.to_bytes())
    feeds = token_feeds(2, vocab=128, low=5, seed=1)
    for f in feeds:
        out = run_model(ran.model, f)["hidden"]
        assert compare_outputs("hidden", run_model(model, f)["hidden"], out, exact=False).cosine > 0.98


@pytest.mark.parametrize("path", [p for p in light_models() if p.stem in ("light_squeezenet", "light_resnet50")],
                         ids=lambda p: p.stem)
def test_light_models_whose_weights_are_graph_inputs_are_left_float(path):
    model = Model.load(path)
    feeds = [{model.graph.inputs[0].name: np.random.default_rng(0).standard_normal(
        [d if isinstance(d, int) else 1 for d in model.graph.inputs[0].shape]).astype(np.float32)}]
    ran = run_pass("quantize", model, PassContext(reference=model, calibration=feeds))
    assert not ran.modified and "weight is not a float32 constant" in ran.stats["reason"]


@pytest.mark.slow
@pytest.mark.parametrize("name", OCR)
def test_accuracy_guard_reaches_cosine_099_on_ppocr(name):
    model = Model.load(real_model(name))
    cal = ocr_feeds(name, 16, seed=0)
    ran = run_pass("quantize", model, PassContext(reference=model, calibration=cal), min_cosine=0.99)
    g = ran.stats["guard"]
    assert g["met"] and g["cosine"] >= 0.99
    assert cosine(model, ran.model, cal[:8]) >= 0.99


@pytest.mark.parametrize("preset", ["int8", "int8-tensorrt"])
def test_int8_presets_clean_up_before_quantizing_ppocr_cls(preset):
    """The presets run the exact clean-up first (its BatchNorms go into the convolutions
    there, so quantize finds nothing left to fold), then quantize with the guard; the
    result keeps the signature and reaches the guard's cosine on samples it never saw."""
    import onnxopt

    model = Model.load(real_model("ppocr-cls"))
    x = np.concatenate([f["x"] for f in ocr_feeds("ppocr-cls", 4, seed=31)])
    q, report = onnxopt.optimize(model, preset, calibration=ocr_feeds("ppocr-cls", 8, seed=0),
                                 feeds={"x": x[:1]})
    modified = {r["name"] for r in report.passes if r["modified"]}
    assert report.passes[-1]["name"] == "quantize"
    assert {"fold-batchnorm", "fuse", "quantize"} <= modified
    stats = report.passes[-1]["stats"]
    assert stats["folded"] == 0 and stats["guard"]["met"]
    assert stats["activations"] == ("s8" if preset == "int8-tensorrt" else "u8")
    if preset == "int8":
        assert stats["fused_fraction"] == 1.0
    assert report.passed
    assert io_signature(q) == io_signature(model)
    onnx.checker.check_model(q.to_proto(), full_check=True)
    assert cosine(model, q, [{"x": x[i:i + 1]} for i in range(1, 4)]) > 0.99
    assert len(q.graph.nodes) < len(model.graph.nodes)


def test_cli_quantizes_with_percentile_calibration_from_an_npz(tmp_path):
    """Exactly: onnxopt optimize m.onnx -o q.onnx -p "quantize(mode=static,method=percentile)"
    --calib calib.npz (a .npz whose first axis is the samples, without their batch axis)."""
    from onnxopt.cli import main

    src = tmp_path / "cls.onnx"
    src.write_bytes(real_model("ppocr-cls").read_bytes())
    x = np.concatenate([f["x"] for f in ocr_feeds("ppocr-cls", 6, seed=2)])
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "q.onnx"
    code = main(["optimize", str(src), "-o", str(out), "-p", "quantize(mode=static,method=percentile)",
                 "--calib", str(tmp_path / "calib.npz")])
    assert code == 0
    q = Model.load(out)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op for n in q.graph.nodes}


def test_cli_says_which_pass_needs_calibration(tmp_path, capsys):
    from onnxopt.cli import main

    src = tmp_path / "cls.onnx"
    src.write_bytes(real_model("ppocr-cls").read_bytes())
    code = main(["optimize", str(src), "-o", str(tmp_path / "q.onnx"), "-p", "quantize", "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert "pass 'quantize' needs calibration data" in err and len(err.strip().splitlines()) == 1


def _calibrate_stream(n: int) -> int:
    """Quantize a CNN on ``n`` samples of 3x96x96 generated one at a time."""
    from models.builders import cnn
    from onnxopt.framework import get_pass

    proto = cnn()
    proto.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 96
    proto.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 96
    model = Model.from_proto(proto)

    def samples():
        rng = np.random.default_rng(0)
        for _ in range(n):
            yield {"input": rng.standard_normal((1, 3, 96, 96)).astype(np.float32)}

    from onnxopt.data import open_calibration

    cal = open_calibration(samples, model)
    get_pass("quantize")(method="percentile", check_fusion=False).run(model, PassContext(calibration=cal))
    return n


def test_calibration_memory_is_flat_in_the_number_of_samples():
    """512 samples of 110 KB would add 56 MB if they were held; peak RSS must grow < 10 %."""
    from benchmarks.common import peak_rss_of

    small = peak_rss_of(_calibrate_stream, 64)
    large = peak_rss_of(_calibrate_stream, 512)
    assert small["ok"] and large["ok"], (small["error"], large["error"])
    assert large["peak_rss"] < 1.10 * small["peak_rss"]


@pytest.mark.skipif("cuda" not in available_providers(),
                    reason="onnxruntime-gpu with a CUDA device is not available here")
@pytest.mark.parametrize("profile", ["ort-cpu", "tensorrt"])
def test_quantized_models_validate_on_cuda(profile):
    from onnxopt.validate import validate

    model, _ = quantized("ppocr-cls")
    ran = run_pass("quantize", model, PassContext(reference=model, calibration=ocr_feeds("ppocr-cls", 4)),
                   profile=profile)
    v = validate(model, ran.model, ocr_feeds("ppocr-cls", 1, seed=4)[0], providers=["cuda"], exact=False,
                 min_cosine=0.98, runs=0)
    assert v.passed, v.failures()
