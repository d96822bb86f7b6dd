"""Channel-dependency analysis and the rewrite that removes channels: what structured
pruning (``prune-channels``, ``merge-neurons``) and ``onnxopt inspect --channel-groups``
build on.

- :mod:`.dependencies` — :func:`analyze`: which channels must go together
  (:class:`ChannelGroup`, collected in :class:`ChannelGroups`), and why a group may not;
- :mod:`.keep` — :func:`keep_channels`: the rewrite that keeps a subset of each group's
  channels, every member consistently;
- :mod:`.channel_map` — the model metadata recording which original channels a pruned
  layer kept, and how teacher and student layers are matched;
- :mod:`.layout` — where a tensor's channels are (:class:`Layout`, :class:`Seg`) and what
  a removal rewrites (:class:`Member`);
- :mod:`.flow` — the state of the walk; :mod:`.layer_ops`, :mod:`.per_channel_ops` and
  :mod:`.shape_ops` — how each op carries channels; :mod:`.example_shapes` — shapes for
  one example input, where inference loses track.
"""

from .channel_map import CHANNEL_MAP_KEY, LAYER_OPS, channel_maps, layer_key
from .dependencies import ChannelGroup, ChannelGroups, analyze
from .keep import KeepStats, keep_channels
from .layout import FIXED, Layout, Member, Seg, kept_positions

__all__ = [
    "CHANNEL_MAP_KEY",
    "LAYER_OPS",
    "FIXED",
    "ChannelGroup",
    "ChannelGroups",
    "KeepStats",
    "Layout",
    "Member",
    "Seg",
    "analyze",
    "channel_maps",
    "keep_channels",
    "kept_positions",
    "layer_key",
]
