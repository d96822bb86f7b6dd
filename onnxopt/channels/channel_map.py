"""The channel map: which of the original channels each pruned layer kept.

Structured pruning records it in the model's metadata so that a later pass can match a
compressed layer (the student) with the same layer of the original model (the teacher)
channel by channel. Layers are matched by :func:`layer_key`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import onnx_graphsurgeon as gs

from ..model import Model

__all__ = ["CHANNEL_MAP_KEY", "LAYER_OPS", "channel_maps", "set_channel_maps", "layer_key"]

#: Metadata key under which pruning records, per tensor, which of the original
#: channels survive (used to match a student's layers with the teacher's).
CHANNEL_MAP_KEY = "onnxopt.channel_map"
#: Ops whose constant weights define or read channels.
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def layer_key(node: gs.Node) -> str:
    """How a layer is matched between a teacher and its compressed student: the name of
    its first output tensor (passes keep tensor names; exporters often leave node names
    empty)."""
    return node.outputs[0].name if node.outputs else node.name


def channel_maps(model: Model) -> dict[str, list[int]]:
    """Tensor name -> the original channels its channels are (recorded by pruning)."""
    for key, value in model.metadata_props:
        if key == CHANNEL_MAP_KEY:
            try:
                data = json.loads(value)
            except ValueError:
                return {}
            return {k: [int(i) for i in v] for k, v in data.items()}
    return {}


def set_channel_maps(model: Model, maps: Mapping[str, list[int]]) -> None:
    """Record ``maps`` (tensor name -> original channels) in the model's metadata,
    replacing what was there; an empty mapping removes the entry."""
    text = json.dumps({k: list(map(int, v)) for k, v in sorted(maps.items())}, separators=(",", ":"))
    props = [(k, v) for k, v in model.metadata_props if k != CHANNEL_MAP_KEY]
    if maps:
        props.append((CHANNEL_MAP_KEY, text))
    model.metadata_props = props
