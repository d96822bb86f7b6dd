"""What ``[dead-nodes,fold-constants,eliminate-noops,fuse]`` does to real models, and how
its time grows with the size of the graph.

Part 1, real models (PP-OCR det/rec/cls, the onnx package's light architectures, the
digits classifier, the builders' models): total node count, initializers and file bytes
before and after, the pipeline's wall time, whether onnxruntime gives the same outputs,
and the onnxruntime CPU latency of the result against the original (ORT_ENABLE_ALL, one
thread, runs interleaved round-robin, medians).

Part 2, scaling: generated graphs of about 10k and 100k nodes (constants to fold, shape
arithmetic on a dynamic batch, no-ops, bias Adds, Transpose pairs), each size run
several times in fresh processes, interleaved; the median wall and CPU seconds and their
ratio (issue 4's target: at most 12x for 10x the nodes) and peak memory.

    python -m benchmarks.simplify_passes            # everything (make bench-simplify-passes)
    python -m benchmarks.simplify_passes --quick    # fewer runs, smaller scaling sizes

Timings come from a shared machine: they are medians of interleaved runs, and the ratios
(not the absolute figures) are what to read.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks.common import (
    machine,
    machine_line,
    markdown_table,
    median,
    ort_latency,
    peak_rss_of,
    save_results,
    update_readme,
)

PIPELINE = "[dead-nodes,fold-constants,eliminate-noops,fuse]"
PPOCR_SHAPES = {"ppocr-det": (1, 3, 320, 320), "ppocr-rec": (1, 3, 48, 320), "ppocr-cls": (1, 3, 48, 192)}


# --------------------------------------------------------------------------------------
# Part 1: real models
# --------------------------------------------------------------------------------------


def _real_models():
    """(label, ModelProto, feeds, latency runs)."""
    from models import builders
    from models.digits import digits_mlp, digits_split
    from models.fetch import FetchError, fetch, light_models
    from onnxopt import Model
    from onnxopt.data import random_feeds

    for name, shape in PPOCR_SHAPES.items():
        try:
            proto = onnx.load(fetch(name))
        except FetchError as exc:
            print(f"skipping {name}: {exc}")
            continue
        feeds, _ = random_feeds(Model.from_proto(proto), {"x": shape}, seed=0)
        yield name, proto, feeds, 40
    for path in light_models():
        proto = onnx.load(path)
        feeds, _ = random_feeds(Model.from_proto(proto), seed=0)
        yield path.stem.replace("light_", ""), proto, feeds, 12
    _, x_test, _, _ = digits_split()
    yield "digits-mlp", digits_mlp(), {"input": x_test[:1]}, 200
    for name, shape in (("cnn", (1, 3, 32, 32)), ("mlp", (1, 64)), ("control_flow", (1, 8)),
                        ("dead_branches", (1, 3, 16, 16))):
        proto = builders.build(name)
        feeds, _ = random_feeds(Model.from_proto(proto), {proto.graph.input[0].name: shape}, seed=0)
        yield f"builders.{name}", proto, feeds, 200


def _runs_for(model, feeds: dict, at_least: int, quick: bool) -> int:
    """Enough timed runs for about two seconds per model and order (fast models need
    hundreds to rise above a shared machine's noise)."""
    from onnxopt.validate import make_session

    sess = make_session(model, threads=1)
    for _ in range(2):
        sess.run(None, feeds)
    t0 = time.perf_counter()
    sess.run(None, feeds)
    one = max(time.perf_counter() - t0, 1e-6)
    runs = min(max(at_least, int(2.0 / one)), 500)
    return max(3, runs // 4) if quick else runs


def measure_real(quick: bool) -> list[dict]:
    from onnxopt import Model, PassManager
    from onnxopt.validate import compare_outputs, run_model

    def same_outputs(a: Model, b: Model, feeds: dict) -> bool:
        ra, rb = run_model(a, feeds), run_model(b, feeds)
        return list(ra) == list(rb) and all(
            compare_outputs(k, ra[k], rb[k], exact=True, rtol=1e-3, atol=1e-4).passed for k in ra)

    rows = []
    for label, proto, feeds, runs in _real_models():
        original = Model.from_proto(proto)
        work = original.copy()
        t0 = time.perf_counter()
        result = PassManager(PIPELINE).run(work)
        seconds = time.perf_counter() - t0
        before, after = original.summary(), work.summary()
        same = same_outputs(original, work, feeds)
        runs = _runs_for(original, feeds, runs, quick)
        # Twice, in both orders: the session created second often runs faster on this machine
        # (identical models measured 0.45-1.1x apart), so each ordering's bias cancels out.
        first = ort_latency({"original": original, "simplified": work}, feeds, threads=1, runs=runs,
                            warmup=max(3, runs // 5))
        second = ort_latency({"simplified": work, "original": original}, feeds, threads=1, runs=runs,
                             warmup=max(3, runs // 5))
        latency = {k: float(np.sqrt(first[k] * second[k])) for k in first}
        row = {
            "model": label,
            "nodes_before": before.nodes_total, "nodes_after": after.nodes_total,
            "initializers_before": before.initializers, "initializers_after": after.initializers,
            "bytes_before": len(original.to_bytes()), "bytes_after": len(work.to_bytes()),
            "seconds": round(seconds, 3), "rounds": result.groups[0]["rounds"],
            "same_outputs": same,
            "latency_ms_original": round(latency["original"], 4),
            "latency_ms_simplified": round(latency["simplified"], 4),
            "latency_ratio": round(latency["simplified"] / latency["original"], 3),
            "latency_runs": 2 * runs,
            "latency_ratio_each_order": [round(first["simplified"] / first["original"], 3),
                                         round(second["simplified"] / second["original"], 3)],
        }
        print(f"{label}: {row['nodes_before']} -> {row['nodes_after']} nodes, {seconds:.2f}s, "
              f"same outputs {same}, latency x{row['latency_ratio']} {row['latency_ratio_each_order']} "
              f"({runs} runs per order)")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------
# Part 2: scaling
# --------------------------------------------------------------------------------------

NODES_PER_BLOCK = 16


def generated_graph(blocks: int) -> onnx.ModelProto:
    """``blocks`` repeats (16 nodes each) of what exporters leave: Constant nodes, a
    constant product to fold, Conv + bias Add, an Identity, a Transpose pair that
    cancels, and Reshape(x, Concat(Shape(x)[0], [8, 4, 4])) on a dynamic batch."""
    nodes = []

    def const(name: str, value: np.ndarray) -> str:
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name + "_v")))
        return name

    rng = np.random.default_rng(0)
    h = "x"
    for i in range(blocks):
        p = f"b{i}_"
        w = const(p + "w", (rng.standard_normal((8, 8, 1, 1)) * 0.3).astype(np.float32))
        s = const(p + "s", np.full((1, 8, 1, 1), 0.5, np.float32))
        two = const(p + "two", np.full((1, 8, 1, 1), 2.0, np.float32))
        nodes.append(helper.make_node("Mul", [s, two], [p + "b"]))
        nodes.append(helper.make_node("Conv", [h, w], [p + "conv"]))
        nodes.append(helper.make_node("Add", [p + "conv", p + "b"], [p + "bias"]))
        nodes.append(helper.make_node("Identity", [p + "bias"], [p + "id"]))
        nodes.append(helper.make_node("Transpose", [p + "id"], [p + "t1"], perm=[0, 2, 3, 1]))
        nodes.append(helper.make_node("Transpose", [p + "t1"], [p + "t2"], perm=[0, 3, 1, 2]))
        nodes.append(helper.make_node("Shape", [p + "t2"], [p + "shape"]))
        first = const(p + "i0", np.array([0], np.int64))
        nodes.append(helper.make_node("Gather", [p + "shape", first], [p + "n"], axis=0))
        rest = const(p + "rest", np.array([8, 4, 4], np.int64))
        nodes.append(helper.make_node("Concat", [p + "n", rest], [p + "target"], axis=0))
        nodes.append(helper.make_node("Reshape", [p + "t2", p + "target"], [p + "r"]))
        nodes.append(helper.make_node("Relu", [p + "r"], [p + "out"]))
        h = p + "out"
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    graph = helper.make_graph(nodes, "generated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run_generated(blocks: int) -> dict:
    """In a fresh process: build the graph, then time the pipeline alone."""
    from onnxopt import Model, PassManager

    model = Model.from_proto(generated_graph(blocks))
    nodes = model.summary().nodes_total
    wall, cpu = time.perf_counter(), time.process_time()
    result = PassManager(PIPELINE).run(model)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    per_pass: dict[str, float] = {}
    for r in result.records:
        per_pass[r.name] = per_pass.get(r.name, 0.0) + r.seconds
    return {"nodes": nodes, "nodes_after": model.summary().nodes_total, "wall": wall, "cpu": cpu,
            "per_pass": per_pass, "rounds": result.groups[0]["rounds"], "peak_rss": _own_peak_rss()}


def _own_peak_rss() -> int | None:
    """This process's peak resident memory (VmHWM). ``ru_maxrss`` is no good in a spawned
    child on Linux: it starts from the parent's high-water mark."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure_scaling(quick: bool) -> dict:
    sizes = [1_000, 10_000] if quick else [10_000, 100_000]
    repeats = 2 if quick else 5
    runs: dict[int, list[dict]] = {n: [] for n in sizes}
    for _ in range(repeats):
        for n in sizes:  # interleaved: machine noise hits both sizes alike
            out = peak_rss_of(_run_generated, n // NODES_PER_BLOCK)
            if not out["ok"]:
                raise RuntimeError(f"{n} nodes: {out['error']}")
            res = out["result"]
            if res["peak_rss"] is None:
                res["peak_rss"] = out["peak_rss"]
            runs[n].append(res)
            print(f"{res['nodes']} nodes -> {res['nodes_after']}: {res['wall']:.2f}s wall, {res['cpu']:.2f}s cpu")
    table = []
    for n in sizes:
        rs = runs[n]
        table.append({
            "nodes": rs[0]["nodes"], "nodes_after": rs[0]["nodes_after"],
            "wall": median([r["wall"] for r in rs]), "cpu": median([r["cpu"] for r in rs]),
            "peak_rss": max(r["peak_rss"] for r in rs),
            "per_pass": {k: median([r["per_pass"][k] for r in rs]) for k in rs[0]["per_pass"]},
        })
    small, large = table[0], table[-1]
    return {"sizes": table, "runs": {str(k): v for k, v in runs.items()},
            "wall_ratio": large["wall"] / small["wall"], "cpu_ratio": large["cpu"] / small["cpu"],
            "node_ratio": large["nodes"] / small["nodes"]}


# --------------------------------------------------------------------------------------


def _report(info: dict, real: list[dict], scaling: dict) -> str:
    lines = [f"Measured on {machine_line(info)}; pipeline `{PIPELINE}`. Latency: onnxruntime CPU, "
             "ORT_ENABLE_ALL, 1 thread, median of interleaved runs, measured in both session orders "
             "and combined (geometric mean); the machine is shared, so a few percent either way is "
             "noise — rows whose graph did not change show how much.", ""]
    lines.append(markdown_table(
        ["model", "nodes", "initializers", "file bytes", "time (s)", "same outputs", "latency ms (orig → new)",
         "latency ratio"],
        [[r["model"], f"{r['nodes_before']} → {r['nodes_after']}",
          f"{r['initializers_before']} → {r['initializers_after']}",
          f"{r['bytes_before']:,} → {r['bytes_after']:,}", r["seconds"], "yes" if r["same_outputs"] else "NO",
          f"{r['latency_ms_original']:.3g} → {r['latency_ms_simplified']:.3g}", r["latency_ratio"]]
         for r in real]))
    lines += ["", f"Scaling on generated graphs ({NODES_PER_BLOCK} nodes per block; median of "
              f"{len(next(iter(scaling['runs'].values())))} runs in fresh processes, interleaved):", ""]
    lines.append(markdown_table(
        ["nodes", "after", "wall (s)", "cpu (s)", "peak RSS (MB)", "per pass (s)"],
        [[s["nodes"], s["nodes_after"], s["wall"], s["cpu"], round(s["peak_rss"] / 2**20),
          ", ".join(f"{k} {v:.2f}" for k, v in s["per_pass"].items())] for s in scaling["sizes"]]))
    lines += ["", f"{scaling['node_ratio']:.0f}× the nodes took {scaling['wall_ratio']:.1f}× the wall time "
              f"and {scaling['cpu_ratio']:.1f}× the CPU time (target: at most 12×)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs, smaller scaling sizes; README untouched")
    args = parser.parse_args(argv)
    info = machine()
    print(machine_line(info))
    scaling = measure_scaling(args.quick)
    real = measure_real(args.quick)
    text = _report(info, real, scaling)
    print(text)
    if not args.quick:
        save_results("simplify_passes", {"machine": info, "pipeline": PIPELINE, "real": real, "scaling": scaling})
        update_readme("simplify-passes", "### Simplification passes on real models\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
