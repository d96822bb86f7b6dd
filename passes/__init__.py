"""The pass library, imported as ``onnxopt.passes``.

Importing this package registers every built-in pass and the presets. A pass module
imports only the core (``onnxopt.model``, ``onnxopt.graph``, ``onnxopt.framework`` ...)
and numpy/networkx/onnx/onnx-graphsurgeon — never another pass.
"""

from onnxopt.framework import register_preset

from . import (
    dead_nodes,  # noqa: F401  (registers the pass)
    eliminate_noops,  # noqa: F401
    fold_constants,  # noqa: F401
    fuse,  # noqa: F401
)

register_preset(
    "default",
    "[dead-nodes]",
    "the exact clean-up passes, run to a fixed point",
)

__all__ = ["dead_nodes", "eliminate_noops", "fold_constants", "fuse"]
