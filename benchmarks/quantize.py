"""Quantization side by side: onnxopt's ``quantize`` against onnxruntime's own quantizer
(``quantize_static``: QDQ, per-channel, MinMax, after ``quant_pre_process``; and
``quantize_dynamic``), same calibration and evaluation data, in one run.

Models: PP-OCR det/rec/cls (calibrated on text rendered with Pillow, evaluated on other
renderings), the digits classifier (calibration from its train split, accuracy on its test
split), the MiniLM sentence encoder from a PyPI wheel (padded ragged token batches), and a
small transformer builder for int4 weight-only. Figures: file size ratio, onnxruntime CPU
latency ratio to fp32 (1 thread and all threads; ORT_ENABLE_ALL; medians of interleaved
runs), fused fraction, fidelity (cosine over the evaluation set, worst output; max abs;
task metrics), seconds to quantize, and peak memory of calibration with 64 vs 512
samples (child processes).

    make bench-quantize        # or: python -m benchmarks.quantize [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from benchmarks.common import (
    machine,
    machine_line,
    markdown_table,
    ort_latency,
    peak_rss_of,
    save_results,
    update_readme,
)

CAL_N, EVAL_N = 64, 16


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------


def model_data(name: str, n_cal: int = CAL_N, n_eval: int = EVAL_N):
    """(path or proto, calibration feeds, evaluation feeds, task) for a benchmark model."""
    from models.fetch import fetch

    if name.startswith("ppocr"):
        from models.ocr import cls_labels, ocr_feeds

        if name == "ppocr-cls":
            ev = ocr_feeds(name, n_eval, seed=99)
            return fetch(name), ocr_feeds(name, n_cal, seed=0), ev, ("direction accuracy", cls_labels(n_eval))
        return fetch(name), ocr_feeds(name, n_cal, seed=0), ocr_feeds(name, n_eval, seed=99), None
    if name == "digits":
        from models.digits import digits_mlp, digits_split

        x_tr, x_te, _, y_te = digits_split()
        cal = [{"input": x_tr[i:i + 1]} for i in range(n_cal)]
        ev = [{"input": x_te}]
        return digits_mlp(), cal, ev, ("accuracy", y_te)
    if name == "minilm":
        from models.transformer import token_feeds

        return fetch(name), token_feeds(n_cal, seed=0), token_feeds(n_eval, seed=99), None
    if name == "transformer":
        from models.transformer import token_feeds, transformer

        kw = dict(vocab=128, low=5)
        return transformer(), token_feeds(n_cal, seed=0, **kw), token_feeds(n_eval, seed=99, **kw), None
    raise KeyError(name)


def latency_feeds(name: str, ev: list[dict]) -> dict:
    if name in ("minilm", "transformer"):
        from models.transformer import token_feeds

        kw = dict(vocab=128, low=5) if name == "transformer" else {}
        return token_feeds(1, lengths=(128, 128), seed=5, **kw)[0]
    return ev[0]


# --------------------------------------------------------------------------------------
# the contenders
# --------------------------------------------------------------------------------------


def ours(src, cal, pipeline: str) -> tuple[bytes, float, dict]:
    from onnxopt import Model, PassManager
    from onnxopt.framework import PassContext

    model = Model.load(src) if isinstance(src, (str, Path)) else Model.from_proto(src)
    reference = model.copy()
    t0 = time.perf_counter()
    result = PassManager(pipeline).run(model, PassContext(reference=reference, calibration=cal))
    seconds = time.perf_counter() - t0
    return model.to_bytes(), seconds, result.records[-1].stats


class _Reader:
    def __init__(self, feeds):
        self.feeds = feeds
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.feeds)


class _InFolder:
    """Run onnxruntime's quantization tools inside a scratch folder: they write temporary
    files (sym_shape_infer_temp.onnx, external data) into the current one."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __enter__(self):
        self.old = os.getcwd()
        os.chdir(self.folder)

    def __exit__(self, *exc):
        os.chdir(self.old)


def ort_static(src, cal, tmp: Path, activations: str) -> tuple[bytes | None, float, str]:
    with _InFolder(tmp):
        return _ort_static(src, cal, tmp, activations)


def _ort_static(src, cal, tmp: Path, activations: str) -> tuple[bytes | None, float, str]:
    """onnxruntime's quantize_static: QDQ, per-channel, MinMax, after quant_pre_process.
    Failures are recorded; a per-channel result that does not load below opset 13 is
    retried on the model converted to opset 13 (the fairest chance we can give it)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(_Reader, CalibrationDataReader):
        pass

    notes = []
    path = tmp / "src.onnx"
    onnx.save(onnx.load(src) if isinstance(src, (str, Path)) else src, path)
    t0 = time.perf_counter()
    for attempt in ("as is", "opset 13"):
        if attempt == "opset 13":
            from onnx import version_converter

            onnx.save(version_converter.convert_version(onnx.load(path), 13), path)
        pre = tmp / "pre.onnx"
        try:
            quant_pre_process(str(path), str(pre))
        except Exception as exc:
            notes.append(f"quant_pre_process raised ({_line(exc)}); retried without symbolic shapes")
            quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
        out = tmp / f"ort_{activations}.onnx"
        try:
            quantize_static(str(pre), str(out), Reader(cal), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8 if activations == "u8" else QuantType.QInt8,
                            weight_type=QuantType.QInt8)
        except Exception as exc:
            notes.append(f"quantize_static raised: {_line(exc)}")
            return None, time.perf_counter() - t0, "; ".join(notes)
        try:
            from onnxopt.validate import make_session

            make_session(out.read_bytes())
            return out.read_bytes(), time.perf_counter() - t0, "; ".join(notes)
        except Exception as exc:
            notes.append(f"its output does not load ({_line(exc)})" + ("; retried on the model converted to opset 13"
                                                                         if attempt == "as is" else ""))
    return None, time.perf_counter() - t0, "; ".join(notes)


def ort_dynamic(src, tmp: Path) -> tuple[bytes | None, float, str]:
    with _InFolder(tmp):
        return _ort_dynamic(src, tmp)


def _ort_dynamic(src, tmp: Path) -> tuple[bytes | None, float, str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = tmp / "src_dyn.onnx"
    onnx.save(onnx.load(src) if isinstance(src, (str, Path)) else src, path)
    out = tmp / "ort_dynamic.onnx"
    t0 = time.perf_counter()
    try:
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
        from onnxopt.validate import make_session

        make_session(out.read_bytes())
    except Exception as exc:
        return None, time.perf_counter() - t0, f"quantize_dynamic: {_line(exc)}"
    return out.read_bytes(), time.perf_counter() - t0, ""


def _line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


# --------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------


def fidelity(ref: bytes, cand: bytes, ev: list[dict], task) -> dict:
    from onnxopt.validate import make_session

    a, b = make_session(ref), make_session(cand)
    names = [o.name for o in a.get_outputs()]
    dots, na, nb = (np.zeros(len(names)) for _ in range(3))
    max_abs = 0.0
    outs_a, outs_b = [], []
    for feeds in ev:
        ra, rb = a.run(names, feeds), b.run(names, feeds)
        outs_a.append(ra[0])
        outs_b.append(rb[0])
        for k, (x, y) in enumerate(zip(ra, rb)):
            if x.dtype.kind != "f":
                continue
            x64, y64 = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
            dots[k] += x64 @ y64
            na[k] += x64 @ x64
            nb[k] += y64 @ y64
            max_abs = max(max_abs, float(np.max(np.abs(x64 - y64))) if x64.size else 0.0)
    cos = [d / np.sqrt(p * q) if p > 0 and q > 0 else (1.0 if p == q else 0.0)
           for d, p, q in zip(dots, na, nb) if p > 0 or q > 0]
    out = {"cosine": float(min(cos)) if cos else None, "max_abs": max_abs}
    if task is not None:
        label, y = task
        ya = np.concatenate([o.reshape(o.shape[0], -1) for o in outs_a]).argmax(1)
        yb = np.concatenate([o.reshape(o.shape[0], -1) for o in outs_b]).argmax(1)
        out["task"] = label
        out["task_ref"] = float((ya == y).mean())
        out["task_value"] = float((yb == y).mean())
    return out


def fused(data: bytes) -> float | None:
    from onnxopt.passes.quantize.fusion import analyze_fusion

    f = analyze_fusion(onnx.load_from_string(data))
    return f.fraction


def calibrate_in_child(name: str, n: int, tool: str) -> int:
    """Calibrate ``name`` on ``n`` samples, generated one at a time (child process)."""
    src, _, _, _ = model_data(name, n_cal=1, n_eval=1)

    def stream():
        # regenerate lazily: the samples are never all in memory
        for i in range(n):
            yield model_data_one(name, i)

    if tool == "onnxopt":
        from onnxopt import Model
        from onnxopt.data import open_calibration
        from onnxopt.framework import PassContext, get_pass

        model = Model.load(src) if isinstance(src, (str, Path)) else Model.from_proto(src)
        cal = open_calibration(stream, model)
        get_pass("quantize")(method="percentile", check_fusion=False).run(model, PassContext(calibration=cal))
        return n
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = stream()

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp, _InFolder(Path(tmp)):
        path = Path(tmp) / "m.onnx"
        proto = onnx.load(src) if isinstance(src, (str, Path)) else src
        onnx.save(proto, path)
        from onnxruntime.quantization import CalibrationMethod

        quantize_static(str(path), str(Path(tmp) / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=False, calibrate_method=CalibrationMethod.Percentile)
    return n


def model_data_one(name: str, i: int) -> dict:
    if name.startswith("ppocr"):
        from models.ocr import ocr_feeds

        return ocr_feeds(name, 1, seed=1000 + i)[0]
    from models.transformer import token_feeds

    return token_feeds(1, seed=1000 + i)[0]


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

VARIANTS = {
    "onnxopt int8": "default,quantize",
    "onnxopt int8 + guard": "int8",
    "onnxopt dynamic": "quantize(mode=dynamic)",
    "onnxopt int4 weight-only": "quantize(mode=weight-only)",
}
PLAN = {
    "ppocr-det": ["onnxopt int8", "onnxopt int8 + guard", "ort static s8", "ort static u8"],
    "ppocr-rec": ["onnxopt int8", "onnxopt int8 + guard", "ort static s8", "ort static u8"],
    "ppocr-cls": ["onnxopt int8", "onnxopt int8 + guard", "ort static s8", "ort static u8"],
    "digits": ["onnxopt int8", "onnxopt int8 + guard", "ort static s8", "ort static u8", "onnxopt dynamic",
               "ort dynamic"],
    "minilm": ["onnxopt int8", "onnxopt int8 + guard", "ort static s8", "ort static u8", "onnxopt dynamic",
               "ort dynamic", "onnxopt int4 weight-only"],
    "transformer": ["onnxopt int8", "onnxopt int4 weight-only", "onnxopt dynamic"],
}


def run(models: list[str], quick: bool) -> dict:
    results: dict = {"machine": machine(), "calibration_samples": CAL_N, "evaluation_samples": EVAL_N,
                     "models": {}, "memory": {}}
    threads_all = os.cpu_count() or 1
    for name in models:
        print(f"== {name}", flush=True)
        src, cal, ev, task = model_data(name, n_cal=16 if quick else CAL_N, n_eval=4 if quick else EVAL_N)
        proto = onnx.load(src) if isinstance(src, (str, Path)) else src
        fp32 = proto.SerializeToString()
        candidates: dict[str, bytes] = {}
        rows: dict[str, dict] = {"fp32": {"bytes": len(fp32)}}
        with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
            for variant in PLAN[name]:
                t = Path(tmp)
                info: dict = {}
                if variant in VARIANTS:
                    data, seconds, stats = ours(proto, cal, VARIANTS[variant])
                    info["stats"] = {k: v for k, v in stats.items() if k in (
                        "fused_fraction", "quantized", "guard", "pruned_unfused", "opset", "skipped", "reason")}
                    note = ""
                    if "guard" in stats:
                        g = stats["guard"]
                        note = f"{len(g.get('float_layers', []))} layers kept float"
                elif variant.startswith("ort static"):
                    data, seconds, note = ort_static(proto, cal, t, variant.split()[-1])
                else:
                    data, seconds, note = ort_dynamic(proto, t)
                info.update(seconds=round(seconds, 2), note=note)
                if data is not None:
                    candidates[variant] = data
                    info["bytes"] = len(data)
                    info["size_ratio"] = len(fp32) / len(data)
                    info["fused_fraction"] = fused(data) if "weight-only" not in variant else None
                    info.update(fidelity(fp32, data, ev, task))
                rows[variant] = info
                print(f"   {variant}: {info.get('seconds')} s {info.get('note', '')}", flush=True)
        feeds = latency_feeds(name, ev)
        runs = 10 if quick else 40
        for threads in (1, threads_all):
            lat = ort_latency({"fp32": fp32, **candidates}, feeds, threads=threads, runs=runs, warmup=5)
            for variant, ms in lat.items():
                rows[variant][f"ms_{threads}t"] = ms
                rows[variant][f"speedup_{threads}t"] = lat["fp32"] / ms
        if task is not None:
            rows["fp32"].update(fidelity(fp32, fp32, ev, task))
        results["models"][name] = rows
    if not quick:
        results["memory"] = memory()
    return results


def memory() -> dict:
    """Peak RSS of calibration on 64 and 512 samples, onnxopt and onnxruntime, each in a
    fresh child process."""
    out = {}
    for name in ("ppocr-cls", "minilm"):
        for tool in ("onnxopt", "onnxruntime"):
            figures: dict = {}
            for n in (64, 512):
                r = peak_rss_of(calibrate_in_child, name, n, tool)
                figures[n] = r["peak_rss"] if r["ok"] else None
                if not r["ok"]:
                    figures[f"error_{n}"] = r["error"]
            out[f"{name} / {tool}"] = figures
            print(f"   memory {name} {tool}: {figures}", flush=True)
    return out


_SHORT = [
    (r"quant_pre_process raised \(Incomplete symbolic shape inference\); retried without symbolic shapes",
     "pre-process: symbolic shapes failed"),
    (r"its output does not load \(\[ONNXRuntimeError\] : 10 : INVALID_GRAPH[^;]*DequantizeLinear[^;]*",
     "per-channel output does not load below opset 13 (Unrecognized attribute: axis for DequantizeLinear)"),
    (r"its output does not load \([^;]*", "output does not load"),
    (r"retried on the model converted to opset 13", "rerun on the opset-13 model"),
]


def _short(note: str) -> str:
    import re

    for pattern, repl in _SHORT:
        note = re.sub(pattern, repl, note)
    parts = list(dict.fromkeys(p.strip() for p in note.split(";") if p.strip()))
    return "; ".join(parts)[:200]


def tables(results: dict) -> str:
    m = results["machine"]
    cores = m["cores"]
    lines = ["### Quantization against onnxruntime's quantizer (`make bench-quantize`)",
             "",
             f"Measured on {machine_line(m)}; calibration {results['calibration_samples']} samples, "
             f"evaluation {results['evaluation_samples']} other samples; latency = median of interleaved runs "
             f"(ORT_ENABLE_ALL, CPU provider), as a speed-up over fp32 (above 1 is faster). The machine is "
             "shared with other work: timings are noisy.",
             "",
             "Inputs: PP-OCR calibration and evaluation images are text rendered with Pillow's bundled font "
             "(`models/ocr.py`, different seeds; the cls task is the direction of lines turned 180°); "
             "MiniLM gets random token ids in padded batches of ragged lengths (no tokenizer ships with it); "
             "digits uses its train split to calibrate and its test split to measure accuracy. "
             "`onnxopt int8` is the `default` clean-up then `quantize` with its defaults (ort-cpu, u8, "
             "per-channel, minmax: the settings of `ort static u8`, whose clean-up is `quant_pre_process`); "
             "`onnxopt int8 + guard` is the `int8` preset (the same clean-up, percentile calibration, guard at "
             "cosine 0.995). `fused` is the fused fraction "
             "measured the same way for every model (`onnxopt.passes.quantize.fusion`).", ""]
    header = ["model", "variant", "size ×", "speed-up 1 thread", f"speed-up {cores} threads", "fused",
              "cosine", "max abs", "task", "quantize s", "note"]
    rows = []
    for name, variants in results["models"].items():
        for variant, r in variants.items():
            if variant == "fp32":
                task = f"{r['task']}: {r['task_ref']:.4f}" if "task" in r else ""
                rows.append([name, "fp32", 1.0, 1.0, 1.0, None, None, None, task,
                             None, f"{r['ms_1t']:.2f} ms (1 thread)"])
                continue
            task = f"{r['task_value']:.4f}" if "task_value" in r else ""
            cos = f"{r['cosine']:.5f}" if r.get("cosine") is not None else None
            rows.append([name, variant, r.get("size_ratio"), r.get("speedup_1t"), r.get(f"speedup_{cores}t"),
                         r.get("fused_fraction"), cos, r.get("max_abs"), task, r.get("seconds"),
                         _short(r.get("note") or "") or ("does not run" if "bytes" not in r else "")])
    lines.append(markdown_table(header, rows))
    if results["memory"]:
        lines += ["", "Peak memory (RSS, child process) of calibration, samples generated one at a time:", ""]
        mem_rows = []
        for key, f in results["memory"].items():
            a, b = f.get(64) or f.get("64"), f.get(512) or f.get("512")
            growth = f"{(b / a - 1) * 100:+.1f} %" if a and b else (f.get("error_512") or f.get("error_64") or "—")
            mem_rows.append([key, f"{a / 2**20:.0f} MB" if a else "—", f"{b / 2**20:.0f} MB" if b else "—", growth])
        lines.append(markdown_table(["model / tool", "64 samples", "512 samples", "growth"], mem_rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quantize")
    p.add_argument("--quick", action="store_true", help="fewer samples and runs (a smoke test)")
    p.add_argument("--models", default=",".join(PLAN), help="comma-separated subset")
    p.add_argument("--from-results", action="store_true",
                   help="only re-render the README table from benchmarks/results/quantize.json")
    p.add_argument("--memory-only", action="store_true",
                   help="re-measure calibration memory into the saved results, then re-render")
    args = p.parse_args(argv)
    if args.from_results or args.memory_only:
        import json

        from benchmarks.common import RESULTS

        results = json.loads((RESULTS / "quantize.json").read_text())
        if args.memory_only:
            print(machine_line(), flush=True)
            results["memory"] = memory()
            save_results("quantize", results)
        update_readme("quantize", tables(results))
        return 0
    print(machine_line(), flush=True)
    results = run([m for m in args.models.split(",") if m], args.quick)
    text = tables(results)
    print(text)
    if not args.quick:
        save_results("quantize", results)
        update_readme("quantize", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
