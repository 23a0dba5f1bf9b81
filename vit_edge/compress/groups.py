"""Coupled prunable groups: which parameter slices belong to one removable unit.

A unit is what structured pruning removes as a whole (DepGraph's coupled group,
Torch-Pruning): an attention head is its q, k and v rows of the fused ``qkv``
projection plus the projection's input columns; an MLP hidden unit is one fc1 output
(kernel column and bias) plus the fc2 input row; a TFormer PCS-FFN unit is one
position inside every shuffle chunk, ``groups^2`` hidden channels at once, so both
group convolutions keep equal groups and the channel shuffle still feeds whole fc2
groups. Removing a unit therefore removes exactly that unit's contribution to the
consumer (``proj`` / ``fc2``): the pruned network equals the unpruned one with those
units' outputs zeroed (tests/test_prune.py checks it for every family).

Each :class:`Group` names its key in the model's ``unit_widths`` field, so the sliced
parameter tree and the recorded widths rebuild the same shapes through the registry.

Example::

    model = create_model("deit_tiny_patch16", num_classes=10)
    for g in groups.find_groups(model, variables["params"]):
      print(g.key, g.kind, g.num_units)   # blocks_0/attn heads 3, blocks_0/mlp hidden 768
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from vit_edge.models import edgevit
from vit_edge.models import mobilevitv2
from vit_edge.models import tformer
from vit_edge.models import vit

# units (sorted, in the pruned model's order) -> indices along one axis of a tensor.
ChannelMap = Callable[[Sequence[int]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Member:
  """One tensor slice of a group.

  Attributes:
    path: the parameter's path under ``params``, e.g. ("blocks_0", "attn", "qkv",
      "kernel").
    axis: the axis that carries the units.
    channels: kept units -> indices along `axis`, in the pruned model's layout.
    consumer: True for the consumer's input rows (``proj`` / ``fc2`` kernel):
      zeroing them zeroes the units' outputs.
    collection: "params", or "batch_stats" for BatchNorm running statistics
      (sliced with the weights, not scored).
  """

  path: tuple[str, ...]
  axis: int
  channels: ChannelMap
  consumer: bool = False
  collection: str = "params"


@dataclasses.dataclass(frozen=True)
class Group:
  """Removable units of one layer that are pruned together.

  Attributes:
    key: the layer's key in the model's ``unit_widths`` (its module path).
    kind: "heads" or "hidden" (MLP / FFN hidden units).
    num_units: units the layer has now.
    members: every tensor slice the units own.
    consumer: module path of the layer reading the units' outputs (proj / fc2);
      its input is the units' activation (for the HSIC score).
    consumer_channels: units -> channel indices of the consumer's input.
    width: units kept -> the value recorded in ``unit_widths`` (heads, or hidden
      channels).
    unit_name: what one unit is, for messages.
  """

  key: str
  kind: str
  num_units: int
  members: tuple[Member, ...]
  consumer: str
  consumer_channels: ChannelMap
  width: Callable[[int], int]
  unit_name: str

  @property
  def weights(self) -> tuple[Member, ...]:
    """The members in ``params`` (what importance scores read)."""
    return tuple(m for m in self.members if m.collection == "params")


def _get(tree: Any, path: Sequence[str]) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def _range_map(n_per_unit: int) -> ChannelMap:
  """Unit u owns channels [u * n, (u + 1) * n): hidden units, heads in proj."""
  return lambda units: np.concatenate(
      [np.arange(u * n_per_unit, (u + 1) * n_per_unit) for u in units]).astype(np.int64)


def head_group(params: Any, key: str, attn: tuple[str, ...], head_dim: int,
               qkv_bias: bool = True) -> Group:
  """Heads of a fused-qkv attention (timm layout: qkv output = (3, heads, head_dim))."""
  inner = _get(params, attn + ("qkv", "kernel")).shape[1] // 3
  heads = inner // head_dim

  def qkv_channels(units):
    return np.array([s * inner + h * head_dim + t for s in range(3) for h in units
                     for t in range(head_dim)], np.int64)

  members = [Member(attn + ("qkv", "kernel"), 1, qkv_channels)]
  if qkv_bias:
    members.append(Member(attn + ("qkv", "bias"), 0, qkv_channels))
  members.append(Member(attn + ("proj", "kernel"), 0, _range_map(head_dim), True))
  return Group(key, "heads", heads, tuple(members), "/".join(attn + ("proj",)),
               _range_map(head_dim), lambda k: k, f"head ({head_dim} channels)")


def mlp_group(params: Any, key: str, mlp: tuple[str, ...]) -> Group:
  """Hidden units of an fc1 -> activation -> fc2 MLP.

  Dense kernels ([in, out]) and 1x1-conv kernels ([1, 1, in, out], EdgeViT's CMlp)
  both carry outputs on the last axis and inputs on the one before.
  """
  hidden = _get(params, mlp + ("fc1", "kernel")).shape[-1]
  one = _range_map(1)
  return Group(key, "hidden", hidden, (
      Member(mlp + ("fc1", "kernel"), -1, one),
      Member(mlp + ("fc1", "bias"), 0, one),
      Member(mlp + ("fc2", "kernel"), -2, one, True)),
      "/".join(mlp + ("fc2",)), one, lambda k: k, "hidden unit")


def pcs_ffn_group(params: Any, key: str, mlp: tuple[str, ...], groups: int) -> Group:
  """PCS-FFN units: position t of every shuffle chunk, groups^2 channels each.

  With hidden H, g groups, ``per_group = H / g`` and ``m = H / g^2``: fc1 group gi's
  output p = h * m + t (chunk h, position t) goes through the shuffle to fc2 group h,
  kernel row ``t * g + gi``. fc2's kernel rows are shared by its groups, so a row can
  only go for every chunk at once: the unit is t, which owns fc1 channels
  ``gi * per_group + h * m + t`` for all (gi, h) and fc2 rows ``t * g + gi``.
  """
  g = groups
  hidden = _get(params, mlp + ("fc1", "kernel")).shape[3]
  per_group, m = hidden // g, hidden // (g * g)

  def fc1_channels(units):
    return np.array([gi * per_group + h * m + t for gi in range(g) for h in range(g)
                     for t in units], np.int64)

  def fc2_rows(units):
    return np.array([t * g + gi for t in units for gi in range(g)], np.int64)

  def consumer_channels(units):  # fc2 input (after the shuffle): h * per_group + row.
    return np.array([h * per_group + t * g + gi for h in range(g) for t in units
                     for gi in range(g)], np.int64)

  return Group(key, "hidden", m, (
      Member(mlp + ("fc1", "kernel"), 3, fc1_channels),
      Member(mlp + ("fc1", "bias"), 0, fc1_channels),
      Member(mlp + ("fc2", "kernel"), 2, fc2_rows, True)),
      "/".join(mlp + ("fc2",)), consumer_channels, lambda k: k * g * g,
      f"shuffle unit ({g * g} channels)")


def inverted_residual_group(params: Any, key: str, block: tuple[str, ...]) -> Group:
  """Hidden channels of a MobileNetV2 inverted residual (expand, depthwise, project).

  A channel owns the expand conv's output column, both BatchNorms' entries (scale,
  bias and running statistics) and the depthwise filter, and the project conv's
  input row.
  """
  hidden = _get(params, block + ("conv1_1x1", "conv", "kernel")).shape[3]
  one = _range_map(1)
  members = [Member(block + ("conv1_1x1", "conv", "kernel"), 3, one),
             Member(block + ("conv2_kxk", "conv", "kernel"), 3, one),
             Member(block + ("conv3_1x1", "conv", "kernel"), 2, one, True)]
  for conv in ("conv1_1x1", "conv2_kxk"):
    members += [Member(block + (conv, "bn", leaf), 0, one) for leaf in ("scale", "bias")]
    members += [Member(block + (conv, "bn", leaf), 0, one, collection="batch_stats")
                for leaf in ("mean", "var")]
  return Group(key, "hidden", hidden, tuple(members),
               "/".join(block + ("conv3_1x1", "conv")), one, lambda k: k,
               "hidden channel")


def mobilevitv2_groups(model: Any, params: Any) -> list[Group]:
  """MobileViTv2: inverted-residual hidden channels and transformer FFN hidden units.

  The separable attention's width d is the transformer's residual width (normed as
  a whole by GroupNorm), so it is not a removable unit here.
  """
  out = []
  for name in sorted(params):
    if not name.startswith("stages_"):
      continue
    block = params[name]
    if "conv1_1x1" in block:
      out.append(inverted_residual_group(params, name, (name,)))
    for layer in sorted(k for k in block if k.startswith("transformer_")):
      mlp = block[layer].get("mlp", {})
      if "fc1" in mlp and "fc2" in mlp:  # The dense FFN (not a mixture of experts).
        out.append(mlp_group(params, f"{name}/{layer}/mlp", (name, layer, "mlp")))
  return out


def vit_groups(model: vit.VisionTransformer, params: Any) -> list[Group]:
  """Heads and MLP hidden units of every ViT / DeiT block."""
  head_dim = model.embed_dim // model.num_heads
  out = []
  for i in range(model.depth):
    block = (f"blocks_{i}",)
    out.append(head_group(params, f"blocks_{i}/attn", block + ("attn",), head_dim,
                          model.qkv_bias))
    out.append(mlp_group(params, f"blocks_{i}/mlp", block + ("mlp",)))
  return out


def edgevit_groups(model: edgevit.EdgeViT, params: Any) -> list[Group]:
  """EdgeViT: both MLPs of each block; heads where sr_ratio == 1.

  With sr_ratio > 1 the attention output passes LocalProp and a LayerNorm over all
  its channels, which would mix a removed head's channels into the kept ones, so
  those heads stay (the stage-4 blocks, sr_ratio 1, carry most heads).
  """
  out = []
  for s, depth in enumerate(model.depths):
    dim = model.embed_dims[s]
    head_dim = dim // (dim // model.head_dim)
    for i in range(depth):
      block = f"blocks{s + 1}_{i}"
      if "LocalAgg" in params[block]:
        out.append(mlp_group(params, f"{block}/LocalAgg/mlp",
                                  (block, "LocalAgg", "mlp")))
      if model.sr_ratios[s] == 1:
        out.append(head_group(params, f"{block}/SelfAttn/attn",
                              (block, "SelfAttn", "attn"), head_dim, model.qkv_bias))
      out.append(mlp_group(params, f"{block}/SelfAttn/mlp",
                                 (block, "SelfAttn", "mlp")))
  return out


def tformer_groups(model: tformer.TFormer, params: Any) -> list[Group]:
  """PCS-FFN hidden units (whole shuffle units) of every TFormer block."""
  out = []
  for i, depth in enumerate(model.depths):
    for j in range(depth):
      block = f"network_{2 * i}_{j}"
      out.append(pcs_ffn_group(params, f"{block}/mlp", (block, "mlp"),
                               model.ffn_groups))
  return out


GROUP_FINDERS = {
    vit.VisionTransformer: vit_groups,
    edgevit.EdgeViT: edgevit_groups,
    tformer.TFormer: tformer_groups,
    mobilevitv2.MobileViTv2: mobilevitv2_groups,
}


def find_groups(model: Any, params: Any) -> list[Group]:
  """The prunable groups of `model` with the sizes found in `params`.

  Raises:
    NotImplementedError: for a family without groups (names the supported ones).
  """
  for cls, finder in GROUP_FINDERS.items():
    if isinstance(model, cls):
      return finder(model, params)
  raise NotImplementedError(
      f"Structured pruning has no coupled groups for {type(model).__name__}; "
      f"supported: {', '.join(c.__name__ for c in GROUP_FINDERS)}.")
