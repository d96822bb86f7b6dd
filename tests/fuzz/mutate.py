"""Structure-aware mutation of ONNX models, and byte mutation of their files.

Each mutator takes a ``ModelProto`` (changed in place) and a ``random.Random`` and
returns a short description of what it did, or None when the model offers nothing for
it (no subgraph to break, no initializer to retype ...). The mutations are the ways a
model reaches a converter broken or odd: dimensions (zero, negative, huge, symbolic,
wrong rank), element types, attributes (values, types, missing, unknown), names
(dangling, duplicated, empty), cycles, op types and opsets, broken If/Loop bodies,
tensor data that disagrees with its dims, and external-data entries that point
anywhere. :func:`mutate_bytes` works on the serialized file instead.

All randomness comes from the ``random.Random`` passed in, so a case is reproduced by
its seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.shape_inference
from onnx import AttributeProto, TensorProto, helper

__all__ = ["MUTATORS", "PRESERVING", "mutate", "mutate_bytes", "graphs_of"]

#: Dimension values a mutation picks from: edge cases first, then ordinary ones.
ODD_DIMS = [0, 1, -1, -7, 2**31 - 1, 2**31, 2**40, 2**62, 2**63 - 1, 3, 5, 16, 64]
#: Element types, valid and not.
ELEM_TYPES = list(range(0, 27)) + [99, -1]
_INT_EDGE = [0, 1, -1, 2, -2, 3, 7, -100, 2**31, -(2**31), 2**62, 2**63 - 1, -(2**63)]
_FLOAT_EDGE = [0.0, -0.0, 1.0, -1.0, 1e-30, 1e30, float("inf"), float("-inf"), float("nan"), 0.5]
_OPS = ["Relu", "Add", "Mul", "MatMul", "Conv", "Reshape", "Concat", "Slice", "Gather", "Transpose",
        "Identity", "Cast", "If", "Loop", "Split", "Squeeze", "Unsqueeze", "Softmax", "Gemm",
        "BatchNormalization", "Shape", "ConstantOfShape", "Expand", "Where", "NoSuchOp", "Constant",
        "Resize", "Pad", "ReduceMean", "TopK", "NonZero", "Range", "Tile", "Einsum", "Scan", "LSTM"]


def graphs_of(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph below it (If/Loop/Scan bodies), outermost first."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == AttributeProto.GRAPH:
                yield from graphs_of(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from graphs_of(g)


def _pick_graph(m: onnx.ModelProto, rng: random.Random, *, need_nodes: bool = True) -> onnx.GraphProto | None:
    graphs = [g for g in graphs_of(m.graph) if g.node or not need_nodes]
    if not graphs:
        return None
    # the main graph most of the time, a body now and then
    return graphs[0] if rng.random() < 0.6 else rng.choice(graphs)


def _pick_node(m: onnx.ModelProto, rng: random.Random) -> tuple[onnx.GraphProto, onnx.NodeProto] | None:
    g = _pick_graph(m, rng)
    if g is None or not g.node:
        return None
    return g, rng.choice(g.node)


def _names(g: onnx.GraphProto) -> list[str]:
    out = [v.name for v in g.input] + [t.name for t in g.initializer]
    for n in g.node:
        out.extend(o for o in n.output if o)
    return out


def _value_infos(m: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    out = []
    for g in graphs_of(m.graph):
        out.extend(g.input)
        out.extend(g.output)
        out.extend(g.value_info)
    return [v for v in out if v.type.HasField("tensor_type")]


def _odd_dim(rng: random.Random) -> int:
    return rng.choice(ODD_DIMS)


# --------------------------------------------------------------------------------------
# Mutators
# --------------------------------------------------------------------------------------


def dim_value(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """One declared dimension of an input/output/value_info becomes an odd value."""
    vis = [v for v in _value_infos(m) if v.type.tensor_type.HasField("shape")
           and v.type.tensor_type.shape.dim]
    if not vis:
        return None
    v = rng.choice(vis)
    dims = v.type.tensor_type.shape.dim
    d = rng.choice(dims)
    choice = rng.random()
    if choice < 0.7:
        d.dim_value = _odd_dim(rng)
        return f"dim of {v.name!r} -> {d.dim_value}"
    if choice < 0.85:
        d.dim_param = rng.choice(["N", "batch", "?", "", "x y", "N"])
        return f"dim of {v.name!r} -> {d.dim_param!r}"
    d.Clear()
    return f"dim of {v.name!r} cleared"


def rank(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """A declared shape gains or loses dimensions, or loses its shape altogether."""
    vis = _value_infos(m)
    if not vis:
        return None
    v = rng.choice(vis)
    tt = v.type.tensor_type
    r = rng.random()
    if r < 0.3:
        tt.ClearField("shape")
        return f"shape of {v.name!r} dropped"
    if r < 0.6 and tt.shape.dim:
        del tt.shape.dim[rng.randrange(len(tt.shape.dim))]
        return f"rank of {v.name!r} lowered"
    for _ in range(rng.choice([1, 1, 2, 6])):
        tt.shape.dim.add().dim_value = rng.choice([1, 2, 3])
    return f"rank of {v.name!r} raised"


def elem_type(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """A declared element type (input, output, value_info) changes."""
    vis = _value_infos(m)
    if not vis:
        return None
    v = rng.choice(vis)
    v.type.tensor_type.elem_type = rng.choice(ELEM_TYPES[:-1]) if rng.random() < 0.95 else 0
    return f"elem_type of {v.name!r} -> {v.type.tensor_type.elem_type}"


def initializer_type(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """An initializer's data_type changes while its data stays (sizes then disagree)."""
    inits = [t for g in graphs_of(m.graph) for t in g.initializer]
    if not inits:
        return None
    t = rng.choice(inits)
    t.data_type = rng.choice(ELEM_TYPES[:-1])
    return f"data_type of initializer {t.name!r} -> {t.data_type}"


def initializer_dims(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """An initializer's dims change (huge, negative, zero, one more or less) while its
    data stays."""
    inits = [t for g in graphs_of(m.graph) for t in g.initializer]
    if not inits:
        return None
    t = rng.choice(inits)
    r = rng.random()
    if r < 0.4 and t.dims:
        t.dims[rng.randrange(len(t.dims))] = _odd_dim(rng)
    elif r < 0.6 and t.dims:
        del t.dims[-1]
    elif r < 0.8:
        t.dims.append(rng.choice([1, 2, 0]))
    else:
        del t.dims[:]
    return f"dims of initializer {t.name!r} -> {list(t.dims)}"


def initializer_data(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """An initializer's raw data is cut short, grown, or replaced by typed data of the
    wrong length; or a value becomes NaN/inf."""
    inits = [t for g in graphs_of(m.graph) for t in g.initializer]
    if not inits:
        return None
    t = rng.choice(inits)
    r = rng.random()
    if t.HasField("raw_data") and r < 0.5:
        raw = t.raw_data
        t.raw_data = raw[: rng.randrange(len(raw))] if raw and r < 0.3 else raw + b"\0" * rng.choice([1, 4, 100])
        return f"raw_data of {t.name!r} resized to {len(t.raw_data)}"
    if r < 0.8:
        t.ClearField("raw_data")
        del t.float_data[:]
        t.float_data.extend(rng.choice(_FLOAT_EDGE) for _ in range(rng.choice([0, 1, 3])))
        return f"data of {t.name!r} replaced by {len(t.float_data)} floats"
    t.ClearField("raw_data")
    t.string_data.append(b"\xff\xfe" if rng.random() < 0.5 else b"text")
    return f"data of {t.name!r} replaced by strings"


def attribute(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """An attribute's value becomes odd (negative axes, huge ints, NaN floats, empty
    lists), its type changes, it is removed, or an unknown one is added."""
    picked = _pick_node(m, rng)
    if picked is None:
        return None
    _, node = picked
    r = rng.random()
    if not node.attribute or r < 0.15:
        name = rng.choice(["axis", "perm", "kernel_shape", "pads", "to", "keepdims", "mode", "unknown_attr",
                           "group", "strides", "axes", "transB", "split", "value"])
        a = node.attribute.add()
        a.name = name
        kind = rng.choice(["i", "ints", "f", "s"])
        if kind == "i":
            a.type, a.i = AttributeProto.INT, rng.choice(_INT_EDGE)
        elif kind == "ints":
            a.type = AttributeProto.INTS
            a.ints.extend(rng.choice(_INT_EDGE) for _ in range(rng.choice([0, 1, 2, 4])))
        elif kind == "f":
            a.type, a.f = AttributeProto.FLOAT, rng.choice(_FLOAT_EDGE)
        else:
            a.type, a.s = AttributeProto.STRING, rng.choice([b"", b"nearest", b"\xff", b"x" * 100])
        return f"attribute {name!r} added to {node.op_type}"
    a = rng.choice(node.attribute)
    if r < 0.3:
        node.attribute.remove(a)
        return f"attribute {a.name!r} of {node.op_type} removed"
    if r < 0.4:
        a.type = rng.choice([t for t in range(0, 15) if t != a.type])
        return f"attribute {a.name!r} of {node.op_type} retyped to {a.type}"
    if a.type == AttributeProto.INT:
        a.i = rng.choice(_INT_EDGE)
    elif a.type == AttributeProto.INTS:
        if a.ints and rng.random() < 0.7:
            a.ints[rng.randrange(len(a.ints))] = rng.choice(_INT_EDGE)
        else:
            del a.ints[: rng.randrange(len(a.ints) + 1)]
    elif a.type == AttributeProto.FLOAT:
        a.f = rng.choice(_FLOAT_EDGE)
    elif a.type == AttributeProto.FLOATS:
        a.floats.append(rng.choice(_FLOAT_EDGE))
    elif a.type == AttributeProto.STRING:
        a.s = rng.choice([b"", b"constant", b"reflect", b"linear", b"\xff"])
    elif a.type == AttributeProto.TENSOR:
        initializer_like(a.t, rng)
    elif a.type == AttributeProto.GRAPH:
        _break_graph(a.g, rng)
    else:
        a.ref_attr_name = "nope"
    return f"attribute {a.name!r} of {node.op_type} changed"


def initializer_like(t: TensorProto, rng: random.Random) -> None:
    """Odd dims or data for a tensor held in an attribute (Constant's value ...)."""
    r = rng.random()
    if r < 0.4:
        if t.dims:
            t.dims[0] = _odd_dim(rng)
        else:
            t.dims.append(_odd_dim(rng))
    elif r < 0.7:
        t.data_type = rng.choice(ELEM_TYPES[:-1])
    elif t.HasField("raw_data"):
        t.raw_data = t.raw_data[: len(t.raw_data) // 2]
    else:
        t.int64_data.extend([_odd_dim(rng)])


def dangling(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """A node input, or a graph output, names a tensor that does not exist."""
    picked = _pick_node(m, rng)
    if picked is None:
        return None
    g, node = picked
    if node.input and rng.random() < 0.7:
        i = rng.randrange(len(node.input))
        node.input[i] = rng.choice(["nowhere", "", "  ", "x\n"])
        return f"input {i} of {node.op_type} -> {node.input[i]!r}"
    if g.output:
        g.output[rng.randrange(len(g.output))].name = "nowhere"
        return "a graph output names nothing"
    return None


def duplicate(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """Two things get the same name: node outputs, initializers, inputs, an output that
    is an input, a node that writes a graph input or an initializer."""
    g = _pick_graph(m, rng)
    if g is None:
        return None
    names = _names(g)
    r = rng.random()
    if r < 0.3 and len(g.node) > 1:
        a, b = rng.sample(list(g.node), 2)
        if a.output and b.output:
            b.output[0] = a.output[0]
            return f"two nodes write {a.output[0]!r}"
    if r < 0.5 and g.initializer:
        t = rng.choice(g.initializer)
        twin = g.initializer.add()
        twin.CopyFrom(t)
        if rng.random() < 0.5 and twin.HasField("raw_data"):
            twin.raw_data = bytes(len(twin.raw_data))
        return f"initializer {t.name!r} twice"
    if r < 0.7 and g.node and names:
        node = rng.choice(g.node)
        if node.output:
            node.output[0] = rng.choice([v.name for v in g.input] + [t.name for t in g.initializer] or names)
            return f"{node.op_type} writes {node.output[0]!r}"
    if g.output and names:
        out = g.output.add()
        out.CopyFrom(rng.choice(g.output))
        if rng.random() < 0.5:
            out.name = rng.choice(names)
        return f"output {out.name!r} listed twice or naming another tensor"
    return None


def cycle(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """A node reads its own output or one computed after it."""
    g = _pick_graph(m, rng)
    if g is None or not g.node:
        return None
    i = rng.randrange(len(g.node))
    j = rng.randrange(i, len(g.node))
    a, b = g.node[i], g.node[j]
    if not b.output or not b.output[0]:
        return None
    if a.input:
        a.input[rng.randrange(len(a.input))] = b.output[0]
    else:
        a.input.append(b.output[0])
    return f"{a.op_type} reads {b.output[0]!r} of a later node ({j - i} on)"


def reorder(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """Nodes out of topological order, removed, or duplicated."""
    g = _pick_graph(m, rng)
    if g is None or not g.node:
        return None
    nodes = list(g.node)
    r = rng.random()
    if r < 0.4:
        rng.shuffle(nodes)
        what = "nodes shuffled"
    elif r < 0.7:
        del nodes[rng.randrange(len(nodes))]
        what = "a node removed"
    else:
        dup = onnx.NodeProto()
        dup.CopyFrom(rng.choice(nodes))
        nodes.insert(rng.randrange(len(nodes) + 1), dup)
        what = "a node duplicated"
    del g.node[:]
    g.node.extend(nodes)
    return what


def op_type(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """A node becomes another op (or an unknown one, or one of another domain)."""
    picked = _pick_node(m, rng)
    if picked is None:
        return None
    _, node = picked
    old = node.op_type
    r = rng.random()
    if r < 0.8:
        node.op_type = rng.choice(_OPS)
    elif r < 0.9:
        node.domain = rng.choice(["com.microsoft", "ai.onnx.ml", "custom.nowhere", "ai.onnx"])
    else:
        node.op_type = ""
    return f"{old} -> {node.domain + '::' if node.domain else ''}{node.op_type}"


def opset(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """The opset imports or the IR version change (too old, too new, missing, doubled)."""
    r = rng.random()
    if r < 0.3:
        m.ir_version = rng.choice([0, 1, 2, 3, 4, 7, 11, 12, 99, -1])
        return f"ir_version -> {m.ir_version}"
    if r < 0.5:
        del m.opset_import[:]
        return "opset imports removed"
    if r < 0.65:
        extra = m.opset_import.add()
        extra.domain, extra.version = "", rng.choice([1, 7, 30])
        return f"default opset imported twice ({extra.version})"
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = rng.choice([1, 6, 9, 11, 13, 16, 21, 23, 24, 30, 1000])
            return f"opset -> {o.version}"
    return None


def subgraph(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """An If/Loop/Scan body is broken: outputs removed or added, inputs changed, an
    outer-scope reference renamed, the body swapped with another, or dropped."""
    holders = [(n, a) for g in graphs_of(m.graph) for n in g.node for a in n.attribute
               if a.type == AttributeProto.GRAPH]
    if not holders:
        return None
    node, a = rng.choice(holders)
    r = rng.random()
    if r < 0.15:
        node.attribute.remove(a)
        return f"body {a.name!r} of {node.op_type} dropped"
    if r < 0.3:
        others = [b for n, b in holders if b is not a]
        if others:
            a.g.CopyFrom(rng.choice(others).g)
            return f"body {a.name!r} of {node.op_type} swapped"
    return f"body {a.name!r} of {node.op_type}: " + _break_graph(a.g, rng)


def _break_graph(g: onnx.GraphProto, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.25 and g.output:
        del g.output[rng.randrange(len(g.output))]
        return "an output removed"
    if r < 0.4 and g.output:
        g.output.add().CopyFrom(rng.choice(g.output))
        return "an output doubled"
    if r < 0.55 and g.input:
        del g.input[rng.randrange(len(g.input))]
        return "an input removed"
    if r < 0.7:
        g.input.add().CopyFrom(helper.make_tensor_value_info("extra_in", TensorProto.FLOAT, [1]))
        return "an input added"
    if r < 0.85 and g.node:
        node = rng.choice(g.node)
        if node.input:
            node.input[0] = rng.choice(["outer_nowhere", g.output[0].name if g.output else "x"])
            return "a body node reads something else"
    del g.node[:]
    return "nodes removed"


def external(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """An initializer claims external data: a location that is absolute, leaves the
    folder, is missing or empty; an offset/length that is negative, huge or not a number."""
    inits = [t for g in graphs_of(m.graph) for t in g.initializer]
    if not inits:
        return None
    t = rng.choice(inits)
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("raw_data")
    del t.external_data[:]
    location = rng.choice(["/etc/hostname", "../secret.bin", "missing.bin", "", "weights.bin", "weights.bin",
                           "sub/../weights.bin", "C:\\w.bin", "weights.bin\0x", "link.bin"])
    entries = [("location", location)]
    r = rng.random()
    if r < 0.3:
        entries.append(("offset", rng.choice(["-4", "0", "12", "1e3", "x", str(2**40)])))
    if r < 0.6:
        entries.append(("length", rng.choice(["-1", "0", "4", "64", str(2**40), "abc"])))
    if r > 0.9:
        entries.append(("checksum", "0"))
    for k, v in entries:
        e = t.external_data.add()
        e.key, e.value = k, v
    return f"initializer {t.name!r} external at {location!r} " + " ".join(f"{k}={v}" for k, v in entries[1:])


def outputs(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """The graph's outputs: all removed, one an input or an initializer, one re-declared
    with another type."""
    g = m.graph
    r = rng.random()
    if r < 0.2:
        del g.output[:]
        return "every graph output removed"
    if r < 0.5 and (g.input or g.initializer):
        src = rng.choice([v.name for v in g.input] + [t.name for t in g.initializer])
        g.output.add().CopyFrom(helper.make_tensor_value_info(src, TensorProto.FLOAT, None))
        return f"graph output {src!r} added"
    if r < 0.7 and g.input:
        del g.input[rng.randrange(len(g.input))]
        return "a graph input removed"
    if g.input:
        inp = rng.choice(g.input)
        inp.type.tensor_type.elem_type = rng.choice([TensorProto.BOOL, TensorProto.STRING, TensorProto.INT64,
                                                     TensorProto.FLOAT16, TensorProto.UINT8])
        if rng.random() < 0.5:
            del inp.type.tensor_type.shape.dim[:]
        return f"input {inp.name!r} retyped to {inp.type.tensor_type.elem_type}"
    return None


def shape_constant(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """A small int64 constant (a Reshape target, Slice bounds, axes, pads) gets odd values."""
    candidates: list[TensorProto] = []
    for g in graphs_of(m.graph):
        candidates.extend(t for t in g.initializer if t.data_type == TensorProto.INT64 and len(t.dims) <= 1)
        for n in g.node:
            if n.op_type == "Constant":
                candidates.extend(a.t for a in n.attribute if a.type == AttributeProto.TENSOR
                                  and a.t.data_type == TensorProto.INT64)
    if not candidates:
        return None
    t = rng.choice(candidates)
    values = list(onnx.numpy_helper.to_array(t).reshape(-1)) if t.dims or t.raw_data or t.int64_data else []
    if values and rng.random() < 0.8:
        values[rng.randrange(len(values))] = rng.choice(_INT_EDGE + [0, -1, 2**31])
    else:
        values.append(rng.choice(_INT_EDGE))
    arr = np.array(values, np.int64)
    t.CopyFrom(onnx.numpy_helper.from_array(arr.reshape(()) if arr.size == 1 and not t.dims else arr, t.name))
    return f"int64 constant {t.name!r} -> {values[:6]}"


def strings(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """Names and other text become odd but valid: empty, very long, with spaces, slashes,
    newlines or non-ASCII letters."""
    picked = _pick_node(m, rng)
    if picked is None:
        return None
    g, node = picked
    odd = rng.choice(["", " ", "a/b", "../x", "x" * 5000, "名前", "new\nline", "dot.name", "%s{}", "\u202e"])
    r = rng.random()
    if r < 0.4 and node.output:
        old = node.output[0]
        for other in g.node:
            for i, name in enumerate(other.input):
                if name == old:
                    other.input[i] = odd
        for o in g.output:
            if o.name == old:
                o.name = odd
        node.output[0] = odd
        return f"tensor {old!r} renamed {odd!r}"
    if r < 0.7:
        node.name = odd
        return f"node renamed {odd!r}"
    m.graph.doc_string = odd
    m.producer_name = odd
    return "doc string and producer made odd"


# ---- mutations that keep a valid model valid (they reach the passes, not the loader) ----


def dynamic_dims(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """Graph input dimensions become named (dynamic), as a user editing an export does."""
    inputs = [v for v in m.graph.input if v.type.HasField("tensor_type") and v.type.tensor_type.shape.dim]
    if not inputs:
        return None
    v = rng.choice(inputs)
    dims = v.type.tensor_type.shape.dim
    picked = [0] if rng.random() < 0.6 else range(len(dims))
    for i in picked:
        dims[i].dim_param = rng.choice(["N", "batch", f"d{i}", "?"])
    return f"input {v.name!r} dims {list(picked)} dynamic"


def insert_noop(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """An Identity between a tensor and one reader of it: what eliminate-noops removes."""
    picked = _pick_node(m, rng)
    if picked is None:
        return None
    g, node = picked
    slots = [i for i, name in enumerate(node.input) if name]
    if not slots or node.op_type == "Constant":
        return None
    i = rng.choice(slots)
    new = f"{node.input[i]}__noop{rng.randrange(10**6)}"
    op = "Identity"
    g.node.insert(list(g.node).index(node), helper.make_node(op, [node.input[i]], [new]))
    node.input[i] = new
    return f"{op} before input {i} of {node.op_type}"


def duplicate_node(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """A node computed twice (same op, inputs, attributes): the copy is a new graph
    output when its type is declared, so that cse has something to merge."""
    g = m.graph
    typed = {v.name: v for v in list(g.value_info) + list(g.output)}
    cands = [n for n in g.node if len(n.output) == 1 and n.output[0] in typed]
    if not cands:
        return None
    node = rng.choice(cands)
    twin = onnx.NodeProto()
    twin.CopyFrom(node)
    twin.name = (node.name or node.op_type) + "__twin"
    twin.output[0] = node.output[0] + "__twin"
    g.node.insert(list(g.node).index(node) + 1, twin)
    out = g.output.add()
    out.CopyFrom(typed[node.output[0]])
    out.name = twin.output[0]
    return f"{node.op_type} duplicated as a new output"


def declared_shape(m: onnx.ModelProto, rng: random.Random) -> str | None:
    """A value_info entry declares a shape the graph does not compute (same rank, other
    sizes): a pass must never trust it."""
    def declared():
        return [v for g in graphs_of(m.graph) for v in g.value_info
                if v.type.HasField("tensor_type") and v.type.tensor_type.shape.dim]
    vis = declared()
    if not vis:  # a model without declarations gets the inferred ones first
        m.graph.value_info.extend(onnx.shape_inference.infer_shapes(m).graph.value_info)
        vis = declared()
    if not vis:
        return None
    v = rng.choice(vis)
    d = rng.choice(v.type.tensor_type.shape.dim)
    d.dim_value = rng.choice([1, 2, 3, 7])
    return f"value_info of {v.name!r} declares {d.dim_value}"


#: Mutations after which a valid model stays valid.
PRESERVING = {"dynamic-dims": dynamic_dims, "insert-noop": insert_noop, "duplicate-node": duplicate_node,
              "declared-shape": declared_shape}

MUTATORS: dict[str, Callable[[onnx.ModelProto, random.Random], str | None]] = {
    "dim": dim_value, "rank": rank, "elem-type": elem_type, "init-type": initializer_type,
    "init-dims": initializer_dims, "init-data": initializer_data, "attribute": attribute,
    "dangling": dangling, "duplicate": duplicate, "cycle": cycle, "reorder": reorder, "op-type": op_type,
    "opset": opset, "subgraph": subgraph, "external": external, "outputs": outputs,
    "shape-constant": shape_constant, "strings": strings, **PRESERVING,
}


def mutate(m: onnx.ModelProto, rng: random.Random, count: int | None = None) -> list[str]:
    """Apply ``count`` (default 1–3) random structure-aware mutations to ``m`` in place;
    returns what each did."""
    done = []
    count = count if count is not None else rng.choice([1, 1, 1, 2, 3])
    names = sorted(MUTATORS)
    keep_valid = rng.random() < 0.35  # a third of the cases stay valid and reach the passes
    for _ in range(count * 4):
        if len(done) >= count:
            break
        name = rng.choice(sorted(PRESERVING) if keep_valid else names)
        try:
            what = MUTATORS[name](m, rng)
        except Exception:  # an earlier mutation left something this one cannot read
            what = None
        if what is not None:
            done.append(f"{name}: {what}")
    return done


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A byte-level mutation of a serialized model: flipped bits, overwritten bytes,
    cut, inserted or repeated chunks, a splice of two places."""
    if not data:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64))), "random bytes"
    buf = bytearray(data)
    r = rng.random()
    n = len(buf)
    if r < 0.25:
        for _ in range(rng.choice([1, 1, 2, 8])):
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        return bytes(buf), "bits flipped"
    if r < 0.45:
        for _ in range(rng.choice([1, 3, 16])):
            buf[rng.randrange(n)] = rng.choice([0, 0xFF, 0x7F, 0x80, 0x08, 0x0A, 0x12, 0x1A, 0x22, rng.randrange(256)])
        return bytes(buf), "bytes overwritten"
    if r < 0.6:
        cut = rng.randrange(n)
        return bytes(buf[:cut]), f"truncated at {cut} of {n}"
    if r < 0.75:
        i = rng.randrange(n)
        j = min(n, i + rng.choice([1, 4, 64, 1024]))
        return bytes(buf[:i] + buf[j:]), f"bytes {i}:{j} deleted"
    if r < 0.9:
        i = rng.randrange(n)
        j = min(n, i + rng.choice([1, 4, 64, 1024]))
        k = rng.randrange(n)
        return bytes(buf[:k] + buf[i:j] + buf[k:]), f"bytes {i}:{j} repeated at {k}"
    i = rng.randrange(n)
    k = rng.randrange(n)
    return bytes(buf[:i] + buf[k:]), f"spliced {i}/{k}"
