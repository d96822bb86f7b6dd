"""The torch op table, part two: the layers — convolutions, dense products, pooling,
normalization, resizing, LSTM, and QuantizeLinear/DequantizeLinear — with ONNX's
semantics: asymmetric and automatic padding, ``ceil_mode``, every Resize coordinate mode
for nearest and linear interpolation (computed per axis from ONNX's own formulas, so the
result is onnxruntime's, not torch's idea of them), LSTM gates in ONNX's ``iofc`` order.

QuantizeLinear is trained through: rounding passes the gradient straight through
(clipping stops it outside the grid), and its output stays a float tensor holding the
integers, which DequantizeLinear maps back — quantization-aware training with the scales
and zero points the quantize pass chose. Builders follow :mod:`.ops_tensor`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .ops_tensor import axis_of, ints, op, torch_dtype

__all__ = ["fake_quantize"]


def _pairs(node, key: str, spatial: int, default: int) -> list[int]:
    value = node.attrs.get(key)
    return [int(v) for v in value] if value is not None else [default] * spatial


def _auto_pads(mode: str, size: list[int], kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """ONNX pads (begins then ends) for SAME_UPPER/SAME_LOWER."""
    begins, ends = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        out = -(-n // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
        small, large = total // 2, total - total // 2
        begins.append(large if mode == "SAME_LOWER" else small)
        ends.append(small if mode == "SAME_LOWER" else large)
    return begins + ends


def _pads(node, x, kernel, strides, dilations) -> list[int]:
    spatial = x.dim() - 2
    mode = node.attrs.get("auto_pad", "NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        return _auto_pads(mode, list(x.shape[2:]), kernel, strides, dilations)
    if mode == "VALID":
        return [0] * (2 * spatial)
    return _pairs(node, "pads", 2 * spatial, 0)


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX pads [b1, b2, .., e1, e2, ..] as F.pad's [b_last, e_last, ...]."""
    n = len(pads) // 2
    out = []
    for i in range(n - 1, -1, -1):
        out += [pads[i], pads[n + i]]
    return out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@op("Conv")
def _conv(node, opset):
    group = int(node.attrs.get("group", 1))

    def fn(args):
        x, w = args[0], args[1]
        b = args[2] if len(args) > 2 else None
        spatial = x.dim() - 2
        kernel = list(w.shape[2:])
        strides = _pairs(node, "strides", spatial, 1)
        dilations = _pairs(node, "dilations", spatial, 1)
        pads = _pads(node, x, kernel, strides, dilations)
        if pads[:spatial] == pads[spatial:]:
            return _CONV[spatial](x, w, b, strides, pads[:spatial], dilations, group)
        return _CONV[spatial](F.pad(x, _torch_pad(pads)), w, b, strides, 0, dilations, group)
    return fn


@op("ConvTranspose")
def _conv_transpose(node, opset):
    group = int(node.attrs.get("group", 1))

    def fn(args):
        x, w = args[0], args[1]
        b = args[2] if len(args) > 2 else None
        spatial = x.dim() - 2
        kernel = list(w.shape[2:])
        strides = _pairs(node, "strides", spatial, 1)
        dilations = _pairs(node, "dilations", spatial, 1)
        extra = _pairs(node, "output_padding", spatial, 0)
        full = [s * (n - 1) + e + (k - 1) * d + 1
                for n, s, e, k, d in zip(x.shape[2:], strides, extra, kernel, dilations)]
        if node.attrs.get("output_shape") is not None:
            wanted = [int(v) for v in node.attrs["output_shape"]][-spatial:]
            totals = [f - o for f, o in zip(full, wanted)]
            upper = node.attrs.get("auto_pad", "NOTSET") in ("SAME_UPPER", b"SAME_UPPER")
            pads = [t // 2 if upper else t - t // 2 for t in totals] + [t - t // 2 if upper else t // 2 for t in totals]
        elif node.attrs.get("auto_pad", "NOTSET") in ("SAME_UPPER", b"SAME_UPPER", "SAME_LOWER", b"SAME_LOWER"):
            totals = [f - n * s for f, n, s in zip(full, x.shape[2:], strides)]
            lower = node.attrs["auto_pad"] in ("SAME_LOWER", b"SAME_LOWER")
            pads = [t - t // 2 if lower else t // 2 for t in totals] + [t // 2 if lower else t - t // 2 for t in totals]
        else:
            pads = _pairs(node, "pads", 2 * spatial, 0)
        if pads[:spatial] == pads[spatial:] and all(e < max(s, d) for e, s, d in zip(extra, strides, dilations)):
            return _CONV_T[spatial](x, w, b, strides, pads[:spatial], extra, group, dilations)
        y = _CONV_T[spatial](x, w, None, strides, 0, 0, group, dilations)
        # output_padding and asymmetric pads: pad the far side, then crop, then the bias
        y = F.pad(y, _torch_pad([0] * spatial + extra))
        index = [slice(None), slice(None)] + [slice(p, y.shape[2 + i] - q)
                                              for i, (p, q) in enumerate(zip(pads[:spatial], pads[spatial:]))]
        y = y[tuple(index)]
        return y if b is None else y + b.reshape([1, -1] + [1] * spatial)
    return fn


@op("MatMul")
def _matmul(node, opset):
    return lambda args: torch.matmul(args[0], args[1])


@op("Gemm")
def _gemm(node, opset):
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    ta, tb = bool(node.attrs.get("transA", 0)), bool(node.attrs.get("transB", 0))

    def fn(args):
        a, b = args[0], args[1]
        y = (a.t() if ta else a) @ (b.t() if tb else b)
        if alpha != 1.0:
            y = y * alpha
        if len(args) > 2 and args[2] is not None:
            y = y + (args[2] * beta if beta != 1.0 else args[2])
        return y
    return fn


# --------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------


@op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(node, opset):
    average = node.op == "GlobalAveragePool"

    def fn(args):
        x = args[0]
        dims = list(range(2, x.dim()))
        return x.mean(dims, keepdim=True) if average else x.amax(dims, keepdim=True)
    return fn


_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@op("MaxPool", "AveragePool")
def _pool(node, opset):
    kernel = [int(k) for k in node.attrs["kernel_shape"]]
    ceil = bool(node.attrs.get("ceil_mode", 0))
    include = bool(node.attrs.get("count_include_pad", 0))
    if len(node.outputs) > 1 and node.outputs[1].name:
        raise NotImplementedError("MaxPool with an Indices output")

    def fn(args):
        x = args[0]
        spatial = x.dim() - 2
        strides = _pairs(node, "strides", spatial, 1)
        dilations = _pairs(node, "dilations", spatial, 1)
        pads = _pads(node, x, kernel, strides, dilations)
        symmetric = pads[:spatial] == pads[spatial:] and all(
            p <= k // 2 for p, k in zip(pads[:spatial], kernel))
        if node.op == "MaxPool":
            if symmetric:
                return _MAX[spatial](x, kernel, strides, pads[:spatial], dilations, ceil)
            return _MAX[spatial](F.pad(x, _torch_pad(pads), value=-math.inf), kernel, strides, 0, dilations, ceil)
        if any(d != 1 for d in dilations):
            raise NotImplementedError("AveragePool with dilations")
        if symmetric:
            return _AVG[spatial](x, kernel, strides, pads[:spatial], ceil, include)
        total = _AVG[spatial](F.pad(x, _torch_pad(pads)), kernel, strides, 0, ceil, True)
        if include:
            return total
        ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype)
        share = _AVG[spatial](F.pad(ones, _torch_pad(pads)), kernel, strides, 0, ceil, True)
        return total / share
    return fn


# --------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------


@op("BatchNormalization")
def _batch_norm(node, opset):
    eps = float(node.attrs.get("epsilon", 1e-5))
    if node.attrs.get("training_mode", 0):
        raise NotImplementedError("BatchNormalization in training mode")
    return lambda args: F.batch_norm(args[0], args[3], args[4], args[1], args[2], False, 0.0, eps)


@op("InstanceNormalization")
def _instance_norm(node, opset):
    eps = float(node.attrs.get("epsilon", 1e-5))
    return lambda args: F.instance_norm(args[0], weight=args[1], bias=args[2], eps=eps)


@op("LayerNormalization")
def _layer_norm(node, opset):
    eps = float(node.attrs.get("epsilon", 1e-5))
    axis = int(node.attrs.get("axis", -1))
    if any(t.name for t in node.outputs[1:]):
        raise NotImplementedError("LayerNormalization with Mean/InvStdDev outputs")

    def fn(args):
        x = args[0]
        dims = list(range(axis_of(axis, x.dim()), x.dim()))
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
        y = (x - mean) / torch.sqrt(var + eps) * args[1]
        return y + args[2] if len(args) > 2 and args[2] is not None else y
    return fn


@op("GroupNormalization")
def _group_norm(node, opset):
    eps = float(node.attrs.get("epsilon", 1e-5))
    groups = int(node.attrs["num_groups"])

    def fn(args):
        x, scale, bias = args
        if scale.numel() != x.shape[1]:
            raise NotImplementedError("GroupNormalization with per-group scale (opset 18)")
        return F.group_norm(x, groups, scale, bias, eps)
    return fn


@op("LpNormalization")
def _lp_norm(node, opset):
    axis, p = int(node.attrs.get("axis", -1)), int(node.attrs.get("p", 2))
    return lambda args: args[0] / torch.linalg.vector_norm(args[0], p, dim=axis, keepdim=True)


# --------------------------------------------------------------------------------------
# Resize
# --------------------------------------------------------------------------------------


def _source(mode: str, out: int, size: int, scale: float) -> np.ndarray:
    """Source coordinate of each output position (ONNX coordinate_transformation_mode)."""
    i = np.arange(out, dtype=np.float64)
    if mode == "half_pixel":
        return (i + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (i + 0.5) / scale - 0.5 if out > 1 else np.zeros(out)
    if mode == "align_corners":
        return i * (size - 1) / (out - 1) if out > 1 else np.zeros(out)
    if mode == "asymmetric":
        return i / scale
    if mode == "half_pixel_symmetric":
        adjust = out / (scale * size)
        center = size / 2 * (1 - adjust)
        return center + (i + 0.5) / scale - 0.5
    raise NotImplementedError(f"Resize coordinate_transformation_mode {mode}")


def _nearest(mode: str, x: np.ndarray, size: int) -> np.ndarray:
    if mode == "round_prefer_floor":
        idx = np.where(x - np.floor(x) == 0.5, np.floor(x), np.round(x))
    elif mode == "round_prefer_ceil":
        idx = np.where(x - np.floor(x) == 0.5, np.ceil(x), np.round(x))
    elif mode == "floor":
        idx = np.floor(x)
    elif mode == "ceil":
        idx = np.ceil(x)
    else:
        raise NotImplementedError(f"Resize nearest_mode {mode}")
    return np.clip(idx, 0, size - 1).astype(np.int64)


def _text(value, default: str) -> str:
    value = default if value is None else value
    return value.decode() if isinstance(value, bytes) else value


@op("Resize", "Upsample")
def _resize(node, opset):
    mode = _text(node.attrs.get("mode"), "nearest")
    coords = _text(node.attrs.get("coordinate_transformation_mode"), "half_pixel" if opset >= 11 else "asymmetric")
    nearest = _text(node.attrs.get("nearest_mode"), "round_prefer_floor" if opset >= 11 else "floor")
    if mode not in ("nearest", "linear", "bilinear"):
        raise NotImplementedError(f"Resize mode {mode}")
    if opset < 11 and mode != "nearest":
        coords = "asymmetric"

    def fn(args):
        x = args[0]
        if opset < 10 and node.op == "Upsample":
            scales = [float(s) for s in node.attrs["scales"]]
        else:
            index = 1 if opset < 11 else 2
            s = args[index] if len(args) > index and args[index] is not None and args[index].numel() else None
            scales = [float(v) for v in s.reshape(-1).tolist()] if s is not None else None
        sizes = ints(args[3]) if scales is None and len(args) > 3 and args[3] is not None else None
        if scales is None:
            scales = [o / n for o, n in zip(sizes, x.shape)]
        else:
            sizes = [int(math.floor(n * s)) for n, s in zip(x.shape, scales)]
        for a, (n, o, s) in enumerate(zip(x.shape, sizes, scales)):
            if n == o and s == 1.0:
                continue
            src = _source(coords, o, n, s)
            if mode == "nearest":
                x = x.index_select(a, torch.from_numpy(_nearest(nearest, src, n)))
                continue
            src = np.clip(src, 0, n - 1)
            lo = np.floor(src).astype(np.int64)
            hi = np.minimum(lo + 1, n - 1)
            shape = [1] * x.dim()
            shape[a] = o
            w = torch.from_numpy((src - lo).astype(np.float32)).reshape(shape).to(x.dtype)
            x = x.index_select(a, torch.from_numpy(lo)) * (1 - w) + x.index_select(a, torch.from_numpy(hi)) * w
        return x
    return fn


@op("DepthToSpace", "SpaceToDepth")
def _depth_space(node, opset):
    b = int(node.attrs["blocksize"])
    dcr = _text(node.attrs.get("mode"), "DCR") == "DCR"

    def fn(args):
        x = args[0]
        n, c, h, w = x.shape
        if node.op == "SpaceToDepth":
            y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
            return y.reshape(n, c * b * b, h // b, w // b)
        if dcr:
            y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        else:
            y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
        return y.reshape(n, c // (b * b), h * b, w * b)
    return fn


# --------------------------------------------------------------------------------------
# Recurrences
# --------------------------------------------------------------------------------------


def _lstm_direction(x, w, r, b, h, c, p, reverse: bool, lengths):
    """One direction of an ONNX LSTM (gates i, o, f, c); x [T, N, I]."""
    hidden = r.shape[-1]
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    gx = torch.matmul(x, w.t()) + (b[:4 * hidden] + b[4 * hidden:])
    outs = [None] * x.shape[0]
    for t in steps:
        g = gx[t] + h @ r.t()
        i, o, f, cc = g.split(hidden, -1)
        if p is not None:
            i = i + p[:hidden] * c
            f = f + p[2 * hidden:] * c
        i, f, cc = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(cc)
        c_new = f * c + i * cc
        if p is not None:
            o = o + p[hidden:2 * hidden] * c_new
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if lengths is not None:
            alive = (t < lengths).reshape(-1, 1)
            c_new = torch.where(alive, c_new, c)
            h_new = torch.where(alive, h_new, h)
            outs[t] = torch.where(alive, h_new, torch.zeros_like(h_new))
        else:
            outs[t] = h_new
        h, c = h_new, c_new
    return torch.stack(outs), h, c


@op("LSTM")
def _lstm(node, opset):
    direction = _text(node.attrs.get("direction"), "forward")
    layout = int(node.attrs.get("layout", 0))
    for key in ("activations", "clip", "input_forget"):
        if node.attrs.get(key):
            raise NotImplementedError(f"LSTM with {key}")

    def fn(args):
        args = list(args) + [None] * (8 - len(args))
        x, w, r, b, lengths, h0, c0, p = args[:8]
        if layout:
            x = x.transpose(0, 1)
            h0 = h0.transpose(0, 1) if h0 is not None else None
            c0 = c0.transpose(0, 1) if c0 is not None else None
        dirs, hidden = w.shape[0], r.shape[-1]
        batch = x.shape[1]
        zeros = torch.zeros(dirs, batch, hidden, dtype=x.dtype)
        h0 = zeros if h0 is None else h0
        c0 = zeros if c0 is None else c0
        b = torch.zeros(dirs, 8 * hidden, dtype=x.dtype) if b is None else b
        ys, hs, cs = [], [], []
        for d in range(dirs):
            reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
            y, h, c = _lstm_direction(x, w[d], r[d], b[d], h0[d], c0[d], None if p is None else p[d],
                                      reverse, lengths)
            ys.append(y)
            hs.append(h)
            cs.append(c)
        y, yh, yc = torch.stack(ys, 1), torch.stack(hs), torch.stack(cs)
        if layout:
            return y.permute(2, 0, 1, 3), yh.transpose(0, 1), yc.transpose(0, 1)
        return y, yh, yc
    return fn


# --------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------


def _per_axis(t, x, axis: int):
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis_of(axis, x.dim())] = -1
    return t.reshape(shape)


def fake_quantize(x, scale, zero_point, qmin: int, qmax: int):
    """Integers of ``round(x / scale) + zero_point`` clipped to [qmin, qmax], as floats;
    the rounding passes the gradient straight through."""
    v = x / scale
    v = v + (torch.round(v) - v).detach()
    return torch.clamp(v + zero_point, qmin, qmax)


@op("QuantizeLinear")
def _quantize(node, opset):
    axis = int(node.attrs.get("axis", 1))
    if node.attrs.get("block_size", 0):
        raise NotImplementedError("blocked QuantizeLinear")
    out_type = node.attrs.get("output_dtype", 0)

    def fn(args):
        x, scale = args[0], args[1]
        zp = args[2] if len(args) > 2 and args[2] is not None else None
        dtype = zp.dtype if zp is not None else (torch_dtype(out_type) if out_type else torch.uint8)
        info = torch.iinfo(dtype)
        zpf = _per_axis(zp.to(x.dtype), x, axis) if zp is not None else 0.0
        return fake_quantize(x, _per_axis(scale, x, axis), zpf, info.min, info.max)
    return fn


@op("DequantizeLinear")
def _dequantize(node, opset):
    axis = int(node.attrs.get("axis", 1))
    if node.attrs.get("block_size", 0):
        raise NotImplementedError("blocked DequantizeLinear")

    def fn(args):
        x, scale = args[0], args[1]
        zp = args[2] if len(args) > 2 and args[2] is not None else None
        xf = x.to(scale.dtype)
        if zp is not None:
            xf = xf - _per_axis(zp.to(scale.dtype), x, axis)
        return xf * _per_axis(scale, x, axis)
    return fn
