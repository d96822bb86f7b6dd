"""Simplification side by side: onnxopt against onnxoptimizer, onnxsim and onnxslim.

    python -m benchmarks.simplify            # the full run (make bench-simplify), ~20 min
    python -m benchmarks.simplify --quick    # a smoke run on a few small models

For every model (PP-OCR det/rec/cls, silero-vad, the onnx package's light architectures,
the builders' models) and every tool — onnxopt's ``default`` preset (whatever it holds
when this runs), onnxopt with each ``--pipeline`` given, and onnxoptimizer, onnxsim and
onnxslim with their defaults — the same input file goes through the tool in a process
of its own (load, simplify, save; a timeout and a crash are row entries; see
:mod:`benchmarks.simplify_tools`) and the result is measured: node count (top graph and
total with subgraphs), initializer count, file bytes, wall time (load, simplify, save) and
the whole process's wall and CPU time (imports included, as a user's command pays them;
onnxopt's modules are byte-compiled first, as an installed package is), peak memory
(resident, above the child's baseline after its imports, and above a bare interpreter
that imported onnx and onnxruntime), outputs on onnxruntime against the
original's (same feeds; same input and output names, types and dynamic dimensions), and
onnxruntime CPU latency with ORT_ENABLE_ALL, one thread, as a ratio to the original
(runs interleaved, median).

Then generated chains of 10k and 100k nodes (time ratio for 10x the nodes) and a
generated model over 2 GB with external data. Raw figures go to
``benchmarks/results/simplify.json`` and the tables into the README.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, machine_line, markdown_table, median, save_results, update_readme
from benchmarks.simplify_tools import PEERS, interpreter_rss, whole_process

PASSES_B = "[dead-nodes,dedup-weights,cse,fold-batchnorm]"
RTOL, ATOL = 1e-3, 1e-4

PPOCR_SHAPES = {"ppocr-det": (1, 3, 256, 256), "ppocr-rec": (1, 3, 48, 320), "ppocr-cls": (1, 3, 48, 192)}
#: The real pretrained models (the others are the onnx package's light architectures and
#: the builders' models, with generated weights).
REAL = ("ppocr-det", "ppocr-rec", "ppocr-cls", "silero-vad", "minilm")


# --------------------------------------------------------------------------------------
# Measuring a model file
# --------------------------------------------------------------------------------------


def _graph_counts(g: onnx.GraphProto) -> tuple[int, int]:
    nodes, inits = len(g.node), len(g.initializer) + len(g.sparse_initializer)
    for n in g.node:
        for a in n.attribute:
            subs = ([a.g] if a.HasField("g") else []) + list(a.graphs)
            for sub in subs:
                k, i = _graph_counts(sub)
                nodes += k
                inits += i
    return nodes, inits


def file_bytes(path: str) -> int:
    total = os.path.getsize(path)
    proto = onnx.load(path, load_external_data=False)
    locations = set()
    from onnx.external_data_helper import _get_all_tensors

    for t in _get_all_tensors(proto):
        if t.data_location == TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location":
                    locations.add(e.value)
    for loc in locations:
        p = Path(path).parent / loc
        if p.exists():
            total += p.stat().st_size
    return total


def figures(path: str) -> dict:
    proto = onnx.load(path, load_external_data=False)
    total, inits = _graph_counts(proto.graph)
    return {"nodes": len(proto.graph.node), "nodes_total": total, "initializers": inits,
            "bytes": file_bytes(path)}


def signature(path: str) -> tuple:
    """Graph inputs a user feeds and the outputs: names, order, element types, dims."""
    proto = onnx.load(path, load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}

    def vi(v):
        tt = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else "?" for d in tt.shape.dim) \
            if tt.HasField("shape") else None
        return (v.name, tt.elem_type, dims)

    ins = tuple(vi(v) for v in proto.graph.input if v.name not in inits or proto.ir_version < 4)
    return ins, tuple(vi(v) for v in proto.graph.output)


def _session(path: str, threads: int = 1, opt_all: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if not opt_all:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def same_outputs(ref: list, got: list) -> tuple[bool, float]:
    worst = 0.0
    for a, b in zip(ref, got):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return False, float("inf")
        if a.dtype.kind in "fc":
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            if not np.all(np.isfinite(diff) | (np.isnan(a) & np.isnan(b))):
                return False, float("inf")
            ok = np.all(diff <= ATOL + RTOL * np.abs(a.astype(np.float64))) if a.size else True
            worst = max(worst, float(np.nanmax(diff)) if a.size else 0.0)
            if not ok:
                return False, worst
        elif not np.array_equal(a, b):
            return False, float("inf")
    return len(ref) == len(got), worst


def latency_ratios(paths: dict[str, str], feeds: dict, budget: float, max_runs: int) -> dict[str, float]:
    """Median latency of each model (one thread, ORT_ENABLE_ALL), runs interleaved."""
    paths = {"original (again)": paths["original"], **paths}  # the noise floor
    sessions = {k: _session(p) for k, p in paths.items()}
    t0 = time.perf_counter()
    for s in sessions.values():
        s.run(None, feeds)
    one_round = time.perf_counter() - t0
    runs = int(min(max_runs, max(3, budget / max(one_round, 1e-4))))
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds)
            times[k].append(time.perf_counter() - t)
    return {k: median(v) * 1000 for k, v in times.items()} | {"_runs": runs}


# --------------------------------------------------------------------------------------
# The models
# --------------------------------------------------------------------------------------


def _feeds_for(proto_path: str, shapes: dict | None = None) -> dict:
    from onnxopt import Model
    from onnxopt.data import random_feeds

    feeds, _ = random_feeds(Model.load(proto_path), shapes, seed=0)
    return feeds


def model_set(work: Path, quick: bool) -> list[tuple[str, str, dict]]:
    """(name, path, feeds) for every benchmark model that is available."""
    from models import builders
    from models.digits import digits_split
    from models.fetch import FetchError, fetch, light_models

    found: list[tuple[str, str, dict]] = []
    real = ["ppocr-cls"] if quick else list(REAL)
    for name in real:
        try:
            path = str(fetch(name))
        except FetchError as exc:
            print(f"  {name}: not available ({exc})")
            continue
        if name == "silero-vad":
            rng = np.random.default_rng(0)
            feeds = {"input": (0.1 * rng.standard_normal((1, 512))).astype(np.float32),
                     "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}
        elif name == "minilm":
            from models.transformer import token_feeds

            feeds = token_feeds(1, seed=0, pad_to=48)[0]
        else:
            feeds = _feeds_for(path, {"x": PPOCR_SHAPES[name]})
        found.append((name, path, feeds))
    lights = light_models()
    if quick:
        lights = [p for p in lights if "squeezenet" in p.stem]
    for p in lights:
        found.append((p.stem.replace("light_", ""), str(p), _feeds_for(str(p))))
    names = ["cnn", "control_flow"] if quick else ["cnn", "mlp", "control_flow", "dead_branches", "digits"]
    for name in names:
        path = work / f"{name}.onnx"
        onnx.save(builders.build(name), str(path))
        if name == "digits":
            _, x_test, _, _ = digits_split()
            feeds = {"input": x_test[:64].astype(np.float32)}
        elif name == "control_flow":
            feeds = {"x": np.abs(np.random.default_rng(0).standard_normal((4, 8))).astype(np.float32)}
        else:
            feeds = _feeds_for(str(path), None)
        found.append((name, str(path), feeds))
    return found


def chain_model(blocks: int, path: Path) -> int:
    """A generated chain: each block holds a repeated scalar constant twice (dedup), two
    identical Muls (cse), MatMul + BatchNormalization (fold) and an Identity."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    h = "x"
    for i in range(blocks):
        c1, c2 = f"c{i}a", f"c{i}b"
        one = numpy_helper.from_array(np.array(0.5, np.float32))
        nodes += [helper.make_node("Constant", [], [c1], value=one), helper.make_node("Constant", [], [c2], value=one),
                  helper.make_node("Mul", [h, c1], [f"m{i}a"]), helper.make_node("Mul", [h, c2], [f"m{i}b"]),
                  helper.make_node("Add", [f"m{i}a", f"m{i}b"], [f"s{i}"]),
                  helper.make_node("MatMul", [f"s{i}", f"w{i}"], [f"mm{i}"]),
                  helper.make_node("BatchNormalization", [f"mm{i}", f"g{i}", f"b{i}", f"mu{i}", f"v{i}"], [f"bn{i}"]),
                  helper.make_node("Relu", [f"bn{i}"], [f"r{i}"]),
                  helper.make_node("Identity", [f"r{i}"], [f"h{i}"])]
        inits += [numpy_helper.from_array((rng.standard_normal((16, 16)) / 4).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array((1 + 0.1 * rng.standard_normal(16)).astype(np.float32), f"g{i}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(16)).astype(np.float32), f"b{i}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(16)).astype(np.float32), f"mu{i}"),
                  numpy_helper.from_array((1 + rng.random(16)).astype(np.float32), f"v{i}")]
        h = f"h{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["N", 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return len(nodes)


def big_model(folder: Path, width: int = 8192, layers: int = 9) -> Path:
    """A model over 2 GB with external data, written without holding it in memory: a
    chain of ``layers`` MatMuls with [width, width] float32 weights (256 MB each at 8192),
    the last weight a byte copy of the one before (tied weights), a BatchNormalization
    after the first MatMul and a Relu after each."""
    folder.mkdir(parents=True, exist_ok=True)
    data_name = "big.onnx.data"
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    h = "x"
    with open(folder / data_name, "wb") as data:
        last = None
        for i in range(layers):
            offset = data.tell()
            if i == layers - 1 and last is not None:
                seed = last
            else:
                seed = int(rng.integers(1 << 30))
            block_rng = np.random.default_rng(seed)
            for _ in range(width // 1024):  # 1024 rows at a time
                data.write((block_rng.standard_normal((1024, width)) / np.sqrt(width)).astype(np.float32).tobytes())
            last = seed
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[width, width],
                            data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(data.tell() - offset))):
                t.external_data.add(key=key, value=value)
            inits.append(t)
            nodes.append(helper.make_node("MatMul", [h, f"w{i}"], [f"mm{i}"]))
            h = f"mm{i}"
            if i == 0:
                bn = [numpy_helper.from_array(v.astype(np.float32), f"bn_{k}") for k, v in
                      (("s", 1 + 0.1 * rng.standard_normal(width)), ("b", 0.1 * rng.standard_normal(width)),
                       ("m", 0.1 * rng.standard_normal(width)), ("v", 1 + rng.random(width)))]
                inits += bn
                nodes.append(helper.make_node("BatchNormalization", [h, "bn_s", "bn_b", "bn_m", "bn_v"], ["bn0"]))
                h = "bn0"
            nodes.append(helper.make_node("Relu", [h], [f"r{i}"]))
            h = f"r{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, [1, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with open(folder / "big.onnx", "wb") as f:
        f.write(model.SerializeToString())
    return folder / "big.onnx"


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def tools(pipelines: list[str]) -> list[tuple[str, str, str | None]]:
    """(label, tool, pipeline) for each column."""
    out = [("onnxopt default", "onnxopt", "default")]
    for p in pipelines:
        if p != "default":
            out.append((f"onnxopt {p}", "onnxopt", p))
    return out + [(p, p, None) for p in PEERS]


def bench_model(name: str, path: str, feeds: dict, columns, work: Path, timeout: float,
                latency_budget: float, max_runs: int) -> dict:
    row: dict = {"model": name, "original": figures(path), "tools": {}}
    ref_sess = _session(path)
    ref = ref_sess.run(None, feeds)
    ref_sig = signature(path)
    row["original"]["model_bytes"] = row["original"]["bytes"]
    ok_paths = {"original": path}
    for index, (label, tool, pipeline) in enumerate(columns):
        out_dir = work / f"{name}.{index}"
        out_dir.mkdir(exist_ok=True)
        out = str(out_dir / "out.onnx")
        res = whole_process(tool, path, out, pipeline, timeout)
        entry = {"ok": res["ok"]}
        if res["ok"]:
            entry.update(seconds=res["seconds"], peak_rss=res["peak_rss"],
                         peak_above_baseline=max(0, res["peak_rss"] - res["baseline_rss"]),
                         process_seconds=res["process_seconds"], process_cpu=res["process_cpu"])
            for k in ("rounds", "converged"):
                if k in res:
                    entry[k] = res[k]
            entry.update(figures(out))
            try:
                got = _session(out).run(None, feeds)
                equal, worst = same_outputs(ref, got)
                entry["equal"] = equal
                entry["max_abs_diff"] = worst
                entry["signature_kept"] = signature(out) == ref_sig
            except Exception as exc:  # the result does not load or run
                entry["equal"] = False
                entry["error"] = f"onnxruntime: {str(exc).splitlines()[0][:160]}"
            if entry.get("equal"):
                ok_paths[label] = out
        else:
            entry["error"] = res["error"]
        row["tools"][label] = entry
        state = "ok" if entry.get("equal") else ("DIFF" if res["ok"] else "FAIL")
        print(f"    {label:<48} {state:<4} {entry.get('nodes_total', '-'):>6} nodes "
              f"{entry.get('seconds', 0):7.2f} s  {entry.get('error', '')[:90]}", flush=True)
    try:
        lat = latency_ratios(ok_paths, feeds, latency_budget, max_runs)
        row["latency_runs"] = lat.pop("_runs")
        base = lat["original"]
        row["original"]["latency_ms"] = base
        row["noise_ratio"] = lat.pop("original (again)") / base
        for label, ms in lat.items():
            if label != "original":
                row["tools"][label]["latency_ms"] = ms
                row["tools"][label]["latency_ratio"] = ms / base
    except Exception as exc:
        row["latency_error"] = str(exc).splitlines()[0][:200]
    return row


def scaling(columns, work: Path, sizes: list[int], timeout: float, slow: float) -> dict:
    """Each tool on chains of growing size; a tool that failed or took more than ``slow``
    seconds on a size is not run on the next one (10x the nodes would pass the timeout)."""
    out: dict = {"sizes": {}, "tools": {}}
    previous: dict[str, dict] = {}
    for blocks in sizes:
        path = work / f"chain{blocks}.onnx"
        n = chain_model(blocks, path)
        out["sizes"][str(blocks)] = n
        for index, (label, tool, pipeline) in enumerate(columns):
            before = previous.get(label)
            if before is not None and (not before["ok"] or before["seconds"] > slow):
                why = "failed" if not before["ok"] else f"took {before['seconds']:.0f} s"
                entry = {"ok": False, "seconds": None, "peak_rss": None,
                         "error": f"not run: {why} on 10x fewer nodes"}
                out["tools"].setdefault(label, {})[str(blocks)] = previous[label] = entry
                print(f"    {n:>7} nodes  {label:<48} skipped ({entry['error']})", flush=True)
                continue
            dest = work / f"chain{blocks}.{index}.onnx"
            res = whole_process(tool, str(path), str(dest), pipeline, timeout)
            entry = {"ok": res["ok"], "seconds": res.get("seconds"), "peak_rss": res.get("peak_rss"),
                     "process_seconds": res.get("process_seconds"), "process_cpu": res.get("process_cpu"),
                     "error": res.get("error")}
            if res["ok"]:
                entry.update(figures(str(dest)))
            out["tools"].setdefault(label, {})[str(blocks)] = previous[label] = entry
            print(f"    {n:>7} nodes  {label:<48} {'ok' if res['ok'] else 'FAIL'} "
                  f"{res.get('seconds') or 0:7.2f} s {res.get('error') or ''}"[:160], flush=True)
            with contextlib.suppress(OSError):
                dest.unlink()
    return out


def big(columns, work: Path, timeout: float, width: int) -> dict:
    folder = work / "big"
    src = big_model(folder, width=width)
    info = {"bytes": file_bytes(str(src)), "tools": {}}
    print(f"    generated {info['bytes'] / 2**30:.2f} GiB model", flush=True)
    x = {"x": np.random.default_rng(0).standard_normal((1, width)).astype(np.float32)}
    ref = _session(str(src), threads=2).run(None, x)
    for index, (label, tool, pipeline) in enumerate(columns):
        dest_dir = work / f"big.{index}"
        dest_dir.mkdir(exist_ok=True)
        dest = dest_dir / "out.onnx"
        res = whole_process(tool, str(src), str(dest), pipeline, timeout)
        entry = {"ok": res["ok"], "seconds": res.get("seconds"), "peak_rss": res.get("peak_rss"),
                 "process_seconds": res.get("process_seconds"), "process_cpu": res.get("process_cpu"),
                 "error": res.get("error")}
        if res["ok"]:
            entry.update(figures(str(dest)))
            entry["external_data"] = any(p.name != "out.onnx" for p in dest_dir.iterdir())
            try:
                got = _session(str(dest), threads=2).run(None, x)
                entry["equal"], entry["max_abs_diff"] = same_outputs(ref, got)
            except Exception as exc:
                entry["equal"] = False
                entry["error"] = f"onnxruntime: {str(exc).splitlines()[0][:160]}"
        info["tools"][label] = entry
        print(f"    {label:<48} {'ok' if res['ok'] else 'FAIL'} {res.get('seconds') or 0:7.2f} s "
              f"{entry.get('error') or ''}"[:200], flush=True)
        shutil.rmtree(dest_dir, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    return info


# --------------------------------------------------------------------------------------
# Tables and targets
# --------------------------------------------------------------------------------------


def _cell_nodes(e: dict) -> str:
    if not e.get("ok"):
        return "fails"
    mark = "" if e.get("equal") else " ✗"
    sig = "" if e.get("signature_kept", True) else " (I/O changed)"
    return f"{e['nodes_total']}{mark}{sig}"


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.0f}"


def _time_table(data: dict, labels: list[str]) -> list[str]:
    """The heading and table of wall times, whole-process times and peak memory."""
    rows = []
    for r in data["models"]:
        cells = [f"{r['model']} ({r['original']['bytes'] / 2**20:.1f} MiB)"]
        for label in labels:
            e = r["tools"][label]
            whole = (f" / {e['process_seconds']:.2f} ({e['process_cpu']:.2f})"
                     if e.get("process_seconds") is not None else "")
            cells.append(f"{e['seconds']:.3f}{whole} / {_mb(e['peak_rss'])}" if e.get("ok") else
                         f"fails: {e.get('error', '')[:60]}")
        rows.append(cells)
    return ["**Wall time s (load, simplify, save) / whole process: wall s (CPU s) / peak RSS MiB of "
            "the process** (a bare interpreter that imported onnx and onnxruntime peaks at "
            f"{_mb(data.get('interpreter_rss'))} MiB):", markdown_table(["model"] + labels, rows)]


def tables(data: dict) -> str:
    labels = [c[0] for c in data["columns"]]
    parts = []
    parts.append(f"Machine: {data['machine_line']}. Run {data['date']}, rev {data['revision']}"
                 f"{' (--quick)' if data['quick'] else ''}. onnxopt `default` is `{data['default_pipeline']}`.")
    parts.append("**Nodes, total with subgraphs** (top graph in brackets where it differs; ✗ = outputs differ "
                 "from the original on onnxruntime; *fails* = the tool raised, crashed or timed out):")
    rows = []
    for r in data["models"]:
        o = r["original"]
        cells = [r["model"], f"{o['nodes_total']}" + (f" [{o['nodes']}]" if o["nodes"] != o["nodes_total"] else "")]
        for label in labels:
            e = r["tools"][label]
            c = _cell_nodes(e)
            if e.get("ok") and e["nodes"] != e["nodes_total"]:
                c += f" [{e['nodes']}]"
            cells.append(c)
        rows.append(cells)
    parts.append(markdown_table(["model", "original"] + labels, rows))

    parts.append("**Initializers / file KiB**:")
    rows = []
    for r in data["models"]:
        o = r["original"]
        cells = [r["model"], f"{o['initializers']} / {o['bytes'] / 1024:,.0f}"]
        for label in labels:
            e = r["tools"][label]
            cells.append(f"{e['initializers']} / {e['bytes'] / 1024:,.0f}" if e.get("ok") else "fails")
        rows.append(cells)
    parts.append(markdown_table(["model", "original"] + labels, rows))

    parts.extend(_time_table(data, labels))

    parts.append("**onnxruntime CPU latency, ratio to the original** (1 thread, ORT_ENABLE_ALL, median of "
                 "interleaved runs; original in ms; — where the result is wrong or missing; *original again* "
                 "is the original file in a second session: the noise floor of the machine):")
    rows = []
    for r in data["models"]:
        base = r["original"].get("latency_ms")
        cells = [r["model"], f"{base:.2f} ms × {r.get('latency_runs', 0)}" if base else "—",
                 f"{r['noise_ratio']:.2f}" if r.get("noise_ratio") else "—"]
        for label in labels:
            ratio = r["tools"][label].get("latency_ratio")
            cells.append(f"{ratio:.2f}" if ratio is not None else "—")
        rows.append(cells)
    parts.append(markdown_table(["model", "original", "original again (noise)"] + labels, rows))

    sc = data.get("scaling")
    if sc:
        sizes = list(sc["sizes"])
        counts = ", ".join(f"{int(sc['sizes'][s]):,}" for s in sizes)
        parts.append(f"**Generated chains** ({counts} nodes): "
                     "wall seconds, and the ratio for 10× the nodes (target ≤ 12):")
        rows = []
        for label in labels:
            per = sc["tools"].get(label, {})
            cells = [label]
            secs = []
            for s in sizes:
                e = per.get(s, {})
                secs.append(e.get("seconds") if e.get("ok") else None)
                cells.append(f"{e['seconds']:.2f} s → {e['nodes_total']:,}" if e.get("ok") else
                             f"fails: {(e.get('error') or '')[:50]}")
            cells.append(f"{secs[-1] / secs[0]:.1f}×" if len(secs) > 1 and None not in secs[-2:] and secs[0] else "—")
            rows.append(cells)
        parts.append(markdown_table(["tool"] + [f"{int(sc['sizes'][s]):,} nodes" for s in sizes] + ["ratio"], rows))

    bg = data.get("big")
    if bg:
        parts.append(f"**Generated model over 2 GB** ({bg['bytes'] / 2**30:.2f} GiB, external data):")
        rows = []
        for label in labels:
            e = bg["tools"].get(label, {})
            if e.get("ok"):
                what = (f"{e['seconds']:.1f} s, peak {_mb(e['peak_rss'])} MiB, {e['bytes'] / 2**30:.2f} GiB "
                        f"{'with' if e.get('external_data') else 'without'} external data, outputs "
                        f"{'equal' if e.get('equal') else 'DIFFER'}{(' — ' + e['error']) if e.get('error') else ''}")
            else:
                what = f"fails: {(e.get('error') or '')[:120]}"
            rows.append([label, what])
        parts.append(markdown_table(["tool", "result"], rows))

    parts.append("**Issue 4 targets, per onnxopt pipeline**:")
    parts.extend(f"- {line}" for line in data["targets"])
    if data.get("process_targets"):
        parts.append("**Whole-process targets (issue 15), per onnxopt pipeline** (wall times need a quiet "
                     "machine; CPU times are given beside them):")
        parts.extend(f"- {line}" for line in data["process_targets"])
    return "\n\n".join(parts)


def targets(data: dict) -> list[str]:
    """One line per issue-4 target and onnxopt pipeline, with the figures behind it."""
    lines = []
    n = len(data["models"])
    for label, tool, _ in data["columns"]:
        if tool != "onnxopt":
            continue
        wrong, not_min, strict, bigger, slower, mem, judged = [], [], 0, [], [], [], 0
        for r in data["models"]:
            e = r["tools"][label]
            if not (e.get("ok") and e.get("equal") and e.get("signature_kept", True)):
                wrong.append(r["model"])
                continue
            # A correct peer gives the original's outputs AND keeps the model's inputs and
            # outputs: dropping IR-3 weight inputs changes the model's signature.
            peers = [r["tools"][p] for p in PEERS if r["tools"][p].get("ok") and r["tools"][p].get("equal")
                     and r["tools"][p].get("signature_kept", True)]
            best = min((p["nodes_total"] for p in peers), default=None)
            if best is not None and e["nodes_total"] > best:
                not_min.append(f"{r['model']} {e['nodes_total']} vs {best}")
            if best is None or e["nodes_total"] < best:
                strict += 1
            if e["bytes"] > r["original"]["bytes"]:
                bigger.append(f"{r['model']} +{e['bytes'] - r['original']['bytes']} B")
            fastest = min((p["seconds"] for p in peers), default=None)
            if fastest is not None and e["seconds"] > fastest:
                slower.append(f"{r['model']} {e['seconds'] * 1000:.0f} vs {fastest * 1000:.0f} ms")
            if r["original"]["bytes"] >= 2**20:  # below 1 MiB the interpreter's own allocations dominate
                judged += 1
                if e["peak_above_baseline"] > 2 * r["original"]["bytes"]:
                    mem.append(f"{r['model']} {e['peak_above_baseline'] / r['original']['bytes']:.1f}×")
        lines.append(f"`{label}` — never wrong: {n - len(wrong)}/{n} models give the original's outputs with "
                     "the same inputs and outputs" + (f" (not: {', '.join(wrong)})" if wrong else "") + ".")
        lines.append(f"`{label}` — smallest graph: nodes ≤ the best correct peer on "
                     f"{n - len(wrong) - len(not_min)}/{n}, strictly fewer on {strict}/{n}"
                     + (f"; above on {'; '.join(not_min)}" if not_min else "")
                     + f". File larger than the original on {len(bigger)}/{n}"
                     + (f" ({'; '.join(bigger)})" if bigger else "") + ".")
        lines.append(f"`{label}` — wall time ≤ the fastest correct peer on {n - len(wrong) - len(slower)}/{n}"
                     + (f"; slower on {'; '.join(slower)}" if slower else "") + ".")
        lines.append(f"`{label}` — memory above the child's baseline below 2× the model's bytes on "
                     f"{judged - len(mem)}/{judged} models of 1 MiB or more"
                     + (f"; above on {'; '.join(mem)}" if mem else "") + ".")
        sc = data.get("scaling")
        if sc:
            per = sc["tools"].get(label, {})
            sizes = list(sc["sizes"])
            if len(sizes) > 1 and all(per.get(s, {}).get("ok") for s in sizes[-2:]):
                ratio = per[sizes[-1]]["seconds"] / per[sizes[-2]]["seconds"]
                lines.append(f"`{label}` — scaling: {int(sc['sizes'][sizes[-2]]):,} → {int(sc['sizes'][sizes[-1]]):,} "
                             f"nodes took {ratio:.1f}× the time (target ≤ 12×).")
        bg = data.get("big")
        if bg:
            e = bg["tools"].get(label, {})
            ok = e.get("ok") and e.get("equal") and e.get("external_data")
            lines.append(f"`{label}` — over 2 GB: "
                         + (f"went through in {e['seconds']:.0f} s (peak {e['peak_rss'] / 2**20:.0f} MiB for a "
                            f"{bg['bytes'] / 2**30:.2f} GiB model), written with external data, outputs equal"
                            if ok else f"did not go through: {e.get('error')}") + ".")
    return lines


def process_targets(data: dict) -> list[str]:
    """The whole-process targets, per onnxopt pipeline: wall time at most 1.1× the fastest
    correct peer's on every real model of 1 MiB or more and at most 0.25 s more on smaller
    ones (CPU time judged the same way beside it); peak memory above a bare interpreter at
    most 3× the model's bytes on models of 50 MiB or more, and at most the leanest correct
    peer's peak on every model."""
    lines = []
    base = data.get("interpreter_rss")
    for label, tool, _ in data["columns"]:
        if tool != "onnxopt":
            continue
        judged = {"wall": [], "cpu": []}
        misses: dict[str, list[str]] = {"wall": [], "cpu": [], "x3": [], "lean": []}
        big, lean = 0, 0
        for r in data["models"]:
            e, size = r["tools"][label], r["original"]["bytes"]
            peers = [r["tools"][p] for p in PEERS if r["tools"][p].get("ok") and r["tools"][p].get("equal")
                     and r["tools"][p].get("signature_kept", True) and r["tools"][p].get("process_seconds")]
            if not e.get("process_seconds") or not peers:
                continue
            for kind, key in (("wall", "process_seconds"), ("cpu", "process_cpu")):
                fastest = min(p[key] for p in peers)
                if r["model"] in REAL:
                    judged[kind].append(r["model"])
                    limit = 1.1 * fastest if size >= 2**20 else fastest + 0.25
                    if e[key] > limit:
                        misses[kind].append(f"{r['model']} {e[key]:.2f} vs {fastest:.2f} s")
            leanest = min(p["peak_rss"] for p in peers)
            lean += 1
            if e["peak_rss"] > leanest:
                misses["lean"].append(f"{r['model']} {_mb(e['peak_rss'])} vs {_mb(leanest)} MiB")
            if base and size >= 50 * 2**20:
                big += 1
                if e["peak_rss"] - base > 3 * size:
                    misses["x3"].append(f"{r['model']} {(e['peak_rss'] - base) / size:.1f}×")
        for kind, what in (("wall", "wall time"), ("cpu", "CPU time")):
            n = len(judged[kind])
            lines.append(f"`{label}` — whole-process {what} ≤ 1.1× the fastest correct peer (≥ 1 MiB) or "
                         f"≤ +0.25 s (smaller) on {n - len(misses[kind])}/{n} real models"
                         + (f"; above on {'; '.join(misses[kind])}" if misses[kind] else "") + ".")
        lines.append(f"`{label}` — peak memory above the bare interpreter ≤ 3× the model's bytes on "
                     f"{big - len(misses['x3'])}/{big} models of 50 MiB or more"
                     + (f"; above on {'; '.join(misses['x3'])}" if misses["x3"] else "") + ".")
        lines.append(f"`{label}` — peak memory ≤ the leanest correct peer's on {lean - len(misses['lean'])}/{lean} models"
                     + (f"; above on {'; '.join(misses['lean'])}" if misses["lean"] else "") + ".")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few small models, small chains, no >2 GB model")
    parser.add_argument("--pipeline", action="append", default=None,
                        help=f"an onnxopt pipeline to run beside `default` (repeatable; default {PASSES_B})")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per tool and model")
    parser.add_argument("--no-big", action="store_true", help="skip the >2 GB model")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README section")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite the README section from the saved benchmarks/results/simplify.json")
    args = parser.parse_args(argv)
    if args.render:
        import json

        from benchmarks.common import RESULTS

        data = json.loads((RESULTS / "simplify.json").read_text())
        data["targets"] = targets(data)
        data["process_targets"] = process_targets(data)
        update_readme("simplify", "### Simplification against onnxoptimizer, onnxsim and onnxslim (`make bench-simplify`)\n\n" + tables(data))
        print("\n".join(data["targets"]))
        return 0

    from onnxopt.framework import presets

    info = machine()
    print(machine_line(info), flush=True)
    pipelines = args.pipeline if args.pipeline is not None else [PASSES_B]
    columns = tools(pipelines)
    timeout = args.timeout or (120 if args.quick else 300)
    data: dict = {"machine": info, "machine_line": machine_line(info), "quick": args.quick,
                  "date": time.strftime("%Y-%m-%d"), "revision": _revision(),
                  "default_pipeline": presets()["default"][0], "columns": columns,
                  "versions": _versions(), "models": []}
    t_start = time.perf_counter()
    _byte_compile()
    data["interpreter_rss"] = interpreter_rss()
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-simplify-") as tmp:
        work = Path(tmp)
        print("models:", flush=True)
        for name, path, feeds in model_set(work, args.quick):
            print(f"  {name}", flush=True)
            data["models"].append(bench_model(name, path, feeds, columns, work, timeout,
                                              latency_budget=2.0 if args.quick else 12.0,
                                              max_runs=20 if args.quick else 60))
        print("scaling:", flush=True)
        blocks = [111, 1111] if args.quick else [1111, 11111]
        data["scaling"] = scaling(columns, work, blocks, timeout=timeout, slow=timeout / 8)
        if not (args.quick or args.no_big):
            print("over 2 GB:", flush=True)
            data["big"] = big(columns, work, timeout, width=8192)
    data["seconds"] = time.perf_counter() - t_start
    data["targets"] = targets(data)
    data["process_targets"] = process_targets(data)
    for line in data["targets"] + data["process_targets"]:
        print(line)
    if not args.quick:  # a smoke run leaves the recorded figures alone
        print(f"raw figures: {save_results('simplify', data)}")
    if not args.no_readme and not args.quick:
        update_readme("simplify", "### Simplification against onnxoptimizer, onnxsim and onnxslim (`make bench-simplify`)\n\n" + tables(data))
        print("README section 'simplify' updated")
    else:
        print(tables(data))
    print(f"total {data['seconds'] / 60:.1f} min")
    return 0


def _byte_compile() -> None:
    """Compile onnxopt's modules as pip does on install: the peers come installed, and a
    whole process of ours must not compile its sources each time (PYTHONDONTWRITEBYTECODE)."""
    import compileall

    from benchmarks.common import ROOT

    for folder in ("onnxopt", "passes", "benchmarks"):
        compileall.compile_dir(str(ROOT / folder), quiet=1)


def _revision() -> str:
    from benchmarks.common import git_revision

    return git_revision()


def _versions() -> dict:
    out = {}
    for mod in ("onnxoptimizer", "onnxsim", "onnxslim", "onnx", "onnxruntime", "onnx_graphsurgeon"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod.replace("_", "-"))
        except Exception:
            out[mod] = "missing"
    return out


if __name__ == "__main__":
    sys.exit(main())
