"""A small MatMul-heavy transformer encoder (BERT-like) built with onnx.helper, and token
inputs for BERT-like models.

:func:`transformer` — token ids and an attention mask in, hidden states out: an
embedding Gather, then ``layers`` blocks of LayerNormalization, multi-head attention
(MatMul + bias Add projections, scaled QK^T, additive padding mask, Softmax) and a GELU
feed-forward network, each with a residual Add. Weights are seeded; MatMul weights hold
almost all parameters, which is what weight-only quantization is measured on.

:func:`token_feeds` — padded, ragged batches of token ids (``[CLS] ... [SEP]`` then
padding 0) and their attention masks: the inputs that break calibrators which do not
expect masked values.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["transformer", "token_feeds"]

F = TensorProto.FLOAT


def transformer(seed: int = 0, *, layers: int = 2, hidden: int = 256, heads: int = 4, ffn: int = 1024,
                vocab: int = 128) -> onnx.ModelProto:
    """A BERT-like encoder: inputs ``input_ids`` and ``attention_mask`` (int64 [N, S]),
    output ``hidden`` (float [N, S, hidden])."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    count = [0]

    def name(base: str) -> str:
        count[0] += 1
        return f"{base}_{count[0]}"

    def init(base: str, arr) -> str:
        n = name(base)
        inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def op(kind: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or name(kind.lower())
        nodes.append(helper.make_node(kind, inputs, [out], name=name(kind), **attrs))
        return out

    def linear(x: str, n_in: int, n_out: int, prefix: str) -> str:
        w = init(f"{prefix}.weight", (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32))
        b = init(f"{prefix}.bias", (0.02 * rng.standard_normal(n_out)).astype(np.float32))
        return op("Add", [op("MatMul", [x, w]), b])

    def layer_norm(x: str, prefix: str) -> str:
        g = init(f"{prefix}.gamma", (1 + 0.05 * rng.standard_normal(hidden)).astype(np.float32))
        b = init(f"{prefix}.beta", (0.02 * rng.standard_normal(hidden)).astype(np.float32))
        return op("LayerNormalization", [x, g, b], axis=-1, epsilon=1e-12)

    head = hidden // heads
    emb = init("embeddings", (0.5 * rng.standard_normal((vocab, hidden))).astype(np.float32))
    x = layer_norm(op("Gather", [emb, "input_ids"], axis=0), "embeddings.ln")
    # additive mask: 0 where attended, -10000 where padded; [N, 1, 1, S]
    mask_f = op("Cast", ["attention_mask"], to=F)
    inv = op("Sub", [init("one", np.array(1.0, np.float32)), mask_f])
    bias = op("Mul", [inv, init("neg", np.array(-10000.0, np.float32))])
    bias = op("Unsqueeze", [bias, init("axes", np.array([1, 2], np.int64))])
    split_shape = init("split_shape", np.array([0, 0, heads, head], np.int64))
    merge_shape = init("merge_shape", np.array([0, 0, hidden], np.int64))
    scale = init("scale", np.array(1.0 / np.sqrt(head), np.float32))
    for i in range(layers):
        p = f"layer{i}"

        def heads_of(t: str) -> str:
            return op("Transpose", [op("Reshape", [t, split_shape])], perm=[0, 2, 1, 3])

        q = heads_of(linear(x, hidden, hidden, f"{p}.query"))
        k = op("Transpose", [op("Reshape", [linear(x, hidden, hidden, f"{p}.key"), split_shape])],
               perm=[0, 2, 3, 1])
        v = heads_of(linear(x, hidden, hidden, f"{p}.value"))
        scores = op("Add", [op("Mul", [op("MatMul", [q, k]), scale]), bias])
        ctx = op("MatMul", [op("Softmax", [scores], axis=-1), v])
        ctx = op("Reshape", [op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge_shape])
        x = layer_norm(op("Add", [linear(ctx, hidden, hidden, f"{p}.output"), x]), f"{p}.attention.ln")
        h = linear(x, hidden, ffn, f"{p}.intermediate")
        gelu = op("Mul", [op("Mul", [h, init("half", np.array(0.5, np.float32))]),
                          op("Add", [op("Erf", [op("Div", [h, init("sqrt2", np.array(np.sqrt(2.0), np.float32))])]),
                                     init("one_", np.array(1.0, np.float32))])])
        out = op("Add", [linear(gelu, ffn, hidden, f"{p}.ffn_output"), x])
        x = layer_norm(out, f"{p}.output.ln")
    nodes.append(helper.make_node("Identity", [x], ["hidden"], name="output"))
    graph = helper.make_graph(
        nodes, "transformer",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "S"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "S"])],
        [helper.make_tensor_value_info("hidden", F, ["N", "S", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="onnxopt-models", producer_version="1")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def token_feeds(n: int, *, vocab: int = 30522, lengths: tuple[int, int] = (6, 48), batch: int = 1,
                pad_to: int | None = None, seed: int = 0, names: tuple[str, str] = ("input_ids", "attention_mask"),
                first_token: int = 101, last_token: int = 102, low: int = 1000) -> list[dict[str, np.ndarray]]:
    """``n`` feed dicts of ``batch`` sequences of random lengths in ``lengths``: ``[CLS]``
    tokens ``[SEP]``, padded with 0 to the longest in the batch (or ``pad_to``), and the
    matching attention mask. Sequence lengths differ between samples (ragged)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        lens = rng.integers(lengths[0], lengths[1] + 1, size=batch)
        width = pad_to or int(lens.max())
        ids = np.zeros((batch, width), np.int64)
        mask = np.zeros((batch, width), np.int64)
        for b, length in enumerate(lens):
            length = min(int(length), width)
            body = rng.integers(min(low, vocab - 1), vocab, size=max(length - 2, 0))
            seq = np.concatenate([[first_token % vocab], body, [last_token % vocab]])[:length]
            ids[b, :length] = seq
            mask[b, :length] = 1
        feeds.append({names[0]: ids, names[1]: mask})
    return feeds
