"""The pass library, imported as ``onnxopt.passes``.

Importing this package registers every built-in pass and the presets. A pass module
imports only the core (``onnxopt.model``, ``onnxopt.graph``, ``onnxopt.framework`` ...)
and numpy/networkx/onnx/onnx-graphsurgeon — never another pass.
"""

from onnxopt.framework import register_preset

from . import (  # noqa: F401  (importing a module registers its passes)
    cse,
    dead_nodes,
    dedup_weights,
    distill,
    eliminate_noops,
    fold_batchnorm,
    fold_constants,
    fp16,
    fuse,
    inline_if,
    materialize,
    merge_neurons,
    prune_channels,
    prune_magnitude,
    quantize,
    reconstruct,
    share_weights,
)

register_preset(
    "default",
    "[fold-constants,inline-if,eliminate-noops,fold-batchnorm,fuse,dedup-weights,cse,dead-nodes]",
    "the exact clean-up passes, run to a fixed point",
)

register_preset(
    "int8",
    "default,quantize(mode=static,method=percentile,min_cosine=0.995)",
    "the default clean-up, then static int8 for onnxruntime's CPU provider: u8 activations, "
    "per-channel weights, percentile calibration, accuracy guard at cosine 0.995 on calibration "
    "data, which leaves a margin for unseen data (needs --calib)",
)
register_preset(
    "int8-tensorrt",
    "default,quantize(mode=static,profile=tensorrt,method=percentile,min_cosine=0.995)",
    "the default clean-up, then symmetric int8 Q/DQ placed for TensorRT's explicit quantization "
    "(needs --calib)",
)
register_preset(
    "int8-dynamic",
    "quantize(mode=dynamic)",
    "int8 MatMul/Gemm weights, activations quantized at run time (no calibration)",
)
register_preset(
    "int4",
    "quantize(mode=weight-only,bits=4)",
    "blockwise int4 MatMul weights (MatMulNBits on the CPU provider; no calibration)",
)
