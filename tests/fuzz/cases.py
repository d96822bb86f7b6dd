"""Fuzz cases: a seed corpus of real and built models, and one case per seed number.

A case is everything one run of the command line needs: a folder holding the (mutated)
model with the files its external-data entries may name, and the argument list. It is
made from a single integer, so ``make_case(corpus, n)`` gives the same case on every
machine: the first mutation and the options come from ``random.Random(n)``.

The corpus (:func:`seed_corpus`) holds the models of :mod:`models.builders`, small ONNX
text models that stress odd signatures (rank-0 inputs, bool conditions, strings,
If/Loop bodies with outer references), a slice of the operator test cases that the
``onnx`` package ships, and the real models of ``.cache/models`` where fetched.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.parser

from tests.fuzz.mutate import mutate, mutate_bytes

__all__ = ["Seed", "Case", "seed_corpus", "make_case", "TEXT_SEEDS"]

#: Small models in ONNX text whose signatures are what generated feeds, shapes and
#: passes find hardest.
TEXT_SEEDS = {
    "if-bool-input": """
        <ir_version: 9, opset_import: ["" : 18]>
        g (bool c, float[N, 4] x) => (float[N, 4] y) {
            w = Constant<value = float[4] {1, 2, 3, 4}>()
            y = If(c) <then_branch = t () => (float[N, 4] a) { m = Mul(x, w)  a = Relu(m) },
                       else_branch = e () => (float[N, 4] b) { b = Sub(x, w) }>
        }""",
    "loop-outer": """
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2, 3] x, int64 n) => (float[2, 3] y, float[K, 2, 3] scan) {
            k = Constant<value = float[3] {0.5, 0.25, 2.0}>()
            c = Constant<value = bool {1}>()
            y, scan = Loop(n, c, x) <body = b (int64 i, bool ci, float[2, 3] acc) => (bool co, float[2, 3] o, float[2, 3] s) {
                co = Identity(ci)
                m = Mul(acc, k)
                o = Add(m, x)
                s = Identity(o)
            }>
        }""",
    "gather-ids": """
        <ir_version: 9, opset_import: ["" : 18]>
        g (int64[B, T] ids, float[B, T] mask) => (float[B, T, 4] y) {
            table = Constant<value = float[10, 4] {0,1,2,3,4,5,6,7,8,9,0,1,2,3,4,5,6,7,8,9,0,1,2,3,4,5,6,7,8,9,0,1,2,3,4,5,6,7,8,9}>()
            e = Gather(table, ids)
            u = Unsqueeze(mask, axes)
            axes = Constant<value = int64[1] {2}>()
            y = Mul(e, u)
        }""",
    "shape-arith": """
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[N, C, H, W] x) => (float[N, M] y) {
            s = Shape(x)
            i0 = Constant<value = int64[1] {0}>()
            n = Gather(s, i0)
            m1 = Constant<value = int64[1] {-1}>()
            t = Concat<axis = 0>(n, m1)
            y = Reshape(x, t)
        }""",
    "strings": """
        <ir_version: 9, opset_import: ["" : 18]>
        g (string[N] s, float[N] x) => (string[N] t, float[N] y) {
            t = Identity(s)
            y = Abs(x)
        }""",
    "scalars": """
        <ir_version: 9, opset_import: ["" : 18]>
        g (float a, int32 b, double c, float16[2] h, uint8[3] u) => (float y, double z, float16[2] hh, uint8[3] uu) {
            bf = Cast<to = 1>(b)
            y = Add(a, bf)
            z = Mul(c, c)
            hh = Neg(h)
            uu = Identity(u)
        }""",
    "conv-bn": """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[1, 2, 5, 5] x) => (float[1, 2, 5, 5] y) {
            w = Constant<value = float[2, 2, 1, 1] {1, 0.5, -1, 2}>()
            sc = Constant<value = float[2] {1.5, 0.5}>()
            b = Constant<value = float[2] {0.1, -0.2}>()
            mu = Constant<value = float[2] {0.0, 1.0}>()
            var = Constant<value = float[2] {1.0, 4.0}>()
            c = Conv<pads = [0, 0, 0, 0]>(x, w)
            y = BatchNormalization(c, sc, b, mu, var)
        }""",
}

#: Real models the corpus takes when they are in ``.cache/models`` (minilm only for the
#: long campaign: each case on it takes seconds).
REAL_QUICK = ["ppocr-cls", "silero-vad", "ppocr-det"]
REAL_ALL = REAL_QUICK + ["ppocr-rec", "minilm"]


@dataclass
class Seed:
    name: str
    data: bytes
    weight: float = 1.0


def _node_case_models(rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    if count <= 0:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            from onnx.backend.test.case.node import collect_testcases

            cases = collect_testcases(None)
    cases = sorted(cases, key=lambda c: c.name)
    picked = rng.sample(cases, min(count, len(cases)))
    return [(f"node:{c.name}", c.model.SerializeToString()) for c in picked]


def seed_corpus(*, node_cases: int = 60, real: list[str] | None = None, seed: int = 0) -> list[Seed]:
    """The models cases start from. ``real`` names the real models to include (default:
    the quick ones that are cached)."""
    from models import builders
    from models.fetch import cached

    corpus = []
    for name in ("cnn", "mlp", "control_flow", "dead_branches", "transformer"):
        corpus.append(Seed(f"build:{name}", builders.build(name).SerializeToString(), 2.0))
    for name, text in TEXT_SEEDS.items():
        corpus.append(Seed(f"text:{name}", onnx.parser.parse_model(text).SerializeToString(), 2.0))
    for name, data in _node_case_models(random.Random(seed), node_cases):
        corpus.append(Seed(name, data, 0.5))
    for name in (REAL_QUICK if real is None else real):
        path = cached(name)
        if path is not None:
            corpus.append(Seed(f"real:{name}", path.read_bytes(), 1.5 if name != "minilm" else 0.3))
    return corpus


@dataclass
class Case:
    """One run of the command line on a (mutated) model."""

    number: int
    seed_name: str
    mutations: list[str]
    argv: list[str]
    folder: Path
    files: dict[str, bytes] = field(default_factory=dict)

    def describe(self) -> str:
        return f"case {self.number} on {self.seed_name}: {'; '.join(self.mutations) or 'no mutation'}"

    def write(self) -> None:
        """Lay the case's files out in ``folder`` (cleared first)."""
        if self.folder.exists():
            shutil.rmtree(self.folder)
        (self.folder / "m").mkdir(parents=True)
        for rel, data in self.files.items():
            path = self.folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        # external data: a file inside the folder, one outside, a link pointing out
        (self.folder / "m" / "weights.bin").write_bytes(bytes(range(256)) * 16)
        (self.folder / "secret.bin").write_bytes(b"secret" * 100)
        (self.folder / "m" / "link.bin").symlink_to(self.folder / "secret.bin")

    def save_reproducer(self, where: Path) -> None:
        """The case as files anyone can rerun: the model(s), feeds and ``argv.json``."""
        where.mkdir(parents=True, exist_ok=True)
        for rel, data in self.files.items():
            (where / Path(rel).name).write_bytes(data)
        (where / "case.json").write_text(json.dumps(
            {"number": self.number, "seed": self.seed_name, "mutations": self.mutations,
             "argv": self.argv}, indent=2))


def _pick_seed(corpus: list[Seed], rng: random.Random) -> Seed:
    return rng.choices(corpus, weights=[s.weight for s in corpus])[0]


_EXACT = ["dead-nodes", "fold-constants", "eliminate-noops", "dedup-weights", "cse", "fold-batchnorm", "fuse",
          "inline-if"]
_OPTION_PASSES = ["fold-constants(size_limit=64)", "fold-constants(shapes=false)", "dedup-weights(min_bytes=0)",
                  "fuse(skip=matmul-add)", "fold-constants(grow_limit=0)", "fold-constants(keep_compact=false)"]
_LOSSY = ["prune-magnitude(sparsity=0.5)", "share-weights(bits=4)", "fp16", "materialize",
          "quantize(mode=dynamic)", "quantize(mode=weight-only)", "prune-channels(ratio=0.25)"]


def _pipeline(rng: random.Random, lossy: bool) -> list[str]:
    r = rng.random()
    if r < 0.5:
        return []
    if r < 0.6:
        return ["--preset", rng.choice(["default", "default", "int8-dynamic", "int4"] if lossy else ["default"])]
    items = rng.sample(_EXACT, rng.randint(1, 4))
    if rng.random() < 0.3:
        items.append(rng.choice(_OPTION_PASSES))
    text = ",".join(items)
    if rng.random() < 0.4:
        text = f"[{text}]"
    if lossy and rng.random() < 0.25:
        text += "," + rng.choice(_LOSSY)
    return ["-p", text]


def _shape_args(model: onnx.ModelProto | None, rng: random.Random) -> list[str]:
    names = [i.name for i in model.graph.input] if model is not None else []
    if not names or rng.random() < 0.8:
        return []
    name = rng.choice(names + ["nope"])
    dims = "x".join(str(rng.choice([1, 1, 2, 3, 8, 0, 64])) for _ in range(rng.choice([0, 1, 2, 3, 4])))
    return ["--shape", f"{name}={dims}"]


def _feeds_file(seed_model: onnx.ModelProto | None, rng: random.Random) -> bytes | None:
    """An .npz of feeds for the seed's inputs, sometimes off (a dtype, a shape, a name)."""
    if seed_model is None:
        return None
    import io

    from onnxopt import Model
    from onnxopt.data import random_feeds

    try:
        feeds, _ = random_feeds(Model.from_proto(seed_model))
    except Exception:
        return None
    if feeds and rng.random() < 0.5:
        key = rng.choice(sorted(feeds))
        r = rng.random()
        if r < 0.3:
            feeds[key] = feeds[key].astype(np.float64) if feeds[key].dtype != np.float64 else feeds[key].astype(np.int8)
        elif r < 0.6:
            feeds[key] = np.zeros((2,) * (feeds[key].ndim + 1), feeds[key].dtype)
        else:
            feeds["extra"] = np.zeros(3, np.float32)
    buf = io.BytesIO()
    np.savez(buf, **feeds)
    return buf.getvalue()


def make_case(corpus: list[Seed], number: int, root: Path, *, lossy: bool = True) -> Case:
    """Case ``number``: a seed, a mutation (structure-aware, bytes, or none) and options."""
    rng = random.Random(number)
    seed = _pick_seed(corpus, rng)
    proto = onnx.ModelProto()
    proto.ParseFromString(seed.data)
    kind = rng.random()
    mutations: list[str] = []
    if kind < 0.72:
        mutations = mutate(proto, rng)
        data = proto.SerializeToString()
    elif kind < 0.92:
        data, what = mutate_bytes(seed.data if rng.random() < 0.7 else proto.SerializeToString(), rng)
        mutations = [f"bytes: {what}"]
    else:
        data = seed.data
    files = {"m/model.onnx": data}
    folder = root / f"case-{number}"
    model = "m/model.onnx"
    command = rng.choices(["optimize", "inspect", "validate"], weights=[0.82, 0.09, 0.09])[0]
    argv: list[str]
    if command == "inspect":
        argv = ["inspect", model] + (["--json"] if rng.random() < 0.5 else []) + \
            (["--channel-groups"] if rng.random() < 0.3 else [])
    elif command == "validate":
        files["m/reference.onnx"] = seed.data
        pair = ["m/reference.onnx", model] if rng.random() < 0.5 else [model, "m/reference.onnx"]
        argv = ["validate", *pair, "--runs", "0"]
        argv += _shape_args(proto, rng)
    else:
        argv = ["optimize", model, "-o", "m/out.onnx"] + _pipeline(rng, lossy)
        argv += _shape_args(proto, rng)
        argv += ["--runs", "0" if rng.random() < 0.9 else "1"]
        for flag, p in (("--no-validate", 0.15), ("--verify-each", 0.1), ("--force", 0.1)):
            if rng.random() < p:
                argv.append(flag)
        if rng.random() < 0.2:
            argv += ["--report", "m/report.json"]
        if rng.random() < 0.08:
            argv += ["--external-data", rng.choice(["always", "never"])]
        if rng.random() < 0.05:
            argv += ["--max-rounds", str(rng.choice([0, 1, 2, -1]))]
        if rng.random() < 0.08:
            seed_model = onnx.ModelProto()
            seed_model.ParseFromString(seed.data)
            feeds = _feeds_file(seed_model, rng)
            if feeds is not None:
                files["m/feeds.npz"] = feeds
                argv += ["--inputs", "m/feeds.npz"]
    if rng.random() < 0.5:
        argv.append("-q")
    return Case(number, seed.name, mutations, argv, folder, files)
