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
    fold_batchnorm,
    materialize,
    prune_magnitude,
    share_weights,
)

register_preset(
    "default",
    "[dead-nodes]",
    "the exact clean-up passes, run to a fixed point",
)
