"""quantize on small graphs: where Q/DQ go (ort-cpu and tensorrt), the fused fraction on
onnxruntime's optimized graph, numerics on onnxruntime, every guard, the modes, and the
failures onnxruntime's own quantizer is known for."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_graphsurgeon as gs
import pytest
from onnxopt.passes.quantize.fusion import analyze_fusion
from onnxopt.passes.quantize.plan import select_weight_layers

from onnxopt import Model, PassManager
from onnxopt.errors import CalibrationError, PipelineError
from onnxopt.framework import PassContext, get_pass
from onnxopt.graph import const_value
from onnxopt.tensorinfo import ShapeIndex
from onnxopt.validate import compare_outputs, make_session, run_model
from tests.helpers import cosine, io_signature, run_pass, with_weights


def calib(model: Model, n: int = 16, seed: int = 0, **shapes) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(n)]


def ctx_for(model: Model, data) -> PassContext:
    return PassContext(reference=model, calibration=data)



def ops(model: Model) -> list[str]:
    return [n.op for n in model.graph.nodes]


def producer(t):
    return t.inputs[0] if t.inputs else gs.Node("None")


RNG = np.random.default_rng(7)
CONV_TEXT = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, 16, 16] x, float[8, 4, 3, 3] w1, float[8] b1, float[8, 8, 1, 1] w2, float[8] b2)
      => (float[N, 8, 16, 16] y)
    {
        c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r1 = Relu(c1)
        c2 = Conv (r1, w2, b2)
        s = Add(c2, r1)
        y = Relu(s)
    }
"""


def conv_model() -> Model:
    return with_weights(CONV_TEXT, w1=RNG.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3,
                        b1=RNG.standard_normal(8).astype(np.float32) * 0.1,
                        w2=RNG.standard_normal((8, 8, 1, 1)).astype(np.float32) * 0.3,
                        b2=RNG.standard_normal(8).astype(np.float32) * 0.1)


CONV = conv_model()
CONV_CAL = calib(CONV, x=(1, 4, 16, 16))
MLP_TEXT = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 32] x, float[32, 64] w1, float[64] b1, float[64, 10] w2, float[10] b2) => (float[N, 10] y)
    { m1 = MatMul(x, w1)  a1 = Add(m1, b1)  r1 = Relu(a1)  m2 = MatMul(r1, w2)  y = Add(m2, b2) }
"""
MLP = with_weights(MLP_TEXT, w1=RNG.standard_normal((32, 64)).astype(np.float32) / 6,
                   b1=RNG.standard_normal(64).astype(np.float32) * 0.1,
                   w2=RNG.standard_normal((64, 10)).astype(np.float32) / 8,
                   b2=RNG.standard_normal(10).astype(np.float32) * 0.1)
MLP_CAL = calib(MLP, x=(4, 32))


# --------------------------------------------------------------------------------------
# it fires: structure, fusion, numerics, I/O
# --------------------------------------------------------------------------------------


def test_static_conv_places_qdq_where_onnxruntime_fuses_and_stays_close():
    ran = run_pass("quantize", CONV, ctx_for(CONV, CONV_CAL))
    assert ran.modified
    convs = [n for n in ran.model.graph.nodes if n.op == "Conv"]
    for conv in convs:
        dq_x, dq_w, dq_b = (producer(t) for t in conv.inputs)
        assert dq_x.op == dq_w.op == dq_b.op == "DequantizeLinear"
        assert np.asarray(const_value(dq_w.inputs[0])).dtype == np.int8  # int8 weight
        assert dq_w.attrs["axis"] == 0 and np.asarray(const_value(dq_w.inputs[1])).shape == (8,)  # per channel
        assert np.asarray(const_value(dq_b.inputs[0])).dtype == np.int32  # int32 bias
        assert np.asarray(const_value(dq_x.inputs[2])).dtype == np.uint8  # u8 activations
    # the first Relu is absorbed: Conv -> Relu -> QuantizeLinear
    relu = next(n for n in ran.model.graph.nodes if n.op == "Relu")
    assert [c.op for c in relu.outputs[0].outputs] == ["QuantizeLinear"]
    s = ran.stats
    assert s["quantized_ops"]["Conv"] == 2 and s["weights_quantized"] == 2
    assert s["fused_fraction"] == 1.0 and s["integer_kernels"]["QLinearConv"] == 2
    assert io_signature(ran.model) == io_signature(CONV)
    assert cosine(CONV, ran.model, calib(CONV, 4, seed=9, x=(2, 4, 16, 16)), each_feed=True) > 0.99


def test_a_conv_over_an_rgb_image_stays_float_unless_asked():
    """Three input channels: the CPU provider's float kernel beats its int8 one there, so
    ort-cpu leaves that layer float (with the reason) and quantizes its output for the next
    int8 layer; ``min_in_channels=1`` quantizes it too."""
    rgb_text = CONV_TEXT.replace("float[N, 4, 16, 16] x, float[8, 4, 3, 3] w1", "float[N, 3, 16, 16] x, float[8, 3, 3, 3] w1")
    rgb = with_weights(rgb_text, w1=RNG.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3,
                       b1=RNG.standard_normal(8).astype(np.float32) * 0.1,
                       w2=RNG.standard_normal((8, 8, 1, 1)).astype(np.float32) * 0.3,
                       b2=RNG.standard_normal(8).astype(np.float32) * 0.1)
    cal = calib(rgb, x=(1, 3, 16, 16))
    ran = run_pass("quantize", rgb, ctx_for(rgb, cal))
    first, second = (n for n in ran.model.graph.nodes if n.op == "Conv")
    assert producer(first.inputs[1]).op == "None" and producer(first.inputs[0]).op == "None"
    assert producer(second.inputs[1]).op == "DequantizeLinear"
    assert ran.stats["quantized_ops"]["Conv"] == 1 and ran.stats["fused_fraction"] == 1.0
    assert any(k.startswith("few input channels") for k in ran.stats["skipped"])
    assert cosine(rgb, ran.model, calib(rgb, 2, seed=9, x=(2, 3, 16, 16)), each_feed=True) > 0.99
    both = run_pass("quantize", rgb, ctx_for(rgb, cal), min_in_channels=1)
    assert both.stats["quantized_ops"]["Conv"] == 2 and both.stats["integer_kernels"]["QLinearConv"] == 2


def test_fused_fraction_is_counted_on_onnxruntimes_optimized_graph():
    ran = run_pass("quantize", CONV, ctx_for(CONV, CONV_CAL))
    fusion = analyze_fusion(ran.model)
    assert fusion.fraction == 1.0 and not fusion.unfused
    assert fusion.optimized_ops.get("QLinearConv") == 2 and "Conv" not in fusion.optimized_ops
    # a float Conv sandwiched between Q/DQ by hand is a unit that is not fused
    assert analyze_fusion(CONV).units == []


def test_residual_add_runs_int8_when_both_neighbours_are_int8():
    ran = run_pass("quantize", CONV, ctx_for(CONV, CONV_CAL))
    add = next(n for n in ran.model.graph.nodes if n.op == "Add")
    assert all(producer(t).op == "DequantizeLinear" for t in add.inputs)
    assert ran.stats["integer_kernels"].get("QLinearAdd") == 1


def test_matmul_with_bias_add_per_channel_does_not_raise_and_fuses_to_qgemm():
    """onnxruntime's quantize_static(per_channel=True) raises on MatMul + Add (bias) models."""
    ran = run_pass("quantize", MLP, ctx_for(MLP, MLP_CAL), per_channel=True)
    assert ran.modified and ran.stats["per_channel"] is True
    adds = [n for n in ran.model.graph.nodes if n.op == "Add"]
    assert all(np.asarray(const_value(producer(a.inputs[1]).inputs[0])).dtype == np.int32 for a in adds)
    assert ran.stats["integer_kernels"] == {"QGemm": 2} and ran.stats["fused_fraction"] == 1.0
    assert cosine(MLP, ran.model, calib(MLP, 4, seed=3, x=(8, 32)), each_feed=True) > 0.99


def test_three_d_matmul_keeps_a_float_bias_and_fuses_to_matmulintegertofloat():
    model = with_weights("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, S, 32] x, float[32, 16] w, float[16] b) => (float[N, S, 16] y)
        { m = MatMul(x, w)  y = Add(m, b) }
    """, w=RNG.standard_normal((32, 16)).astype(np.float32) / 6, b=np.ones(16, np.float32))
    ran = run_pass("quantize", model, ctx_for(model, calib(model, x=(1, 5, 32))))
    add = next(n for n in ran.model.graph.nodes if n.op == "Add")
    assert const_value(add.inputs[1]) is not None  # float bias: rank 3 keeps MatMulIntegerToFloat + Add
    assert ran.stats["integer_kernels"] == {"MatMulIntegerToFloat": 1}


def test_affine_ops_are_folded_first_reading_operands_through_shape_ops():
    """BatchNorm and a per-channel Div whose divisor is a Reshape of a constant (as Paddle
    exports it) go into the Conv (onnxopt.affine's fold), so the Conv is followed directly
    by its Relu and QuantizeLinear, as onnxruntime fuses it."""
    model = with_weights("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4, 8, 8] x, float[8, 4, 3, 3] w, float[8] s, float[8] b, float[8] m, float[8] v,
           float[8] k) => (float[N, 8, 8, 8] y)
        {
            c = Conv <pads = [1, 1, 1, 1]> (x, w)
            n = BatchNormalization(c, s, b, m, v)
            shape = Constant <value = int64[4] {1, 8, 1, 1}> ()
            k4 = Reshape(k, shape)
            d = Div(n, k4)
            y = Relu(d)
        }
    """, w=RNG.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3,
        s=(1 + 0.2 * RNG.standard_normal(8)).astype(np.float32), b=(0.1 * RNG.standard_normal(8)).astype(np.float32),
        m=(0.1 * RNG.standard_normal(8)).astype(np.float32), v=(0.5 + RNG.random(8)).astype(np.float32),
        k=(0.5 + RNG.random(8)).astype(np.float32))
    ran = run_pass("quantize", model, ctx_for(model, calib(model, x=(1, 4, 8, 8))))
    assert ran.stats["folded"] == 2 and ran.stats["quantized_ops"] == {"Conv": 1}
    assert not {"BatchNormalization", "Div", "Reshape"} & set(ops(ran.model))
    conv = next(n for n in ran.model.graph.nodes if n.op == "Conv")
    assert [c.op for c in conv.outputs[0].outputs] == ["Relu"]
    assert [c.op for c in next(n for n in ran.model.graph.nodes if n.op == "Relu").outputs[0].outputs] \
        == ["QuantizeLinear"]
    assert cosine(model, ran.model, calib(model, 4, seed=5, x=(2, 4, 8, 8)), each_feed=True) > 0.99


def test_dynamic_shapes_ragged_calibration():
    model = with_weights("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, S, 32] x, float[32, 16] w) => (float[N, S, 16] y) { y = MatMul(x, w) }
    """, w=RNG.standard_normal((32, 16)).astype(np.float32))
    rng = np.random.default_rng(1)
    data = [{"x": rng.standard_normal((1, int(s), 32)).astype(np.float32)} for s in (3, 40, 7, 19)]
    for method in ("minmax", "percentile", "entropy", "mse"):
        ran = run_pass("quantize", model, ctx_for(model, data), method=method)
        assert ran.modified and ran.stats["calibration_samples"] == 4


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_infinite_values_in_calibration_do_not_crash_and_stay_float(method):
    """Padded transformer inputs put -inf (or finfo.min) into masked scores: onnxruntime's
    percentile/entropy calibrators raise on them. Here the tensor stays float."""
    model = with_weights("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 16] x, float[N, 16] mask, float[16, 16] w1, float[16, 8] w2) => (float[N, 8] y)
        { h = MatMul(x, w1)  s = Add(h, mask)  p = Softmax <axis = -1> (s)  y = MatMul(p, w2) }
    """, w1=RNG.standard_normal((16, 16)).astype(np.float32), w2=RNG.standard_normal((16, 8)).astype(np.float32))
    rng = np.random.default_rng(0)
    data = []
    for i in range(8):
        mask = np.zeros((2, 16), np.float32)
        mask[:, 10 + i % 4:] = -np.inf if i % 2 else np.finfo(np.float32).min
        data.append({"x": rng.standard_normal((2, 16)).astype(np.float32), "mask": mask})
    ran = run_pass("quantize", model, ctx_for(model, data), method=method)
    assert ran.modified
    assert "s" not in {n.inputs[0].name for n in ran.model.graph.nodes if n.op == "QuantizeLinear"}
    out = run_model(ran.model, data[1])["y"]
    assert np.isfinite(out).all()


# --------------------------------------------------------------------------------------
# activations: u8 fuses, s8 does not on the CPU provider
# --------------------------------------------------------------------------------------


def test_signed_activations_are_mostly_not_fused_on_the_cpu_provider():
    """onnxruntime's default (s8 activations) leaves QDQ unfused: the model runs float
    kernels plus conversions, slower than fp32. Measured structurally: the fused fraction."""
    s8 = run_pass("quantize", CONV, ctx_for(CONV, CONV_CAL), activations="s8", check_fusion=False)
    u8 = run_pass("quantize", CONV, ctx_for(CONV, CONV_CAL))
    assert s8.stats["activations"] == "s8" and u8.stats["activations"] == "u8"
    assert analyze_fusion(s8.model).fraction < 0.5
    assert u8.stats["fused_fraction"] == 1.0


def test_units_onnxruntime_does_not_fuse_are_returned_to_float():
    ran = run_pass("quantize", CONV, ctx_for(CONV, CONV_CAL), activations="s8")
    assert ran.stats["pruned_unfused"]  # they were tried, measured unfused, and dropped
    if ran.modified:
        assert ran.stats["fused_fraction"] == 1.0 and analyze_fusion(ran.model).fraction == 1.0
    else:
        assert ran.stats["reason"] == "onnxruntime fused none of the quantized units"


# --------------------------------------------------------------------------------------
# it does not fire: one test per guard
# --------------------------------------------------------------------------------------


def test_already_quantized_model_is_left_alone_with_a_reason():
    once = run_pass("quantize", CONV, ctx_for(CONV, CONV_CAL))
    twice = run_pass("quantize", once.model, ctx_for(once.model, CONV_CAL))
    assert not twice.modified
    assert "already quantized" in twice.stats["skipped"]
    assert twice.stats["quantized_ops"]["QuantizeLinear"] >= 2
    assert twice.model.to_bytes() == once.model.to_bytes()


@pytest.mark.parametrize("op", ["DynamicQuantizeLinear", "MatMulInteger"])
def test_other_quantized_ops_are_detected(op):
    text = {
        "DynamicQuantizeLinear": "{ q, s, z = DynamicQuantizeLinear(x)  y = DequantizeLinear(q, s, z) }",
        "MatMulInteger": "{ q, s, z = DynamicQuantizeLinear(x)  i = MatMulInteger(q, q2, z, z)"
                         "  y = Cast <to = 1> (i) }",
    }[op]
    header = ('<ir_version: 8, opset_import: ["" : 17]>\n g (float[2, 2] x, uint8[2, 2] q2) => (float[2, 2] y) '
              if op == "MatMulInteger" else '<ir_version: 8, opset_import: ["" : 17]>\n g (float[2, 2] x) => (float[2, 2] y) ')
    model = Model.from_proto(onnx.parser.parse_model(header + text))
    ran = run_pass("quantize", model, ctx_for(model, []), mode="dynamic")
    assert not ran.modified and op in ran.stats["quantized_ops"]


def test_nothing_to_quantize_is_not_modified():
    model = with_weights("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) { y = Relu(x) }
    """)
    ran = run_pass("quantize", model, ctx_for(model, calib(model, x=(1, 4))))
    assert not ran.modified and "nothing to quantize" in ran.stats["reason"]


def test_weights_that_are_graph_inputs_are_not_constants():
    """IR < 4 initializers listed as inputs may be fed by a user: not quantized."""
    proto = onnx.parser.parse_model("""
        <ir_version: 3, opset_import: ["" : 9]>
        g (float[1, 8] x, float[8, 4] w) => (float[1, 4] y) { y = MatMul(x, w) }
    """)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((8, 4), np.float32), "w"))
    model = Model.from_proto(proto)
    ran = run_pass("quantize", model, ctx_for(model, [{"x": np.ones((1, 8), np.float32)}]))
    assert not ran.modified
    assert "neither a float32 constant" in ran.stats["reason"]


def test_missing_calibration_is_a_clear_error():
    with pytest.raises(CalibrationError, match="needs calibration data"):
        run_pass("quantize", CONV, PassContext(reference=CONV))


@pytest.mark.parametrize("options, message", [
    ({"mode": "weight-only", "bits": 5}, "must be 4 or 8"),
    ({"mode": "weight-only", "block_size": 48}, "power of two"),
    ({"mode": "dynamic", "activations": "s8"}, "mode=dynamic"),
    ({"mode": "dynamic", "profile": "tensorrt"}, "profile=tensorrt"),
    ({"method": "kl"}, "must be one of"),
    ({"percentile": 120}, "<= 100"),
])
def test_bad_options_are_typed_errors(options, message):
    with pytest.raises(PipelineError, match=message):
        run_pass("quantize", CONV, ctx_for(CONV, CONV_CAL), **options)


@pytest.mark.parametrize("options, message", [
    ({"mode": "weight-only", "bits": 5}, "must be 4 or 8"),
    ({"mode": "weight-only", "bits": 6}, "must be 4 or 8"),
    ({"mode": "weight-only", "block_size": 48}, "power of two"),
    ({"mode": "dynamic", "activations": "s8"}, "mode=dynamic"),
    ({"mode": "dynamic", "profile": "tensorrt"}, "profile=tensorrt"),
    ({"mode": "weight-only", "profile": "tensorrt"}, "profile=tensorrt"),
    ({"mode": "dynamic", "bias_correction": "true"}, "bias_correction"),
    ({"mode": "weight-only", "bias_correction": "true"}, "bias_correction"),
    ({"op_types": "Conv;Relu"}, "Relu cannot be quantized with profile=ort-cpu"),
    ({"op_types": "ConvTranspose"}, "ConvTranspose cannot be quantized with profile=ort-cpu"),
    ({"mode": "weight-only", "op_types": "Gemm"}, "Gemm cannot be quantized with mode=weight-only"),
])
def test_option_combinations_are_refused_when_the_pass_is_constructed(options, message):
    with pytest.raises(PipelineError, match=message):
        get_pass("quantize")(**options)
    spec = ",".join(f"{k}={v}" for k, v in options.items())
    with pytest.raises(PipelineError, match=message):
        PassManager(f"dead-nodes,quantize({spec})")  # the whole pipeline is checked before any pass runs


@pytest.mark.parametrize("options", [
    {"mode": "weight-only", "bits": 8, "block_size": 64},
    {"mode": "static", "bits": 5, "block_size": 48},  # weight-only options, not read by static
    {"mode": "dynamic", "activations": "u8"},
    {"mode": "static", "profile": "tensorrt", "activations": "u8"},  # a note at run time, not an error
    {"mode": "static", "profile": "tensorrt", "op_types": ["ConvTranspose"]},
    {"mode": "dynamic", "op_types": ["LSTM"]},
    {"mode": "static", "bias_correction": True},
])
def test_option_combinations_that_work_are_accepted(options):
    quantize = get_pass("quantize")(**options)
    assert all(quantize.opts[k] == v for k, v in options.items())


def test_exclusions_by_op_type_name_and_pattern():
    by_op = run_pass("quantize", MLP, ctx_for(MLP, MLP_CAL), exclude="MatMul")
    assert not by_op.modified
    names = [n.name for n in MLP.graph.nodes if n.op == "MatMul"]
    by_name = run_pass("quantize", MLP, ctx_for(MLP, MLP_CAL), exclude=names[0])
    assert by_name.stats["quantized_ops"]["MatMul"] == 1 and by_name.stats["skipped"] == {"excluded by the user": 1}
    by_glob = run_pass("quantize", MLP, ctx_for(MLP, MLP_CAL), exclude=["*"])
    assert not by_glob.modified


def test_first_and_last_layer_toggles():
    first = run_pass("quantize", MLP, ctx_for(MLP, MLP_CAL), skip_first=True)
    last = run_pass("quantize", MLP, ctx_for(MLP, MLP_CAL), skip_last=True)
    mm = [n.name for n in MLP.graph.nodes if n.op == "MatMul"]

    def quantized(model):
        return [n.name for n in model.graph.nodes if n.op == "MatMul" and producer(n.inputs[1]).op == "DequantizeLinear"]

    assert quantized(first.model) == [mm[1]] and quantized(last.model) == [mm[0]]
    assert "first layer kept in float (skip_first)" in first.stats["skipped"]


def test_subgraph_bodies_stay_float_and_outer_reads_still_work():
    w = RNG.standard_normal((16, 16)).astype(np.float32)
    model = with_weights("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 16] x, bool c, float[16, 16] w) => (float[N, 16] y)
        {
            h = MatMul(x, w)
            r = Relu(h)
            y = If(c) <
                then_branch = t () => (float[N, 16] a) { a = MatMul(r, w) },
                else_branch = e () => (float[N, 16] b) { b = Neg(r) }
            >
        }
    """, w=w)
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((2, 16)).astype(np.float32), "c": np.array(i % 2 == 0)} for i in range(8)]
    ran = run_pass("quantize", model, ctx_for(model, data))
    assert ran.modified and ran.stats["skipped"]["inside a subgraph (If/Loop/Scan bodies stay float)"] == 1
    for feeds in data[:2]:
        got, ref = run_model(ran.model, feeds)["y"], run_model(model, feeds)["y"]
        assert compare_outputs("y", ref, got, exact=False).cosine > 0.99
    assert io_signature(ran.model) == io_signature(model)


def test_affine_ops_inside_subgraph_bodies_are_folded_but_stay_float():
    model = with_weights("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 16] x, bool c, float[16, 16] w, float[16] k) => (float[N, 16] y)
        {
            h = MatMul(x, w)
            r = Relu(h)
            y = If(c) <
                then_branch = t () => (float[N, 16] a) { a0 = MatMul(r, w)  a = Mul(a0, k) },
                else_branch = e () => (float[N, 16] b) { b = Neg(r) }
            >
        }
    """, w=RNG.standard_normal((16, 16)).astype(np.float32), k=(0.5 + RNG.random(16)).astype(np.float32))
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((2, 16)).astype(np.float32), "c": np.array(i % 2 == 0)} for i in range(8)]
    ran = run_pass("quantize", model, ctx_for(model, data))
    assert ran.stats["folded"] == 1 and ran.stats["quantized_ops"] == {"MatMul": 1}
    then = ran.model.graph.nodes[-1].attrs["then_branch"]
    assert [n.op for n in then.nodes] == ["MatMul"]  # folded, and float
    for feeds in data[:2]:
        got, ref = run_model(ran.model, feeds)["y"], run_model(model, feeds)["y"]
        assert compare_outputs("y", ref, got, exact=False).cosine > 0.99


# --------------------------------------------------------------------------------------
# opsets below 13
# --------------------------------------------------------------------------------------

OLD = with_weights(CONV_TEXT.replace('"" : 17', '"" : 11'),
                   w1=RNG.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3,
                   b1=np.zeros(8, np.float32), w2=RNG.standard_normal((8, 8, 1, 1)).astype(np.float32) * 0.3,
                   b2=np.zeros(8, np.float32))


def test_opset_below_13_is_converted_for_per_channel_weights():
    ran = run_pass("quantize", OLD, ctx_for(OLD, CONV_CAL))
    assert ran.stats["opset"] == "11 -> 13" and ran.stats["per_channel"] is True
    assert ran.model.opset_imports[""] == 13
    make_session(ran.model)  # loads: no "Unrecognized attribute: axis for DequantizeLinear"
    assert cosine(OLD, ran.model, CONV_CAL[:2], each_feed=True) > 0.99


def test_opset_below_13_falls_back_to_per_tensor_when_asked():
    ran = run_pass("quantize", OLD, ctx_for(OLD, CONV_CAL), opset_upgrade=False)
    assert ran.stats["per_channel"] is False and "per-tensor" in ran.stats["per_channel_note"]
    assert ran.model.opset_imports[""] == 11
    assert all("axis" not in n.attrs for n in ran.model.graph.nodes if n.op == "DequantizeLinear")
    make_session(ran.model)


# --------------------------------------------------------------------------------------
# the tensorrt profile
# --------------------------------------------------------------------------------------


def test_tensorrt_profile_follows_the_explicit_quantization_rules():
    ran = run_pass("quantize", CONV, ctx_for(CONV, CONV_CAL), profile="tensorrt")
    m = ran.model
    onnx.checker.check_model(m.to_proto(), full_check=True)
    assert ran.stats["activations"] == "s8"
    for node in m.graph.nodes:
        if node.op == "QuantizeLinear":  # symmetric int8: zero point 0
            zp = np.asarray(const_value(node.inputs[2]))
            assert zp.dtype == np.int8 and not zp.any()
        if node.op == "Conv":  # Q/DQ on the input, per-channel int8 weight, float bias
            assert producer(node.inputs[0]).op == "DequantizeLinear"
            dq_w = producer(node.inputs[1])
            assert dq_w.op == "DequantizeLinear" and dq_w.attrs["axis"] == 0
            assert const_value(node.inputs[2]) is not None
    for node in m.graph.nodes:  # every Q/DQ pair feeds an input of Conv/MatMul/Gemm or a residual Add
        if node.op == "QuantizeLinear":
            readers = {c.op for dq in node.outputs[0].outputs for c in dq.outputs[0].outputs}
            assert readers <= {"Conv", "ConvTranspose", "MatMul", "Gemm", "Add"}
        if node.op == "Add":  # residual Add: both inputs quantized
            assert all(producer(t).op == "DequantizeLinear" for t in node.inputs)
    assert cosine(CONV, m, CONV_CAL[:2], each_feed=True) > 0.98


# --------------------------------------------------------------------------------------
# dynamic and weight-only
# --------------------------------------------------------------------------------------


def test_dynamic_mode_needs_no_calibration_and_fuses():
    ran = run_pass("quantize", MLP, PassContext(reference=MLP), mode="dynamic")
    assert ran.modified and "DynamicQuantizeLinear" in ops(ran.model) and "MatMulInteger" in ops(ran.model)
    assert ran.stats["integer_kernels"] == {"DynamicQuantizeMatMul": 2} and ran.stats["fused_fraction"] == 1.0
    assert cosine(MLP, ran.model, MLP_CAL[:4], each_feed=True) > 0.99


def test_weight_only_int4_matmulnbits():
    ran = run_pass("quantize", MLP, PassContext(reference=MLP), mode="weight-only", block_size=16)
    assert ran.stats["weight_format"] == "matmulnbits" and ran.stats["bits"] == 4
    node = next(n for n in ran.model.graph.nodes if n.op == "MatMulNBits")
    assert node.domain == "com.microsoft" and node.attrs["bits"] == 4 and node.attrs["K"] == 32
    assert np.asarray(const_value(node.inputs[1])).shape == (64, 2, 8)  # N, blocks, 16 values in 8 bytes
    assert cosine(MLP, ran.model, MLP_CAL[:4], each_feed=True) > 0.98


WEIGHT_LAYERS = with_weights("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4, 32] x, float[32, 4] k) => (float[4, 32] y, float[4, 4] s)
    {
        h = MatMul(x, w1)
        y = Gemm <alpha = 0.5> (h, w2)
        s = MatMul(x, k)
    }
""", w1=RNG.standard_normal((32, 32)).astype(np.float32) / 6, w2=RNG.standard_normal((32, 32)).astype(np.float32) / 6)
WEIGHT_LAYERS_FEEDS = [{"x": RNG.standard_normal((4, 32)).astype(np.float32),
                        "k": RNG.standard_normal((32, 4)).astype(np.float32)}]


@pytest.mark.parametrize("options, skipped", [
    ({"mode": "dynamic"}, {"Gemm with transA or alpha != 1": 1,
                           "second operand is not a constant (activation x activation)": 1}),
    ({"mode": "weight-only", "block_size": 16},
     {"second operand is not a constant (activation x activation)": 1}),
])
def test_weight_modes_choose_constant_weight_layers_and_say_why_others_stay_float(options, skipped):
    ran = run_pass("quantize", WEIGHT_LAYERS, PassContext(reference=WEIGHT_LAYERS), **options)
    assert ran.modified and ran.stats["quantized"] == 1 and ran.stats["quantized_ops"] == {"MatMul": 1}
    assert ran.stats["skipped"] == skipped
    gemm = next(n for n in ran.model.graph.nodes if n.op == "Gemm")
    assert const_value(gemm.inputs[1]) is not None  # the declined Gemm keeps its float weight
    assert io_signature(ran.model) == io_signature(WEIGHT_LAYERS)
    assert cosine(WEIGHT_LAYERS, ran.model, WEIGHT_LAYERS_FEEDS, each_feed=True) > 0.98


def test_weight_layer_selection_says_which_op_a_mode_cannot_rewrite():
    """The pass refuses such op_types when it is constructed; the plan, called directly,
    still says why the layer stays float."""
    chosen, skipped = select_weight_layers(WEIGHT_LAYERS.copy(), ShapeIndex(WEIGHT_LAYERS), mode="weight-only",
                                           op_types=["MatMul", "Gemm"])
    assert len(chosen) == 1
    assert skipped == {"Gemm is not supported by mode=weight-only": 1,
                       "second operand is not a constant (activation x activation)": 1}


def test_weight_modes_skip_first_keeps_the_first_layer_float():
    ran = run_pass("quantize", WEIGHT_LAYERS, PassContext(reference=WEIGHT_LAYERS), mode="dynamic",
                   skip_first=True, exclude=["y"])
    assert not ran.modified
    assert ran.stats["skipped"] == {"first layer kept in float (skip_first)": 1, "excluded by the user": 1,
                                    "second operand is not a constant (activation x activation)": 1}


def test_weight_only_block_dequantize_is_opset_21():
    ran = run_pass("quantize", MLP, PassContext(reference=MLP), mode="weight-only", weight_format="dequantize",
                   block_size=16)
    assert ran.model.opset_imports[""] == 21
    dq = next(n for n in ran.model.graph.nodes if n.op == "DequantizeLinear")
    assert dq.attrs == {"axis": 0, "block_size": 16}
    assert cosine(MLP, ran.model, MLP_CAL[:4], each_feed=True) > 0.98


# --------------------------------------------------------------------------------------
# the accuracy guard and bias correction
# --------------------------------------------------------------------------------------


def outlier_mlp() -> Model:
    """One hidden unit carries values ~500x the others: with one scale per tensor its
    neighbours quantize to nothing, and min/max calibration collapses the output."""
    w1 = RNG.standard_normal((16, 32)).astype(np.float32) / 4
    w1[:, 0] *= 500.0
    w2 = RNG.standard_normal((32, 8)).astype(np.float32) / 4
    w2[0] /= 500.0
    return with_weights("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 16] x, float[16, 32] w1, float[32, 8] w2) => (float[N, 8] y)
        { h = MatMul(x, w1)  y = MatMul(h, w2) }
    """, w1=w1, w2=w2)


def test_accuracy_guard_keeps_the_sensitive_layer_float_and_reports_it():
    model = outlier_mlp()
    data = calib(model, 16, x=(4, 16))
    plain = run_pass("quantize", model, ctx_for(model, data))
    assert cosine(model, plain.model, data[:4], each_feed=True) < 0.9  # collapsed
    guarded = run_pass("quantize", model, ctx_for(model, data), min_cosine=0.99)
    g = guarded.stats["guard"]
    assert g["met"] and g["cosine"] >= 0.99 and g["cosine_before"] < 0.9
    assert [f["name"] for f in g["float_layers"]] and all(f["sensitivity"] > 0 for f in g["float_layers"])
    assert guarded.stats["quantized"] >= 1  # not everything was given up
    assert cosine(model, guarded.model, data[:4], each_feed=True) >= 0.99


def test_guard_with_top1_bound():
    model = outlier_mlp()
    data = calib(model, 16, x=(4, 16))
    ran = run_pass("quantize", model, ctx_for(model, data), min_top1=0.95)
    assert ran.stats["guard"]["top1"] >= 0.95


def test_bias_correction_moves_the_mean_output_back():
    ran = run_pass("quantize", CONV, ctx_for(CONV, CONV_CAL), bias_correction=True)
    plain = run_pass("quantize", CONV, ctx_for(CONV, CONV_CAL))
    assert ran.stats["bias_corrected"] == 2

    def shift(model):
        total = 0.0
        for feeds in CONV_CAL:
            total += float(np.abs((run_model(model, feeds)["y"] - run_model(CONV, feeds)["y"]).mean(axis=(0, 2, 3))).sum())
        return total

    assert shift(ran.model) < shift(plain.model)


def test_same_input_and_options_give_the_same_bytes():
    a = run_pass("quantize", CONV, ctx_for(CONV, CONV_CAL), method="entropy")
    b = run_pass("quantize", CONV, ctx_for(CONV, CONV_CAL), method="entropy")
    assert a.model.to_bytes() == b.model.to_bytes()


def test_dynamic_mode_quantizes_lstm_weights():
    hidden, inp = 8, 4
    w = RNG.standard_normal((1, 4 * hidden, inp)).astype(np.float32) * 0.5
    r = RNG.standard_normal((1, 4 * hidden, hidden)).astype(np.float32) * 0.5
    b = RNG.standard_normal((1, 8 * hidden)).astype(np.float32) * 0.1
    model = with_weights(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[T, N, {inp}] x, float[1, {4 * hidden}, {inp}] w, float[1, {4 * hidden}, {hidden}] r,
           float[1, {8 * hidden}] b) => (float[T, 1, N, {hidden}] y)
        {{ y = LSTM <hidden_size = {hidden}> (x, w, r, b) }}
    """, w=w, r=r, b=b)
    ran = run_pass("quantize", model, PassContext(reference=model), mode="dynamic")
    node = next(n for n in ran.model.graph.nodes if n.op == "DynamicQuantizeLSTM")
    assert node.domain == "com.microsoft" and ran.stats["quantized_ops"] == {"LSTM": 1}
    assert np.asarray(const_value(node.inputs[1])).shape == (1, inp, 4 * hidden)  # transposed int8 W
    feeds = [{"x": RNG.standard_normal((5, 2, inp)).astype(np.float32)} for _ in range(3)]
    assert cosine(model, ran.model, feeds, each_feed=True) > 0.99
