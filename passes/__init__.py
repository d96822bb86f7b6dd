"""The pass library, imported as ``onnxopt.passes``.

Importing this package registers every built-in pass and the presets. A pass module
imports only the core (``onnxopt.model``, ``onnxopt.graph``, ``onnxopt.framework`` ...)
and numpy/networkx/onnx/onnx-graphsurgeon — never another pass.
"""

from onnxopt.framework import register_preset

from . import (
    dead_nodes,  # noqa: F401  (registers the pass)
    distill,  # noqa: F401
    merge_neurons,  # noqa: F401
    prune_channels,  # noqa: F401
    reconstruct,  # noqa: F401
)

register_preset(
    "default",
    "[dead-nodes]",
    "the exact clean-up passes, run to a fixed point",
)

__all__ = ["dead_nodes", "distill", "merge_neurons", "prune_channels", "reconstruct"]
