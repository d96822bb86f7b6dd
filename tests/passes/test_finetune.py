"""finetune: repairs what pruning, sharing, channel removal and int8 cost (fidelity and
accuracy up), keeps zeros, codebooks, Q/DQ grids, the node list and the file's size,
is byte-for-byte deterministic, and each guard: labels, hints, too little data, no
teacher, a student that does not fire, and a converted model that disagrees."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from models import builders  # noqa: E402
from models.digits import accuracy, digits_mlp, digits_split  # noqa: E402
from onnxopt import Model, PassContext, PassManager  # noqa: E402
from onnxopt.errors import CalibrationError, PassFailed, PipelineError, UsageError  # noqa: E402
from onnxopt.framework import Progress, get_pass  # noqa: E402
from onnxopt.validate import run_model  # noqa: E402
from onnxopt.weights.sites import find_weights  # noqa: E402
from tests.helpers import io_signature, run_pass  # noqa: E402

FAST = {"threads": 1, "batch": 32, "lr": 0.003}


@pytest.fixture(scope="module")
def digits():
    model = Model.from_proto(digits_mlp())
    x_train, x_test, y_train, y_test = digits_split()
    calib = [{"input": x_train[i:i + 4]} for i in range(0, 800, 4)]
    return model, calib, x_test, y_test, y_train


def _compress(model: Model, calib, text: str) -> Model:
    work = model.copy()
    PassManager(text).run(work, PassContext(reference=model, calibration=calib))
    return work


def _finetune(student: Model, teacher: Model, calib, **options):
    return run_pass("finetune", student, PassContext(reference=teacher, calibration=calib), **{**FAST, **options})


def _layer_values(model: Model) -> dict[str, np.ndarray]:
    sites, _ = find_weights(model)
    return {s.name: s.value for s in sites}


def _ops(model: Model) -> list[tuple[str, str]]:
    return [(n.op, n.name) for n in model.graph.nodes]


def _constants(model: Model) -> dict[str, tuple]:
    return {t.name: (t.values.dtype, t.values.shape) for t in model.constants()}


def test_retrains_pruned_and_shared_digits_keeping_zeros_codebooks_and_size(digits):
    model, calib, x_test, y_test, _ = digits
    student = _compress(model, calib, "prune-magnitude(sparsity=0.9,scope=global),share-weights(bits=3)")
    ran = _finetune(student, model, calib, steps=150)
    s = ran.stats
    assert ran.modified and s["kept"] and s["fidelity_after"] > s["fidelity_before"] + 0.02
    assert s["loss_after"] < s["loss_before"] / 2 and s["losses"] == {"logits": "kd"}
    assert s["trained"]["storages"] == {"dense": 3, "sparse-idx": 3} and s["holdout_samples"] == 40
    assert accuracy(ran.model, x_test, y_test) > accuracy(student, x_test, y_test) + 0.02
    before, after = _layer_values(student), _layer_values(ran.model)
    for name, old in before.items():
        new = after[name]
        assert np.array_equal(old == 0, new == 0), f"{name}: zeros moved"
        # same clusters: every weight of an old centroid has one new value, and back
        pairs = {(float(a), float(b)) for a, b in zip(old.ravel(), new.ravel())}
        assert len(pairs) == len(np.unique(old)) == len(np.unique(new)) <= 8
        assert not np.array_equal(old, new)
    # the same graph with new values: nodes, constants, signature and file size
    assert _ops(ran.model) == _ops(student) and _constants(ran.model) == _constants(student)
    assert io_signature(ran.model) == io_signature(student)
    assert abs(len(ran.model.to_bytes()) - len(student.to_bytes())) <= 0.01 * len(student.to_bytes())
    h = s["history"]
    assert len(h["step"]) == len(h["loss"]) == s["steps_run"] and h["holdout_step"][0] == 0
    assert len(h["holdout"]) == len(h["holdout_step"]) and max(h["holdout"]) == pytest.approx(s["fidelity_after"],
                                                                                              abs=1e-6)


def test_same_seed_and_data_give_the_same_bytes(digits):
    model, calib, *_ = digits
    student = _compress(model, calib, "prune-magnitude(sparsity=0.8)")
    a = _finetune(student, model, calib, steps=20).model.to_bytes()
    b = _finetune(student, model, calib, steps=20).model.to_bytes()
    c = _finetune(student, model, calib, steps=20, seed=5).model.to_bytes()
    assert a == b and a != c


def test_int8_then_finetune_keeps_the_qdq_nodes_grids_and_zeros(digits):
    model, calib, x_test, y_test, _ = digits
    student = _compress(model, calib, "prune-magnitude(sparsity=0.8,storage=dense),"
                                      "quantize(mode=static,per_channel=false,calib_samples=4,check_fusion=false)")
    ran = _finetune(student, model, calib, steps=40, lr=0.0005)
    s = ran.stats
    assert s["trained"]["storages"] == {"qdq": 6} and ran.modified
    assert s["fidelity_after"] > s["fidelity_before"] + 0.02
    assert accuracy(ran.model, x_test, y_test) > accuracy(student, x_test, y_test) + 0.02
    assert _ops(ran.model) == _ops(student) and _constants(ran.model) == _constants(student)
    old = {t.name: t.values for t in student.constants()}
    new = {t.name: t.values for t in ran.model.constants()}
    changed = [n for n in old if not np.array_equal(old[n], new[n])]
    assert changed and all(old[n].dtype in (np.int8, np.int32) for n in changed)
    for name in changed:  # a pruned weight's integer stays at the zero point
        if old[name].dtype == np.int8:
            assert np.array_equal(old[name] == 0, new[name] == 0), name
    for name, value in old.items():  # scales and zero points stay as the quantize pass chose
        if value.dtype.kind == "f" or value.dtype == np.uint8:
            assert np.array_equal(value, new[name]), name


def test_channels_removed_stay_removed_and_a_hint_reads_the_kept_channels():
    model = Model.from_proto(builders.cnn())
    rng = np.random.default_rng(0)
    calib = [{"input": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)} for _ in range(24)]
    fresh = [{"input": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)} for _ in range(4)]
    student = _compress(model, calib, "prune-channels(ratio=0.5)")
    hint = next(n.outputs[0].name for n in student.graph.nodes if n.op == "Relu")
    ran = _finetune(student, model, calib, steps=30, hints=[f"{hint}=0.5"], loss="mse")
    s = ran.stats
    assert s["losses"][hint] == "hint" and set(s["losses"].values()) == {"mse", "hint"}
    assert ran.modified and s["fidelity_after"] > s["fidelity_before"] + 0.05
    assert _constants(ran.model) == _constants(student)  # the same (smaller) shapes

    def error(m):
        return np.mean([np.linalg.norm(run_model(m, f)["logits"] - run_model(model, f)["logits"]) for f in fresh])
    assert error(ran.model) < 0.5 * error(student)
    # after reconstruct the student is close already: finetune may only keep or improve it
    refit = _compress(model, calib, "prune-channels(ratio=0.5),reconstruct")
    again = _finetune(refit, model, calib, steps=20, lr=0.0003)
    assert again.stats["fidelity_after"] >= again.stats["fidelity_before"]
    assert again.modified or again.model.to_bytes() == refit.to_bytes()


def test_labels_from_a_file_and_their_guards(digits, tmp_path):
    model, calib, _, _, y_train = digits
    student = _compress(model, calib, "prune-magnitude(sparsity=0.8)")
    np.save(tmp_path / "y.npy", y_train[:800])
    ran = _finetune(student, model, calib, steps=10, labels=str(tmp_path / "y.npy"))
    assert ran.stats["labels"] and ran.stats["alpha"] == 0.7
    np.save(tmp_path / "few.npy", y_train[:100])
    with pytest.raises(CalibrationError, match="100 labels for 800 rows"):
        _finetune(student, model, calib, steps=1, labels=str(tmp_path / "few.npy"))
    np.save(tmp_path / "bad.npy", y_train[:800] + 10)
    with pytest.raises(CalibrationError, match="must lie in"):
        _finetune(student, model, calib, steps=1, labels=str(tmp_path / "bad.npy"))


def test_does_not_fire_when_the_student_is_the_teacher(digits):
    model, calib, *_ = digits
    ran = _finetune(model, model, calib, steps=10)
    assert not ran.modified and ran.stats["kept"] is False
    assert ran.model.to_bytes() == model.to_bytes()


def test_guards(digits):
    model, calib, *_ = digits
    student = _compress(model, calib, "prune-magnitude(sparsity=0.8)")
    with pytest.raises(CalibrationError, match="too few to hold any out"):
        _finetune(student, model, calib[:2], steps=1)
    with pytest.raises(CalibrationError, match="needs calibration"):
        run_pass("finetune", student, PassContext(reference=model))
    with pytest.raises(UsageError, match="teacher"):
        run_pass("finetune", student, PassContext(calibration=calib))
    with pytest.raises(UsageError, match="hint 'nope'"):
        _finetune(student, model, calib, steps=1, hints=["nope"])
    with pytest.raises(PipelineError, match="bad name pattern"):
        get_pass("finetune")(include=["("])
    ran = _finetune(student, model, calib, steps=1, include=["^nothing$"])
    assert not ran.modified and ran.stats["skipped"] == "no trainable float weights"


def test_a_converted_model_that_disagrees_stops_naming_the_op(digits, monkeypatch):
    from onnxopt.passes.finetune import ops_tensor

    model, calib, *_ = digits
    student = _compress(model, calib, "prune-magnitude(sparsity=0.8)")
    monkeypatch.setitem(ops_tensor.OPS, "Relu", lambda node, opset: lambda args: args[0].abs())
    before = student.to_bytes()
    with pytest.raises(PassFailed, match=r"first differing node: 'fc0/Relu' \(Relu\)"):
        _finetune(student, model, calib, steps=1)
    assert student.to_bytes() == before


def test_an_op_the_table_cannot_express_is_one_line_naming_it():
    from tests.helpers import parse

    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y, float[N] d)
        <float[4, 4] w = {1.0, 0.5, 0.0, 0.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.0, 0.0, 1.0},
         int64[3] shape = {-1, 2, 2}>
        { y = MatMul(x, w)  m = Reshape(y, shape)  d = Det(m) }""")
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((2, 4)).astype(np.float32)} for _ in range(10)]
    with pytest.raises(UsageError, match=r"cannot express the model in torch: node .*\(Det\)"):
        _finetune(model, model, calib, steps=1)


def test_a_written_model_that_does_not_reproduce_the_student_is_undone(digits, monkeypatch):
    from onnxopt.passes.finetune import params

    model, calib, *_ = digits
    student = _compress(model, calib, "prune-magnitude(sparsity=0.8)")
    before = student.to_bytes()
    monkeypatch.setattr(params, "stored_values", lambda leaf, trained: np.zeros_like(leaf.value))
    with pytest.raises(PassFailed, match="does not reproduce the trained student"):
        get_pass("finetune")(steps=20, **FAST).run(student, PassContext(reference=model, calibration=calib))
    assert student.to_bytes() == before


def test_without_torch_one_line_names_the_extra(digits, monkeypatch):
    import sys

    model, calib, *_ = digits
    for name in [m for m in sys.modules if m.startswith("onnxopt.passes.finetune.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(UsageError, match=r"pip install 'onnxopt\[train\]'"):
        _finetune(model, model, calib, steps=1)


def test_progress_shows_step_loss_and_holdout_fidelity(digits):
    model, calib, *_ = digits
    student = _compress(model, calib, "prune-magnitude(sparsity=0.8)")
    seen = []

    class Recording(Progress):
        def task(self, description, total=None):
            import contextlib

            @contextlib.contextmanager
            def cm():
                yield lambda n=1, note=None: seen.append((description, total, n, note))
            return cm()

    ctx = PassContext(reference=model, calibration=calib, progress=Recording())
    get_pass("finetune")(steps=10, eval_every=5, **FAST).run(student.copy(), ctx)
    notes = [x for x in seen if x[0] == "finetune: training"]
    assert len(notes) == 10 and notes[0][1] == 10
    assert "loss" in notes[0][3] and "holdout" in notes[4][3] and "holdout" not in notes[3][3]


def test_real_model_ppocr_cls_converts_checks_and_trains():
    from models.ocr import ocr_feeds
    from tests.real_models import real_model

    model = Model.load(real_model("ppocr-cls"))
    calib = ocr_feeds("ppocr-cls", 10, seed=3)
    student = _compress(model, calib, "prune-magnitude(sparsity=0.5)")
    ran = _finetune(student, model, calib, steps=4, batch=4, lr=0.0005, patience=0)
    assert ran.stats["steps_run"] == 4 and ran.stats["losses"] == {"save_infer_model/scale_0.tmp_1": "kd"}
    assert ran.stats["fidelity_after"] >= ran.stats["fidelity_before"]
    onnx.checker.check_model(ran.model.to_proto())
    assert _ops(ran.model) == _ops(student)


@pytest.mark.slow
def test_real_model_ppocr_det_half_pruned_recovers_its_text_mask():
    from models.ocr import mask_iou, ocr_feeds
    from tests.real_models import real_model

    model = Model.load(real_model("ppocr-det"))
    train = ocr_feeds("ppocr-det", 32, seed=1, size=(160, 160))
    pages = ocr_feeds("ppocr-det", 4, seed=999)
    student = _compress(model, train, "prune-magnitude(sparsity=0.5)")
    ran = _finetune(student, model, train, steps=150, batch=8, lr=0.002, patience=0)
    assert ran.modified and ran.stats["fidelity_after"] > ran.stats["fidelity_before"] + 0.3

    def iou(m):
        return np.mean([mask_iou(run_model(model, p)["sigmoid_0.tmp_0"], run_model(m, p)["sigmoid_0.tmp_0"])
                        for p in pages])
    assert iou(ran.model) > max(iou(student) + 0.3, 0.6)
    assert abs(len(ran.model.to_bytes()) - len(student.to_bytes())) <= 0.01 * len(student.to_bytes())


def test_weight_decay_shrinks_weights_no_output_needs(digits):
    model, calib, *_ = digits
    student = _compress(model, calib, "prune-magnitude(sparsity=0.95,scope=global,storage=dense)")
    w0, w1 = (_layer_values(student)[k] for k in ("fc0.weight", "fc1.weight"))
    unused = np.flatnonzero((w1 != 0).sum(1) == 0)  # hidden neurons nothing reads
    assert unused.size > 10

    def unused_norm(ran):
        return float(np.abs(_layer_values(ran.model)["fc0.weight"][:, unused]).sum())
    plain = _finetune(student, model, calib, steps=30)
    decayed = _finetune(student, model, calib, steps=30, weight_decay=5.0)
    assert unused_norm(plain) == pytest.approx(float(np.abs(w0[:, unused]).sum()))  # no gradient reaches them
    assert unused_norm(decayed) < 0.9 * unused_norm(plain)
    assert np.array_equal(_layer_values(decayed.model)["fc0.weight"] == 0, w0 == 0)


def test_the_compress_preset_prunes_retrains_shares_and_fine_tunes():
    from onnxopt.framework import parse_pipeline

    steps = [s.pass_ for s in parse_pipeline("compress")]
    assert [p.name for p in steps] == ["prune-magnitude", "finetune", "share-weights", "finetune"]
    assert steps[0].opts.scope == "global" and steps[2].opts.bits == 3 and steps[1].opts.temperature == 4.0


def test_ragged_samples_train_one_by_one_and_vectors_are_matched_by_cosine():
    from models.transformer import token_feeds, transformer

    model = Model.from_proto(transformer())
    calib = token_feeds(10, vocab=128, low=5, seed=0)  # sequences of different lengths
    student = _compress(model, calib, "prune-magnitude(sparsity=0.6)")
    ran = _finetune(student, model, calib, steps=6, batch=4, lr=0.002)
    s = ran.stats
    assert not s["batched"] and s["losses"] == {"hidden": "cosine"}
    assert ran.modified and s["fidelity_after"] > s["fidelity_before"]


def _two_branch_concat() -> Model:
    """Two conv branches concatenated on channels, then a conv head: pruning the
    branches leaves a Concat whose channels are two slices of the teacher's."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(3)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
    nodes = [
        helper.make_node("Conv", ["input", "wa", "ba"], ["a"], pads=[1, 1, 1, 1], name="conv_a"),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["input", "wb", "bb"], ["b"], pads=[1, 1, 1, 1], name="conv_b"),
        helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
        helper.make_node("Concat", ["ra", "rb"], ["cat"], axis=1, name="cat"),
        helper.make_node("Conv", ["cat", "wc", "bc"], ["c"], name="conv_c"),
        helper.make_node("GlobalAveragePool", ["c"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["logits"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes, "concat", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 6])],
        [w("wa", 8, 3, 3, 3), w("ba", 8), w("wb", 6, 3, 3, 3), w("bb", 6), w("wc", 6, 14, 1, 1), w("bc", 6)])
    return Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_a_hint_on_a_concat_of_pruned_branches_reads_the_teacher_channels_each_branch_kept():
    model = _two_branch_concat()
    rng = np.random.default_rng(0)
    calib = [{"input": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)} for _ in range(16)]
    student = _compress(model, calib, "prune-channels(ratio=0.5)")
    widths = {t.name: t.values.shape[0] for t in student.constants() if t.name in ("wa", "wb")}
    assert widths["wa"] < 8 and widths["wb"] < 6  # both branches lost channels
    ran = _finetune(student, model, calib, steps=20, hints=["cat=1.0"], loss="mse")
    assert ran.stats["losses"]["cat"] == "hint"
    assert ran.stats["fidelity_after"] >= ran.stats["fidelity_before"]
    assert _constants(ran.model) == _constants(student)


def test_pruned_weights_in_sparse_storage_train_and_keep_their_zeros(digits):
    """prune-magnitude alone stores the layers sparsely (values scattered into zeros by
    the decoder): those values train, the zeros stay where they are."""
    model, calib, x_test, y_test, _ = digits
    student = _compress(model, calib, "prune-magnitude(sparsity=0.9,scope=global)")
    ran = _finetune(student, model, calib, steps=100)
    s = ran.stats
    assert s["trained"]["skipped"] == {} and s["trained"]["storages"].get("sparse") == 3
    before, after = _layer_values(student), _layer_values(ran.model)
    for name, old in before.items():
        assert np.array_equal(old == 0, after[name] == 0), f"{name}: zeros moved"
        assert not np.array_equal(old, after[name]), f"{name}: not trained"
    assert accuracy(ran.model, x_test, y_test) > accuracy(student, x_test, y_test) + 0.02
    assert _ops(ran.model) == _ops(student) and _constants(ran.model) == _constants(student)


def _scorer() -> Model:
    """An MLP giving one probability per sample ([1, 1]): a voice-activity-like score."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(5)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.4).astype(np.float32), name)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["z"], name="fc2"),
             helper.make_node("Sigmoid", ["z"], ["p"], name="sigmoid")]
    graph = helper.make_graph(nodes, "scorer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 1])],
                              [w("w1", 8, 12), w("b1", 12), w("w2", 12, 1), w("b2", 1)])
    return Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_one_value_per_sample_is_matched_by_value_and_scored_over_all_samples():
    # the cosine of one value is its sign: such an output gets mse, and its holdout
    # fidelity is the cosine over all holdout samples together (below 1 when it differs)
    model = _scorer()
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(200)]
    unseen = [{"x": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(50)]
    student = _compress(model, calib, "share-weights(bits=2,min_size=0)")
    ran = _finetune(student, model, calib, steps=50, batch=16, lr=0.01, patience=0)
    s = ran.stats
    assert s["losses"] == {"p": "mse"}
    assert s["fidelity_before"] < 0.9999 and s["fidelity_after"] > s["fidelity_before"]
    ref = np.concatenate([run_model(model, f)["p"].ravel() for f in unseen])
    got = [np.concatenate([run_model(m, f)["p"].ravel() for f in unseen]) for m in (student, ran.model)]
    assert np.abs(got[1] - ref).mean() < 0.8 * np.abs(got[0] - ref).mean()


def test_samples_that_do_not_stack_share_one_build_of_the_weights_and_get_the_same_gradient(digits):
    """A step over several groups builds the weights (codebook gathers, masks, Q/DQ
    grids) once and sends the summed gradient into the leaves in one backward; the
    leaves' gradient is the one of a build per group."""
    import torch
    from onnxopt.passes.finetune import train as loop
    from onnxopt.passes.finetune.loss import Term
    from onnxopt.passes.finetune.module import GraphModule
    from onnxopt.passes.finetune.params import plan_training

    model, calib, *_ = digits
    student = _compress(model, calib, "prune-magnitude(sparsity=0.8),share-weights(bits=3),int8")
    module = GraphModule(student, plan_training(student))
    out = module.output_names[0]
    terms = [Term(output=out, student=out, kind="mse")]
    rng = np.random.default_rng(0)
    feeds = [{"input": torch.from_numpy(np.array(c["input"]))} for c in calib[:5]]
    targets = [[torch.from_numpy(rng.standard_normal((4, 10)).astype(np.float32))] for _ in feeds]
    data = loop.Samples(feeds, targets, [{} for _ in feeds])
    settings = loop.Settings(steps=1, lr=0.0, batch=5, temperature=1.0, alpha=1.0, patience=0, batched=False,
                             seed=0, eval_every=1)
    groups = [[0, 1], [2], [3, 4]]
    leaves = [p for p, leaf in zip(module.leaf_params, module.plan.leaves) if leaf.trainable]
    assert len(leaves) >= 3

    def grads():
        out = [p.grad.clone() for p in leaves]
        for p in leaves:
            p.grad = None
        return out

    total = loop._backward(module, terms, data, groups, 5, settings, [out])
    once = grads()
    expected = 0.0
    for group in groups:  # the reference: a build of the weights per group
        loss, _ = loop._forward_loss(module, terms, data, group, settings, [out])
        (loss * len(group) / 5).backward()
        expected += float(loss.detach()) * len(group) / 5
    per_group = grads()
    assert total == pytest.approx(expected, rel=1e-6)
    assert any(float(g.abs().sum()) > 0 for g in once)
    for a, b in zip(once, per_group):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
