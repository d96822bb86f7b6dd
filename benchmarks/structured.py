"""Structured pruning, side by side: what removing channels buys and what it costs.

PP-OCRv4 det and rec and the onnx package's light ResNet-50: FLOPs, parameters,
onnxruntime CPU latency (one thread, interleaved medians) and output fidelity for 10-50 %
of the channels removed, with and without ``reconstruct``. The digits classifier:
accuracy after removing 25/50/75 % of the hidden neurons by pruning or merging, then
``reconstruct`` or ``distill``.

Data: calibration and test inputs for PP-OCR are printed text rendered with Pillow
(:mod:`models.ocr`, at its default sizes; separate seeds for calibration and test; the
latency input is one more page or line at the size in ``SETUP``). The light ResNet-50
ships without weights (its weights are ConstantOfShape outputs): they are materialized
with seeded He-normal values, so its fidelity figures are those of a random network on
random images — only its structure, FLOPs and latency are meaningful. The digits
classifier is scikit-learn's MLP on ``load_digits``: calibration = its train split,
accuracy on its test split.

    make bench-structured            # everything (about 30 minutes on 2 cores)
    python -m benchmarks.structured --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    machine,
    machine_line,
    markdown_table,
    ort_latency,
    save_results,
    update_readme,
)
from models.ocr import ocr_feeds  # noqa: E402
from onnxopt import Model, PassManager  # noqa: E402
from onnxopt.framework import PassContext  # noqa: E402
from onnxopt.model import extras  # noqa: E402
from onnxopt.shapes import infer_shapes  # noqa: E402
from onnxopt.validate import make_session  # noqa: E402

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)


# --------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------


def materialize(model: Model, seed: int = 0) -> Model:
    """A light architecture with real constant weights: every ConstantOfShape output
    becomes an initializer (He-normal filters; BatchNorm as identity, the last BN of each
    residual branch damped so the residual stream stays bounded), and the initializers
    stop being graph inputs (IR 8)."""
    rng = np.random.default_rng(seed)
    work = model.copy()
    g = work.graph
    data = [t for t in g.inputs if not isinstance(t, gs.Constant)]
    values = {t.name: t.values for t in g.inputs if isinstance(t, gs.Constant)}
    keep = []
    for node in g.nodes:
        if node.op != "ConstantOfShape":
            keep.append(node)
            continue
        shape = tuple(int(d) for d in np.ravel(values[node.inputs[0].name]))
        name = node.outputs[0].name
        if len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif name.endswith(("_riv_0", "_var_0", "_s_0")):
            value = np.ones(shape)
            if "branch2c_bn_s" in name:
                value *= 0.2
        else:
            value = np.zeros(shape)
        const = gs.Constant(name, value.astype(np.float32))
        out = node.outputs[0]
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = const
        node.outputs.clear()
        node.inputs.clear()
    g.nodes = keep
    for t in g.inputs:  # initializers listed as inputs: plain constants from now on
        if isinstance(t, gs.Constant):
            vars(t).pop("input_value_info", None)
    g.inputs = data
    ext = extras(g)
    ext.initializers = [t for t in ext.initializers if t.outputs]
    work.ir_version = 8
    return Model.from_proto(work.to_proto())


def ppocr(name: str) -> Model:
    from models.fetch import fetch

    return Model.load(fetch(name))


def resnet50() -> Model:
    from models.fetch import light_models

    return materialize(Model.load(next(p for p in light_models() if "resnet50" in p.name)))


def resnet_feeds(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"gpu_0/data_0": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(n)]


# --------------------------------------------------------------------------------------
# Measures
# --------------------------------------------------------------------------------------


def macs(model: Model, feeds: dict) -> int:
    """Multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul for these inputs."""
    work = model.copy()
    for t in work.graph.inputs:
        if t.name in feeds:
            t.shape = list(feeds[t.name].shape)
    info = infer_shapes(work)
    total = 0
    for n in work.graph.nodes:
        shape = lambda t: info.get(t.name).shape if info.get(t.name) else None  # noqa: E731
        if n.op in ("Conv", "ConvTranspose"):
            w = _const_shape(n.inputs[1], info)
            out, inp = shape(n.outputs[0]), shape(n.inputs[0])
            if w is None or out is None or inp is None:
                continue
            if n.op == "Conv":
                total += int(np.prod(out)) * int(np.prod(w[1:]))
            else:
                total += int(np.prod(inp)) * int(np.prod(w[1:]))
        elif n.op in ("Gemm", "MatMul"):
            a, out = shape(n.inputs[0]), shape(n.outputs[0])
            if a is None or out is None:
                continue
            k = a[0] if n.op == "Gemm" and n.attrs.get("transA", 0) else a[-1]
            total += int(np.prod(out)) * int(k)
    return total


def _const_shape(t, info):
    if isinstance(t, gs.Constant):
        return tuple(t.shape)
    i = info.get(t.name)
    return i.shape if i is not None else None


def run_all(model: Model, feeds: list[dict], names: list[str] | None = None) -> list[dict]:
    from onnxopt.activations import capture_session

    sess = capture_session(model, names) if names else make_session(model)
    names = names or [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(names, f))) for f in feeds]


def cosine(a: list[np.ndarray], b: list[np.ndarray], centered: bool = False) -> float:
    """Cosine of all outputs; ``centered``: of their deviations from the reference's mean
    output (a random network gives nearly the same logits for every input, which would
    make any copy look faithful)."""
    if centered:
        mean = np.mean(a, axis=0)
        a, b = [v - mean for v in a], [v - mean for v in b]
    x = np.concatenate([np.ravel(v) for v in a]).astype(np.float64)
    y = np.concatenate([np.ravel(v) for v in b]).astype(np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def task_metric(name: str, ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    """det: IoU of the text masks (probability > 0.3, DB's threshold); rec: share of
    lines whose greedy CTC decoding is unchanged; resnet: top-1 agreement."""
    if name == "ppocr-det":
        a = np.concatenate([np.ravel(v) > 0.3 for v in ref])
        b = np.concatenate([np.ravel(v) > 0.3 for v in out])
        return float((a & b).sum() / max((a | b).sum(), 1))
    if name == "ppocr-rec":
        same = [_ctc(r) == _ctc(o) for r, o in zip(ref, out)]
        return float(np.mean(same))
    return float(np.mean([np.argmax(r) == np.argmax(o) for r, o in zip(ref, out)]))


def _ctc(probs: np.ndarray) -> tuple:
    seq = np.argmax(probs[0], axis=-1)
    keep = [int(c) for i, c in enumerate(seq) if c != 0 and (i == 0 or c != seq[i - 1])]
    return tuple(keep)


# --------------------------------------------------------------------------------------
# PP-OCR and ResNet-50
# --------------------------------------------------------------------------------------

SETUP = {
    # name: (input size for latency, calibration samples, reconstruct options, output to compare)
    "ppocr-det": ((1, 3, 640, 640), 32, "", None),
    "ppocr-rec": ((1, 3, 48, 320), 32, "", None),
    "resnet50": ((1, 3, 224, 224), 8, "(samples=8,patches=256,max_features=2304)", "r174"),
}


def bench_model(name: str, ratios, round_to: int, runs: int, log) -> dict:
    if name == "resnet50":
        model = resnet50()
        calib, test = resnet_feeds(SETUP[name][1], 0), resnet_feeds(4, 99)
    else:
        model = ppocr(name)
        calib, test = ocr_feeds(name, SETUP[name][1], seed=0), ocr_feeds(name, 8, seed=99)
    shape, _, rc_opts, out_name = SETUP[name]
    lat_feeds = {model.graph.inputs[0].name: test[0][model.graph.inputs[0].name]} if name == "resnet50" else None
    if lat_feeds is None:
        lat_feeds = ocr_feeds(name, 1, seed=5, size=shape[2:])[0]
    names = [out_name] if out_name else None
    ref = run_all(model, test, names)
    key = names[0] if names else next(iter(ref[0]))
    ref_out = [r[key] for r in ref]
    base = {"macs": macs(model, lat_feeds), "params": model.summary().parameters}
    variants: dict[str, Model] = {"original": model}
    rows = []
    plans = [(r, "group") for r in ratios]
    if name == "ppocr-det":
        plans.append((0.3, "sensitivity"))
    for ratio, scope in plans:
        prune = f"prune-channels(ratio={ratio},round_to={round_to}{',scope=sensitivity' if scope != 'group' else ''})"
        label = f"{int(ratio * 100)}%" + ("" if scope == "group" else " (sensitivity)")
        for with_rc in (False, True):
            pipeline = prune + (f",reconstruct{rc_opts}" if with_rc else "")
            work = model.copy()
            t0 = time.perf_counter()
            result = PassManager(pipeline).run(work, PassContext(reference=model, calibration=calib))
            seconds = time.perf_counter() - t0
            onnx.checker.check_model(work.to_proto())
            assert [t.name for t in work.graph.outputs] == [t.name for t in model.graph.outputs]
            out = [r[key] for r in run_all(work, test, names)]
            stats = result.records[0].stats
            row = {"model": name, "ratio": ratio, "scope": scope, "label": label, "reconstruct": with_rc,
                   "channels_removed": stats["channels_removed"], "channels_prunable": stats["channels_prunable"],
                   "params": work.summary().parameters, "macs": macs(work, lat_feeds),
                   "cosine": cosine(ref_out, out, centered=name == "resnet50"), "task": task_metric(name, ref_out, out),
                   "seconds": round(seconds, 1)}
            rows.append(row)
            log(f"  {name} {label} {'+reconstruct' if with_rc else '            '}: "
                f"1-cos {1 - row['cosine']:.4g}, task {row['task']:.3f}, {seconds:.0f}s")
            if with_rc:
                variants[label] = work
    log(f"  {name}: latency, {len(variants)} models interleaved ...")
    lat = ort_latency(variants, lat_feeds, threads=1, runs=runs, warmup=3)
    for row in rows:
        row["latency_ms"] = lat[row["label"]]
        row["speedup"] = lat["original"] / lat[row["label"]]
    return {"base": {**base, "latency_ms": lat["original"]}, "rows": rows, "input": list(shape)}


# --------------------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------------------


def bench_digits(log) -> dict:
    import tempfile

    from models.digits import accuracy, digits_mlp, digits_split

    model = Model.from_proto(digits_mlp())
    x_train, x_test, y_train, y_test = digits_split()
    calib = [{"input": x_train[i:i + 32]} for i in range(0, len(x_train), 32)]
    labels = Path(tempfile.mkdtemp()) / "labels.npy"
    np.save(labels, y_train)
    distill = f"distill(layers=2,labels={labels},samples=1000)"
    methods = {
        "prune": "prune-channels(ratio={r})",
        "prune + reconstruct": "prune-channels(ratio={r}),reconstruct",
        "prune + distill": "prune-channels(ratio={r})," + distill,
        "merge": "merge-neurons(threshold=0,ratio={r})",
        "merge + reconstruct": "merge-neurons(threshold=0,ratio={r}),reconstruct",
        "merge + distill": "merge-neurons(threshold=0,ratio={r})," + distill,
        "merge + reconstruct + distill": "merge-neurons(threshold=0,ratio={r}),reconstruct," + distill,
    }
    base = accuracy(model, x_test, y_test)
    rows = []
    for r in (0.25, 0.5, 0.75):
        for label, text in methods.items():
            work = model.copy()
            PassManager(text.format(r=r)).run(work, PassContext(reference=model, calibration=calib))
            acc = accuracy(work, x_test, y_test)
            rows.append({"ratio": r, "method": label, "accuracy": acc, "params": work.summary().parameters})
            log(f"  digits {int(r * 100)}% {label}: {acc:.4f}")
    return {"base_accuracy": base, "base_params": model.summary().parameters, "rows": rows}


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def nchwc_block() -> int:
    """The channel block of onnxruntime's NCHWc CPU convolutions: 16 with AVX-512, else 8."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return 8
    return 16 if "avx512f" in flags.split() else 8


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    digits = results["digits"]
    for method in dict.fromkeys(r["method"] for r in digits["rows"]):
        pts = [(r["ratio"] * 100, r["accuracy"] * 100) for r in digits["rows"] if r["method"] == method]
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.axhline(digits["base_accuracy"] * 100, color="k", ls="--", lw=1, label="original")
    ax.axhline(digits["base_accuracy"] * 100 - 1, color="grey", ls=":", lw=1, label="original - 1 point")
    ax.set(title="digits MLP: accuracy (test split)", xlabel="hidden neurons removed (%)", ylabel="accuracy (%)",
           ylim=(40, 100))
    ax.legend(fontsize=7)
    for name, data in results["models"].items():
        rows = [r for r in data["rows"] if r["scope"] == "group"]
        for with_rc, style in ((False, "--"), (True, "-")):
            pts = [(r["ratio"] * 100, max(1 - r["cosine"], 1e-6)) for r in rows if r["reconstruct"] == with_rc]
            axes[1].semilogy(*zip(*pts), style, marker="o", label=f"{name}{' + reconstruct' if with_rc else ''}")
        pts = [(r["ratio"] * 100, r["speedup"]) for r in rows if r["reconstruct"]]
        axes[2].plot(*zip(*pts), marker="o", label=name)
    axes[1].set(title="output error (1 - cosine)", xlabel="channels removed per group (%)")
    axes[1].legend(fontsize=7)
    axes[2].axhline(1.3, color="grey", ls=":", lw=1)
    axes[2].set(title="onnxruntime CPU speed-up (1 thread)", xlabel="channels removed per group (%)",
                ylabel="original / pruned latency")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(results: dict) -> str:
    lines = [f"Measured on {results['machine_line']}; one onnxruntime thread, {results['runs']} interleaved "
             "runs, medians (the machine is shared: expect a few % of noise).", ""]
    header = ["model", "removed", "params", "MACs", "latency ms", "speed-up", "1−cos", "1−cos + reconstruct",
              "gain", "task", "task + reconstruct"]
    table = []
    for name, data in results["models"].items():
        b = data["base"]
        table.append([name, "0 %", f"{b['params'] / 1e6:.2f} M", f"{b['macs'] / 1e6:.0f} M", b["latency_ms"],
                      "1.00×", "—", "—", "—", "—", "—"])
        for label in dict.fromkeys(r["label"] for r in data["rows"]):
            plain = next(r for r in data["rows"] if r["label"] == label and not r["reconstruct"])
            rc = next(r for r in data["rows"] if r["label"] == label and r["reconstruct"])
            e0, e1 = 1 - plain["cosine"], 1 - rc["cosine"]
            share = rc["channels_removed"] / max(rc["channels_prunable"], 1)
            table.append([name, f"{label} ({share:.0%})", f"{rc['params'] / 1e6:.2f} M", f"{rc['macs'] / 1e6:.0f} M",
                          rc["latency_ms"], f"{rc['speedup']:.2f}×", f"{e0:.3g}", f"{e1:.3g}",
                          f"{e0 / max(e1, 1e-12):.1f}×", f"{plain['task']:.3f}", f"{rc['task']:.3f}"])
    lines.append(markdown_table(header, table))
    lines += ["", "`removed`: ratio asked per group (share of prunable channels actually removed after rounding "
              f"to multiples of {results['round_to']}). `task`: det — IoU of the text masks (p > 0.3); rec — share of "
              "lines whose greedy CTC decoding is unchanged; resnet50 — top-1 agreement; its "
              "1−cos is measured on the logits minus their mean over the test inputs (random weights: a "
              "random network's outputs barely depend on its input; structure and latency are what count). Inputs: det 640×640, rec 48×320, resnet50 224×224.", ""]
    d = results["digits"]
    methods = list(dict.fromkeys(r["method"] for r in d["rows"]))
    dt = [[m] + [f"{next(r['accuracy'] for r in d['rows'] if r['method'] == m and r['ratio'] == q) * 100:.1f} %"
                 for q in (0.25, 0.5, 0.75)] for m in methods]
    lines.append(f"Digits classifier (test accuracy of the original: {d['base_accuracy'] * 100:.1f} %), hidden "
                 "neurons removed:")
    lines.append("")
    lines.append(markdown_table(["method", "25 %", "50 %", "75 %"], dt))
    lines += ["", "![structured pruning](benchmarks/results/structured.png)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="ratios 0.3 and 0.5 only, fewer runs, no README update")
    p.add_argument("--models", default="ppocr-det,ppocr-rec,resnet50")
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args(argv)
    info = machine()
    print(machine_line(info), flush=True)
    round_to = nchwc_block()
    ratios = (0.3, 0.5) if args.quick else RATIOS
    runs = 5 if args.quick else args.runs

    def log(msg):
        print(msg, flush=True)

    results = {"machine": info, "machine_line": machine_line(info), "runs": runs, "round_to": round_to,
               "models": {}}
    for name in args.models.split(","):
        log(f"{name} ...")
        results["models"][name] = bench_model(name, ratios, round_to, runs, log)
    log("digits ...")
    results["digits"] = bench_digits(log)
    text = render(results)
    print(text)
    if not args.quick:
        save_results("structured", results)
        plot(results, RESULTS / "structured.png")
        update_readme("structured", "### Structured pruning (`make bench-structured`)\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
