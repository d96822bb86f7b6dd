"""Deep Compression on ONNX without retraining: what prune-magnitude and share-weights
give on a real classifier and on the PP-OCR models, and what they cost at run time.

* digits classifier (scikit-learn MLP 64-300-100-10 on load_digits): test accuracy and
  file size for pruning alone, sharing alone and both; a table and a plot of accuracy
  against compression ratio (benchmarks/results/compress_digits.png);
* PP-OCR det/rec/cls on printed text rendered with Pillow (:mod:`models.ocr`): output
  fidelity (cosine, max abs) and the task's own measure (text-mask IoU, character
  agreement, class agreement) against sparsity and bits;
* onnxruntime CPU latency (after session creation) and session-creation time of the
  compressed models against the originals, interleaved, medians.

Run with ``make bench-compress``. Timings are medians over interleaved runs on a shared
machine; the ratios are what to read.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    machine,
    machine_line,
    markdown_table,
    median,
    ort_latency,
    save_results,
    update_readme,
)
from models.digits import digits_mlp, digits_split  # noqa: E402
from models.fetch import cached  # noqa: E402
from models.ocr import ocr_feeds  # noqa: E402
from onnxopt import Model, PassContext, PassManager  # noqa: E402
from onnxopt.weights.report import gzip_size  # noqa: E402

PRUNE = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
BITS = [8, 6, 5, 4, 3, 2]
BOTH = [(s, b) for s in (0.5, 0.6, 0.7, 0.8, 0.9) for b in (5, 4, 3)]
#: Per-layer targets found by a sensitivity sweep (the paper sets them per layer too).
TUNED = ("prune-magnitude(layers=fc0.*=0.7;fc1.*=0.8;fc2.*=0.3),"
         "share-weights(layers=fc0.*=2;fc1.*=3;fc2.*=4,init=kmeans++)")
OCR = ["ppocr-det", "ppocr-rec", "ppocr-cls"]
OCR_PIPELINES = ([f"prune-magnitude(sparsity={s})" for s in (0.1, 0.2, 0.3, 0.5)]
                 + [f"share-weights(bits={b})" for b in (8, 6, 5, 4)]
                 + [f"share-weights(bits={b},init=kmeans++)" for b in (8, 6, 5, 4)]
                 + ["prune-magnitude(sparsity=0.2),share-weights(bits=8,init=kmeans++)"])
RUNTIME = ["prune-magnitude(sparsity=0.5)", "prune-magnitude(sparsity=0.5,storage=dense)", "share-weights(bits=5)",
           "prune-magnitude(sparsity=0.5),share-weights(bits=5)"]


def compress(model: Model, pipeline: str) -> Model:
    out = model.copy()
    PassManager(pipeline).run(out, PassContext(reference=model))
    return out


def sizes(model: Model) -> tuple[int, int]:
    data = model.to_bytes()
    return len(data), gzip_size(data)


def session(data: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------


def digits_section() -> dict:
    reference = Model.from_proto(digits_mlp())
    _, x_test, _, y_test = digits_split()

    def accuracy(model: Model) -> float:
        return float((session(model.to_bytes()).run(None, {"input": x_test})[0].argmax(1) == y_test).mean())

    base_bytes, base_gzip = sizes(reference)
    base_acc = accuracy(reference)
    rows = []

    def measure(family: str, pipeline: str) -> None:
        model = compress(reference, pipeline)
        plain, gz = sizes(model)
        rows.append({"family": family, "pipeline": pipeline, "accuracy": accuracy(model), "bytes": plain,
                     "gzip_bytes": gz, "ratio": base_bytes / plain, "gzip_ratio": base_bytes / gz})

    for s in PRUNE:
        measure("prune", f"prune-magnitude(sparsity={s})")
        measure("prune-global", f"prune-magnitude(sparsity={s},scope=global)")
    for b in BITS:
        measure("share", f"share-weights(bits={b})")
        measure("share-kmeans++", f"share-weights(bits={b},init=kmeans++)")
    for s, b in BOTH:
        measure("both-global", f"prune-magnitude(sparsity={s},scope=global),share-weights(bits={b})")
    measure("tuned", TUNED)
    within = [r for r in rows if r["accuracy"] >= base_acc - 0.01]
    best = max(within, key=lambda r: r["ratio"]) if within else None
    return {"accuracy": base_acc, "bytes": base_bytes, "gzip_bytes": base_gzip, "rows": rows, "best": best}


def plot(digits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"prune": "o-", "prune-global": "o--", "share": "s-", "share-kmeans++": "s--", "both-global": "^:"}
    for family, style in styles.items():
        pts = sorted((r["ratio"], r["accuracy"]) for r in digits["rows"] if r["family"] == family)
        if pts:
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, label=family, markersize=4)
    tuned = [r for r in digits["rows"] if r["family"] == "tuned"]
    ax.plot([r["ratio"] for r in tuned], [100 * r["accuracy"] for r in tuned], "r*", markersize=12,
            label="per-layer tuned")
    ax.axhline(100 * (digits["accuracy"] - 0.01), color="grey", lw=0.8, ls="--", label="original - 1 point")
    ax.axvline(30, color="grey", lw=0.8, ls=":", label="30x target")
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, NullFormatter

    ax.xaxis.set_major_locator(FixedLocator([1, 2, 3, 5, 10, 20, 30, 50]))
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}x")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("compression ratio (original file bytes / compressed file bytes)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(max(0, 100 * digits["accuracy"] - 25), 100)
    ax.set_title("digits MLP (64-300-100-10), no retraining")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# PP-OCR fidelity
# --------------------------------------------------------------------------------------


def task_metric(name: str, ref: np.ndarray, out: np.ndarray) -> float:
    if name == "ppocr-det":  # the text mask DB post-processing thresholds at 0.3
        a, b = ref > 0.3, out > 0.3
        return float((a & b).sum() / max((a | b).sum(), 1))
    return float((ref.reshape(-1, ref.shape[-1]).argmax(-1) == out.reshape(-1, out.shape[-1]).argmax(-1)).mean())


def ocr_section() -> list[dict]:
    rows = []
    for name in OCR:
        path = cached(name)
        if path is None:
            print(f"{name}: not fetched (make models); skipped")
            continue
        reference = Model.load(path)
        (feeds,) = ocr_feeds(name)
        ref = session(reference.to_bytes()).run(None, feeds)[0]
        base_bytes, _ = sizes(reference)
        for pipeline in OCR_PIPELINES:
            model = compress(reference, pipeline)
            out = session(model.to_bytes()).run(None, feeds)[0]
            r, o = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
            plain, gz = sizes(model)
            rows.append({"model": name, "pipeline": pipeline,
                         "cosine": float(r @ o / (np.linalg.norm(r) * np.linalg.norm(o))),
                         "max_abs": float(np.abs(r - o).max()), "task": task_metric(name, ref, out),
                         "ratio": base_bytes / plain, "gzip_ratio": base_bytes / gz})
            print(f"  {name:10s} {pipeline:68s} cos {rows[-1]['cosine']:.4f} task {rows[-1]['task']:.3f}")
    return rows


# --------------------------------------------------------------------------------------
# run time
# --------------------------------------------------------------------------------------


def session_times(models: dict[str, bytes], rounds: int = 15) -> dict[str, dict]:
    """Median wall and CPU seconds to create a session, rounds interleaved."""
    wall = {k: [] for k in models}
    cpu = {k: [] for k in models}
    for _ in range(rounds):
        for k, data in models.items():
            t0, c0 = time.perf_counter(), time.process_time()
            session(data)
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return {k: {"wall": median(wall[k]), "cpu": median(cpu[k])} for k in models}


def optimized_signature(data: bytes) -> tuple:
    """What onnxruntime runs after its graph optimizations (extended level, no
    hardware-specific layouts): the op sequence and the weights' shapes."""
    import os
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        proto = onnx.load(opts.optimized_model_filepath)
    return (tuple(n.op_type for n in proto.graph.node),
            tuple(sorted(tuple(i.dims) for i in proto.graph.initializer)))


def runtime_section() -> list[dict]:
    rows = []
    subjects = [("digits", Model.from_proto(digits_mlp()), {"input": digits_split()[1][:1]})]
    for name in OCR:
        if cached(name) is not None:
            subjects.append((name, Model.load(cached(name)), ocr_feeds(name)[0]))
    for name, reference, feeds in subjects:
        variants = {"original": reference}
        variants.update({p: compress(reference, p) for p in RUNTIME})
        latency = ort_latency(variants, feeds, threads=1, runs=100, warmup=10)
        created = session_times({k: m.to_bytes() for k, m in variants.items()})
        runs_as = optimized_signature(reference.to_bytes())
        for label in RUNTIME:
            rows.append({"model": name, "pipeline": label,
                         "latency_ms": latency[label], "latency_ratio": latency[label] / latency["original"],
                         "session_ms": 1000 * created[label]["wall"],
                         "session_ratio": created[label]["wall"] / created["original"]["wall"],
                         "session_cpu_ratio": created[label]["cpu"] / created["original"]["cpu"],
                         "same_optimized_graph": optimized_signature(variants[label].to_bytes()) == runs_as,
                         "original_latency_ms": latency["original"],
                         "original_session_ms": 1000 * created["original"]["wall"]})
            print(f"  {name:10s} {label:56s} latency x{rows[-1]['latency_ratio']:.3f} "
                  f"session x{rows[-1]['session_ratio']:.2f} (cpu x{rows[-1]['session_cpu_ratio']:.2f})")
    return rows


# --------------------------------------------------------------------------------------


def readme_text(info: dict, digits: dict, ocr: list[dict], runtime: list[dict]) -> str:
    d = digits
    head = (f"Measured by `make bench-compress` on {machine_line(info)}; no retraining anywhere. "
            f"Digits classifier: {d['bytes']:,} bytes, test accuracy {100 * d['accuracy']:.2f} %.")
    table = markdown_table(
        ["family", "pipeline", "test accuracy", "bytes", "ratio", "gzipped ratio"],
        [[r["family"], f"`{r['pipeline']}`", f"{100 * r['accuracy']:.2f} %", f"{r['bytes']:,}",
          f"{r['ratio']:.1f}x", f"{r['gzip_ratio']:.1f}x"] for r in d["rows"]])
    best = d["best"]
    verdict = (f"Smallest within 1 point: `{best['pipeline']}` — {best['bytes']:,} bytes, "
               f"{best['ratio']:.1f}x ({best['gzip_ratio']:.1f}x gzipped), {100 * best['accuracy']:.2f} % "
               "(chosen on the test split among the rows above).") if best else "Nothing stays within 1 point."
    ocr_table = markdown_table(
        ["model", "pipeline", "cosine", "max abs", "task", "ratio", "gzipped ratio"],
        [[r["model"], f"`{r['pipeline']}`", f"{r['cosine']:.4f}", f"{r['max_abs']:.3g}", f"{r['task']:.3f}",
          f"{r['ratio']:.1f}x", f"{r['gzip_ratio']:.1f}x"] for r in ocr])
    rt_table = markdown_table(
        ["model", "pipeline", "runs the original's graph", "latency (ms)", "latency ratio", "session (ms)",
         "session ratio", "session ratio (CPU time)"],
        [[r["model"], f"`{r['pipeline']}`", "yes" if r["same_optimized_graph"] else "no", f"{r['latency_ms']:.3f}",
          f"{r['latency_ratio']:.3f}", f"{r['session_ms']:.1f}", f"{r['session_ratio']:.2f}",
          f"{r['session_cpu_ratio']:.2f}"] for r in runtime])
    return "\n\n".join([
        "### Compression (prune-magnitude, share-weights)",
        head, table, verdict,
        "![accuracy against compression ratio](benchmarks/results/compress_digits.png)",
        "PP-OCR on printed text rendered with Pillow (`models/ocr.py`): cosine and max abs of the main output; "
        "task = text-mask IoU at 0.3 (det), agreement of the greedy characters (rec), of the class (cls).",
        ocr_table,
        "Run time, onnxruntime CPU, one thread: whether the graph onnxruntime runs after its optimizations "
        "is the original's (same ops, same weight shapes: the expansion was folded away), latency after "
        "session creation (interleaved medians of 100 runs) and session creation (wall and CPU time, "
        "interleaved medians), against the original. The machine is shared: ratios within a few per cent "
        "of 1 are noise when the graph is the same.",
        rt_table,
    ])


def main() -> None:
    info = machine()
    print(machine_line(info))
    print("digits ...")
    digits = digits_section()
    for r in digits["rows"]:
        print(f"  {r['pipeline']:95s} acc {100 * r['accuracy']:6.2f} %  {r['bytes']:7,d} B  x{r['ratio']:.1f}")
    print("PP-OCR fidelity ...")
    ocr = ocr_section()
    print("run time ...")
    runtime = runtime_section()
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(digits, RESULTS / "compress_digits.png")
    save_results("compress", {"machine": info, "digits": digits, "ocr": ocr, "runtime": runtime})
    update_readme("compress", readme_text(info, digits, ocr, runtime))
    print(f"wrote {RESULTS / 'compress.json'}, {RESULTS / 'compress_digits.png'} and the README section")


if __name__ == "__main__":
    main()
