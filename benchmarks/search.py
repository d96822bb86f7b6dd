"""``onnxopt search`` on the real models: what it chooses against every preset, how long it
takes, and how it scales out on Ray.

For PP-OCRv4 det/rec, PP-OCR cls, MiniLM and the digits classifier (accuracy as the user
metric), at objective latency and objective size with the floor at cosine 0.99: the
chosen model, the Pareto front and every preset side by side (size, latency ratio,
fidelity on held-out samples; the chosen one also on feeds the search never saw), the
search's wall time and the number of models it measured. Then: trial throughput with 1
and 2 Ray workers on this machine, a search killed in the middle and resumed from its
cache, and the same search on a two-node Ray cluster simulated on this machine.

    make bench-search            # or: python -m benchmarks.search [--quick] [--models a,b]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    RESULTS,
    ROOT,
    machine,
    machine_line,
    markdown_table,
    save_results,
    update_readme,
)

MODELS = ("ppocr-det", "ppocr-rec", "ppocr-cls", "minilm", "digits")
OBJECTIVES = ("latency", "size")
FLOOR = 0.99
CAL_N, FINAL_N = 48, 16
DIGITS_ROWS = 36
DIGITS_MIN_ACCURACY = 0.95


# --------------------------------------------------------------------------------------
# data and the digits metric
# --------------------------------------------------------------------------------------


def _digits_labels() -> dict[bytes, int]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    return {row.tobytes(): int(label) for row, label in zip(x, data.target)}


_LABELS: dict[bytes, int] = {}


def digits_accuracy(reference, candidate, feeds) -> float:
    """The user metric of the digits model: top-1 accuracy against the true labels, which
    are looked up from the input rows (the feeds carry no labels)."""
    if not _LABELS:
        _LABELS.update(_digits_labels())
    right = total = 0
    for out, feed in zip(candidate, feeds):
        labels = np.array([_LABELS[row.tobytes()] for row in feed["input"]])
        right += int((out["logits"].argmax(-1) == labels).sum())
        total += len(labels)
    return right / total


def model_data(name: str) -> dict:
    """The model, calibration samples, final feeds (never used in the search) and metric."""
    from models.fetch import fetch

    if name.startswith("ppocr"):
        from models.ocr import ocr_feeds

        return {"model": str(fetch(name)), "calibration": ocr_feeds(name, CAL_N, seed=0),
                "feeds": ocr_feeds(name, FINAL_N, seed=99)}
    if name == "minilm":
        from models.transformer import token_feeds

        kw = {"lengths": (128, 128)}  # one sequence length: latency is measured on a fixed shape
        return {"model": str(fetch(name)), "calibration": token_feeds(CAL_N, seed=0, **kw),
                "feeds": token_feeds(FINAL_N, seed=99, **kw)}
    if name == "digits":
        from models.digits import digits_mlp, digits_split

        # rows the classifier was not trained on (its test split), so that accuracy means
        # something on the held-out samples too: two thirds to search on, a third unseen
        _, x_te, _, _ = digits_split()
        batches = [{"input": x_te[i:i + DIGITS_ROWS]} for i in range(0, len(x_te), DIGITS_ROWS)]
        return {"model": digits_mlp(), "calibration": batches[:10], "feeds": batches[10:],
                "metric": "benchmarks.search:digits_accuracy", "min_metric": DIGITS_MIN_ACCURACY}
    raise KeyError(name)


# --------------------------------------------------------------------------------------
# one search
# --------------------------------------------------------------------------------------


def run_search(name: str, objective: str, *, workers: int, budget: float, out: Path) -> dict:
    from onnxopt.autocompress import search
    from onnxopt.errors import ValidationFailed

    data = model_data(name)
    t0 = time.perf_counter()
    try:
        result = search(data["model"], out / f"{name}-{objective}.onnx", calibration=data["calibration"],
                        feeds=data["feeds"], objective=objective, min_cosine=FLOOR, metric=data.get("metric"),
                        min_metric=data.get("min_metric"), time_budget=budget, workers=workers, backend="ray",
                        cache_dir=None, seed=0)
        report = result.report
    except ValidationFailed as exc:
        report = exc.report
    wall = time.perf_counter() - t0
    block = report["search"]
    trials = block["trials"]
    chosen = next((t for t in trials if t["chosen"]), None)
    final = next((f for f in block["final"] if chosen and f["trial"] == chosen["id"]), None)
    key = "bytes" if objective == "size" else "latency_ratio"
    presets = [t for t in trials if t["kind"] == "preset" and t["preset"] != "default"]
    meeting = [t for t in presets if t["meets_floor"] and t.get(key) is not None]
    best_preset = min(meeting, key=lambda t: t[key]) if meeting else None
    gain = None
    if chosen and best_preset:
        gain = 1.0 - chosen[key] / best_preset[key]
    rejected = [{"trial": f["trial"], "cosine": f.get("cosine"), "metric": f.get("metric")}
                for f in block["final"] if not f.get("meets_floor")]
    return {"model": name, "objective": objective, "wall": wall, "cut": block["cut"], "chosen": chosen,
            "final": final, "rejected": rejected, "best_preset": best_preset, "gain": gain, "trials": trials,
            "models_measured": len(trials), "probes": len(block["probes"]), "jobs_run": block["jobs_run"],
            "workers": block["workers"], "metric_original": block.get("metric_original"),
            "command": block.get("command"), "limiting_layers": block.get("limiting_layers")}


# --------------------------------------------------------------------------------------
# scale-out: throughput, resume, two nodes
# --------------------------------------------------------------------------------------


def _throughput_jobs(n: int) -> tuple[list[dict], object]:
    """``n`` different int8 trials of PP-OCR cls (one layer more in float each) and their data."""
    from models.fetch import fetch
    from models.ocr import ocr_feeds
    from onnxopt import Model, PassManager
    from onnxopt.autocompress.space import Config, pipeline
    from onnxopt.autocompress.tasks import Shared, run_outputs

    original = Model.load(fetch("ppocr-cls"))
    clean = original.copy()
    PassManager("default").run(clean)
    convs = [node.name for node in clean.graph.nodes if node.op == "Conv"]
    data = ocr_feeds("ppocr-cls", 24, seed=0)
    ob = original.to_bytes()
    shared = Shared(models={"original": ob, "clean": clean.to_bytes()}, calibration=data[:16], probe=data[:4],
                    probe_reference=run_outputs(ob, data[:4]), holdout=data[16:],
                    holdout_reference=run_outputs(ob, data[16:]), latency_feed=data[16])
    jobs = [{"kind": "trial", "start": "original", "pipeline": pipeline(Config("int8", float_layers=tuple(convs[:i])))}
            for i in range(n)]
    return jobs, shared


def throughput(n: int = 12) -> dict:
    import ray

    from onnxopt.autocompress.executors import RayExecutor
    from onnxopt.autocompress.tasks import run_job

    jobs, shared = _throughput_jobs(n)
    out = {}
    for workers in (1, 2):
        if ray.is_initialized():
            ray.shutdown()
        ex = RayExecutor(workers=workers)
        handle = ex.share(shared)
        list(ex.map_unordered(run_job, jobs[:2], handle))  # warm the workers up
        t0 = time.perf_counter()
        results = [r for _, r in ex.map_unordered(run_job, jobs, handle)]
        wall = time.perf_counter() - t0
        ex.close()
        out[workers] = {"trials": len(results), "wall": wall, "per_second": len(results) / wall,
                        "errors": sum(bool(r.get("error")) for r in results)}
    out["ratio"] = out[2]["per_second"] / out[1]["per_second"]
    return out


def _cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "onnxopt.cli", "-q", "search", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def resume(tmp: Path, kill_after: int = 12) -> dict:
    """Kill a search (its whole process group) once ``kill_after`` results are cached, run it
    again on the same cache, and count what ran again."""
    import json

    from models.fetch import fetch

    calib = _cls_calibration(tmp)
    cache = tmp / "resume-cache"
    args = [str(fetch("ppocr-cls")), "-o", str(tmp / "resume.onnx"), "--calib", str(calib), "--objective", "size",
            "--backend", "ray", "--workers", "1", "--cache-dir", str(cache), "--report", str(tmp / "resume.json")]
    first = _cli(args, start_new_session=True)
    while first.poll() is None and len(list(cache.rglob("*.json"))) < kill_after:
        time.sleep(0.2)
    cached = len(list(cache.rglob("*.json")))
    if first.poll() is not None:  # it ended before it could be killed: nothing to resume
        return {"error": f"the first search ended (exit {first.returncode}) with {cached} results cached: "
                         f"{first.stderr.read()[-300:]}"}
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    second = _cli(args)
    _, err = second.communicate()
    block = json.loads((tmp / "resume.json").read_text())["search"]
    total = block["jobs_run"] + block["cache"]["hits"]
    return {"cached_at_kill": cached, "run_on_resume": block["jobs_run"], "total": total,
            "redone": block["jobs_run"] - (total - cached), "returncode": second.returncode, "stderr": err[-300:]}


def _cls_calibration(tmp: Path) -> Path:
    from models.ocr import ocr_feeds

    calib = tmp / "cls.npz"
    if not calib.exists():
        np.savez(calib, x=np.concatenate([f["x"] for f in ocr_feeds("ppocr-cls", CAL_N, seed=0)])[:, None])
    return calib


#: The two-node comparison's search: PP-OCR cls at objective size over the quantizing
#: families, no time budget (a budget would make the choice depend on the speed of the run).
TWO_NODE_SPACE = "int8,int4,fp16"


def two_nodes(tmp: Path) -> dict:
    """The same search, each in a process of its own (as a user runs it): once on a local
    Ray with one worker, once joining a two-node cluster started on this machine."""
    import json

    from models.fetch import fetch
    from onnxopt.autocompress.local_cluster import LocalCluster

    def run(name: str, extra: list[str], env: dict) -> tuple[dict, float, str]:
        args = [str(fetch("ppocr-cls")), "-o", str(tmp / f"{name}.onnx"), "--calib", str(_cls_calibration(tmp)),
                "--objective", "size", "--space", TWO_NODE_SPACE, "--seed", "0", "--no-cache",
                "--time-budget", "100000", "--report", str(tmp / f"{name}.json"), *extra]
        t0 = time.perf_counter()
        proc = _cli(args, env=env)
        _, err = proc.communicate()
        wall = time.perf_counter() - t0
        report = json.loads((tmp / f"{name}.json").read_text()) if proc.returncode == 0 else {}
        return report, wall, err[-300:]

    with LocalCluster(nodes=2, cpus=1) as cluster:
        one, wall_one, err_one = run("one", ["--backend", "ray", "--workers", "1"], cluster.env)
        two, wall_two, err_two = run("two", ["--address", cluster.address], cluster.env)
    if not one or not two:
        return {"error": err_one or err_two}
    ex = two["search"]["executor"]
    failed = [t.get("error") for t in two["search"]["trials"] if t.get("error")]
    return {"failed_jobs": len(failed), "first_failure": failed[0][:300] if failed else None,
            "one_node_pipeline": one["pipeline"], "same_pipeline": one["pipeline"] == two["pipeline"],
            "same_bytes": (tmp / "one.onnx").read_bytes() == (tmp / "two.onnx").read_bytes(),
            "nodes": ex["nodes"], "nodes_used": ex["nodes_used"], "pipeline": two["pipeline"],
            "models": len(two["search"]["trials"]), "wall_two_nodes": wall_two, "wall_one_node": wall_one}


# --------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------


def _size(n) -> str:
    return "—" if n is None else f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _f(x, spec=".3f") -> str:
    return "—" if x is None else format(x, spec)


def _what(t: dict | None) -> str:
    if t is None:
        return "—"
    return t.get("preset") or t.get("label") or t["pipeline"]


def summary_table(runs: list[dict]) -> str:
    rows = []
    for r in runs:
        c, b, f = r["chosen"], r["best_preset"], r["final"]
        key = "bytes" if r["objective"] == "size" else "latency_ratio"
        fmt = _size if key == "bytes" else _f
        rows.append([r["model"], r["objective"], _what(c), _size(c and c["bytes"]), _f(c and c["latency_ratio"]),
                     _f(c and c["cosine"], ".4f"), _f(f and f["cosine"], ".4f"),
                     _f(f and f.get("metric"), ".4f"), f"{_what(b)}: {fmt(b and b[key])}",
                     "—" if r["gain"] is None else f"{100 * r['gain']:+.1f} %", f"{r['wall']:.0f}",
                     r["models_measured"], r["probes"], "yes" if r["cut"] else "no"])
    return markdown_table(["model", "objective", "chosen", "size", "latency ×", "cosine held-out", "cosine unseen",
                           "metric unseen", "best preset meeting the floor", "gain", "wall s", "models",
                           "probes", "cut"], rows)


def front_table(runs: list[dict]) -> str:
    rows = []
    for r in runs:
        rejected = {f["trial"]: f for f in r.get("rejected", [])}
        for t in r["trials"]:
            if not (t["pareto"] or t["kind"] == "preset" or t["chosen"] or t["id"] in rejected):
                continue
            mark = "chosen" if t["chosen"] else "front" if t["pareto"] else ""
            if t["id"] in rejected:
                unseen = _f(rejected[t["id"]]["cosine"], ".4f")
                mark = (mark + ", " if mark else "") + f"below the floor on unseen feeds ({unseen})"
            rows.append([r["model"], r["objective"], t["id"], _what(t), _size(t["bytes"]), _f(t["latency_ratio"]),
                         _f(t["cosine"], ".4f"), _f(t.get("metric"), ".4f"), "yes" if t["meets_floor"] else "no",
                         mark])
    return markdown_table(["model", "objective", "id", "what", "size", "latency ×", "cosine", "metric", "floor",
                           ""], rows)


def targets(runs: list[dict], scale: dict) -> list[str]:
    lines = []
    beaten = [r for r in runs if r["gain"] is not None and r["gain"] >= 0]
    missed = [f"{r['model']}/{r['objective']} {100 * r['gain']:+.1f} %" for r in runs
              if r["gain"] is not None and r["gain"] < 0]
    ten = sorted({r["model"] for r in runs if r["gain"] is not None and r["gain"] >= 0.10})
    lines.append(f"- At least as good as every preset meeting the floor: {len(beaten)}/{len(runs)} searches"
                 + (f"; behind on {', '.join(missed)}" if missed else "") + ".")
    lines.append(f"- Better by ≥ 10 % on at least 3 of 5 models: {len(ten)} models ({', '.join(ten) or 'none'}).")
    finals = [(r, r["final"]) for r in runs if r["final"]]
    low = [f"{r['model']}/{r['objective']} {f['cosine']:.4f}" for r, f in finals if f["cosine"] < FLOOR - 0.005]
    lines.append(f"- Unseen data ≥ floor − 0.005: {len(finals) - len(low)}/{len(finals)}"
                 + (f"; below on {', '.join(low)}" if low else "") + ".")
    over = [f"{r['model']}/{r['objective']} ({r['wall']:.0f} s)" for r in runs if r["cut"]]
    lines.append(f"- Within the default budget (600 s): {len(runs) - len(over)}/{len(runs)} searches finished"
                 + (f"; cut: {', '.join(over)}" if over else "") + ".")
    if "throughput" in scale:
        t = scale["throughput"]
        lines.append(f"- 2 Ray workers give {t['ratio']:.2f}× the trial throughput of 1 (target ≥ 1.6×).")
    if "resume" in scale and "cached_at_kill" not in scale["resume"]:
        lines.append(f"- Resume: {scale['resume']['error']}")
    elif "resume" in scale:
        rs = scale["resume"]
        lines.append(f"- A search killed after {rs['cached_at_kill']} cached results ran {rs['run_on_resume']} of "
                     f"{rs['total']} jobs on resume: {rs['redone']} finished job(s) redone (target ≤ 1).")
    if "two_nodes" in scale:
        tn = scale["two_nodes"]
        if "error" in tn:
            lines.append(f"- Two-node cluster: the search failed: {tn['error']}")
        else:
            lines.append(f"- Two-node cluster (PP-OCR cls, objective size, space {TWO_NODE_SPACE}; "
                         f"{tn['nodes_used']} nodes ran jobs): same pipeline as one node with one worker: "
                         f"{'yes' if tn['same_pipeline'] else 'no'}; same bytes: {'yes' if tn['same_bytes'] else 'no'} "
                         f"(`{tn['pipeline']}`; {tn['wall_one_node']:.0f} s on one node, "
                         f"{tn['wall_two_nodes']:.0f} s on two).")
    return lines


def render(results: dict) -> str:
    runs = results["runs"]
    scale = results.get("scale", {})
    parts = ["### Search (`make bench-search`)", "",
             f"Measured on {machine_line(results['machine'])}; floor cosine {FLOOR} on every output (digits: also "
             f"accuracy ≥ {DIGITS_MIN_ACCURACY} on held-out test rows); default time budget; {results['workers']} Ray "
             "workers; no cache. Latency ratios are medians of interleaved runs on one core held by the trial, "
             "relative to the original model; fidelity is on calibration samples held out of the search's "
             "calibration, and for the chosen model also on feeds the search never saw (`cosine unseen`; "
             "digits: test-set accuracy).", "", summary_table(runs), "",
             "Pareto front, chosen model and presets of each search:", "", front_table(runs), ""]
    if "throughput" in scale:
        t = scale["throughput"]
        parts += ["Trial throughput on this machine (PP-OCR cls int8 trials, Ray):", "",
                  markdown_table(["workers", "trials", "wall s", "trials/s"],
                                 [[w, t[w]["trials"], f"{t[w]['wall']:.1f}", f"{t[w]['per_second']:.3f}"]
                                  for w in (1, 2)]), ""]
    parts += ["**Targets**:", "", *targets(runs, scale)]
    if results.get("notes"):
        parts += ["", *results["notes"]]
    return "\n".join(parts)


def _kept(runs: list, scale: dict, notes: list, measured: set, no_scale: bool) -> tuple[list, dict, list]:
    """This run's figures with the stored ones of what it did not measure (``measured``:
    (model, objective) pairs)."""
    import json

    path = RESULTS / "search.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    order = {m: i for i, m in enumerate(MODELS)}
    kept = [r for r in old.get("runs", []) if (r["model"], r["objective"]) not in measured]
    runs = sorted(kept + runs, key=lambda r: (order.get(r["model"], len(order)), OBJECTIVES.index(r["objective"])
                                              if r["objective"] in OBJECTIVES else 0))
    if no_scale:
        scale = {**old.get("scale", {}), **scale}
        if "throughput" in scale:  # JSON made its worker counts strings
            scale["throughput"] = {int(k) if str(k).isdigit() else k: v for k, v in scale["throughput"].items()}
    return runs, scale, list(old.get("notes", [])) + notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--budget", type=float, default=600.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="digits and PP-OCR cls only, no scale-out runs")
    parser.add_argument("--no-scale", action="store_true", help="skip throughput, resume and two-node runs")
    parser.add_argument("--keep", action="store_true",
                        help="keep the stored rows of the searches (and, with --no-scale, the scale-out figures) "
                             "this run does not measure")
    args = parser.parse_args(argv)
    models = ["digits", "ppocr-cls"] if args.quick else [m for m in args.models.split(",") if m]
    info = machine()
    print(machine_line(info), flush=True)
    import ray

    runs = []
    results_notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-search-") as tmp:
        tmp = Path(tmp)
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        for name in models:
            for objective in args.objectives.split(","):
                try:
                    r = run_search(name, objective, workers=args.workers, budget=args.budget, out=tmp)
                except Exception as exc:  # one broken search must not lose the others' figures
                    print(f"{name} {objective}: failed: {type(exc).__name__}: {exc}", flush=True)
                    results_notes.append(f"- {name}/{objective}: the search failed: {type(exc).__name__}: "
                                         f"{' '.join(str(exc).split())[:200]}")
                    continue
                gain = "—" if r["gain"] is None else f"{100 * r['gain']:+.1f} %"
                print(f"{name} {objective}: {_what(r['chosen'])}, gain {gain} over the best preset, "
                      f"{r['wall']:.0f} s", flush=True)
                runs.append(r)
        ray.shutdown()
        scale = {}
        if not (args.quick or args.no_scale):
            for key, fn in (("throughput", throughput), ("resume", lambda: resume(tmp)),
                            ("two_nodes", lambda: two_nodes(tmp))):
                try:
                    scale[key] = fn()
                except Exception as exc:
                    results_notes.append(f"- {key}: failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
    if args.keep:
        measured = {(m, o) for m in models for o in args.objectives.split(",") if o}
        runs, scale, results_notes = _kept(runs, scale, results_notes, measured, args.no_scale)
    results = {"machine": info, "workers": args.workers, "runs": runs, "scale": scale, "notes": results_notes}
    text = render(results)
    print(text)
    save_results("search", results)
    if not args.quick:
        update_readme("search", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
