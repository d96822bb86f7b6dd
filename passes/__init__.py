"""The pass library, imported as ``onnxopt.passes``.

Importing this package names every built-in pass with the module that defines it, and
registers the presets; a pass module is imported (and its pass registered) when the pass
is first asked for, so that a run imports only the passes it uses. A pass module imports
only the core (``onnxopt.model``, ``onnxopt.graph``, ``onnxopt.framework`` ...) and
numpy/networkx/onnx/onnx-graphsurgeon — never another pass.
"""

from onnxopt.framework import declare_passes, register_preset

declare_passes(__name__, {
    "cse": "cse",
    "dead-nodes": "dead_nodes",
    "dedup-weights": "dedup_weights",
    "distill": "distill",
    "eliminate-noops": "eliminate_noops",
    "finetune": "finetune",
    "fold-batchnorm": "fold_batchnorm",
    "fold-constants": "fold_constants",
    "fp16": "fp16",
    "fuse": "fuse",
    "inline-if": "inline_if",
    "materialize": "materialize",
    "merge-neurons": "merge_neurons",
    "prune-channels": "prune_channels",
    "prune-magnitude": "prune_magnitude",
    "quantize": "quantize",
    "reconstruct": "reconstruct",
    "share-weights": "share_weights",
})

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

_RETRAIN = "finetune(steps=1500,batch=16,lr=0.003,temperature=4,patience=0)"
register_preset(
    "compress",
    f"prune-magnitude(sparsity=0.96,scope=global),{_RETRAIN},share-weights(bits=3,init=kmeans++),{_RETRAIN}",
    "Deep Compression without labels: 96 % of the weights pruned under one global threshold, retrained "
    "against the original, 3-bit k-means sharing, centroids fine-tuned (needs --calib and onnxopt[train]; "
    "set for dense classifiers, conv nets want a lower sparsity)",
)
