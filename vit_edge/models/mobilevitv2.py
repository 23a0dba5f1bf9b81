"""MobileViTv2: separable (linear) self-attention for mobile vision transformers.

Reference: Mehta & Rastegari, "Separable Self-attention for Mobile Vision
Transformers", TMLR 2023 (arXiv 2206.02680); code apple/ml-cvnets and timm's port
(``timm/models/mobilevit.py`` + ``byobnet.py``, models ``mobilevitv2_050`` ..
``mobilevitv2_200``).

What is faithful to timm (checked by converting timm state_dicts: logits agree to
~1e-5 in float32, see :func:`convert_torch_state_dict`):

* the layout (stem, five layers, global-average-pool head, no final expansion conv),
  every channel count and parameter (the counts equal timm's for all seven widths);
* the separable attention, the unfold/fold of 2x2 patches into ``[B, P, N, C]``
  (P pixels per patch, N patches), the GroupNorm(1 group) norms over the whole
  unfolded tensor, the SiLU ConvMlp;
* the bilinear ``align_corners=True`` resize that timm and ml-cvnets apply when a
  MobileViTv2 block's input is not a multiple of the patch size (e.g. the 7x7 last
  layer at 224 input becomes 8x8, and stays 8x8);
* stochastic-depth rates rising linearly over the nine blocks, a transformer
  block's rate shared by all its layers.

Deliberate differences: DropPath in inverted residuals is applied only where there
is a residual (timm's ByobNet also drops whole non-residual downsampling blocks,
which zeroes a sample's features); the FFN and classifier use the shared
``layers.Mlp`` / ``layers.classifier_head`` initialisers (truncated normal 0.02)
instead of timm's fan-out normal / normal(0.01). Neither changes inference.

The transformer layer's FFN is pluggable (``LinearTransformerBlock.ffn``, and per
layer through ``MobileViTv2.ffn_for_layer``) so that a mixture-of-experts variant
can replace the FFN of chosen layers without copying the model. An FFN may return
``(y, ffn_aux)`` instead of ``y``; the model then returns each such layer's
``ffn_aux`` entries in its ``aux`` as ``"stage{s}_layer{i}/<key>"`` (the routing
of `vit_edge.models.moe`, read by the balance losses and the routing picture).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_edge.models import convert
from vit_edge.models import layers
from vit_edge.models import registry

Dtype = Any
# Builds an FFN: called as ``ffn(hidden_features=..., dtype=..., name="mlp")``; the
# module maps ``(x, deterministic=...)`` with x of shape [B, P, N, d] to the same
# shape, or to ``(y, ffn_aux)`` with a dict of named intermediates. ``layers.Mlp``
# fits; so does the mixture of experts ``moe.MoeFfn``.
FfnFactory = Callable[..., nn.Module]

# timm's ConvMlp in LinearTransformerBlock: 1x1 d->2d, SiLU, 1x1 2d->d (both with
# bias). On the unfolded [B, P, N, d] tensor a 1x1 conv is a Dense on the last axis.
DEFAULT_FFN: FfnFactory = functools.partial(layers.Mlp, act=nn.silu)

_STRIDE = 32
_PATCH_SIZE = 2
_BASE_CHANNELS = (64, 128, 256, 384, 512)  # layer outputs at width multiplier 1.
_TRANSFORMER_DEPTHS = (2, 4, 3)  # layers 3, 4, 5.


def _conv_init(groups: int = 1) -> Callable[..., jax.Array]:
  """timm ByobNet's conv init: normal, std sqrt(2 / (kh * kw * out / groups))."""

  def init(key, shape, dtype=jnp.float32):
    kh, kw, _, out = shape
    std = math.sqrt(2.0 / (kh * kw * out // groups))
    return std * jax.random.normal(key, shape, dtype)

  return init


class ConvNormAct(nn.Module):
  """Conv (no bias, 'same' padding) -> BatchNorm -> optional SiLU (timm ConvNormAct).

  Attributes:
    features: output channels.
    kernel_size: square kernel size (odd).
    stride: convolution stride.
    groups: feature groups (``features`` for depthwise).
    apply_act: whether to end with SiLU.
    dtype: compute dtype.
  """

  features: int
  kernel_size: int = 1
  stride: int = 1
  groups: int = 1
  apply_act: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    # PyTorch pads k // 2 on every side, also with stride 2 (not TF-style 'SAME').
    pad = self.kernel_size // 2
    x = nn.Conv(self.features, (self.kernel_size, self.kernel_size),
                strides=self.stride, padding=((pad, pad), (pad, pad)),
                feature_group_count=self.groups, use_bias=False, dtype=self.dtype,
                conv_general_dilated=layers.conv_general_dilated,
                kernel_init=_conv_init(self.groups), name="conv")(x)
    x = layers.batch_norm(train, self.dtype, name="bn")(x)
    return nn.silu(x) if self.apply_act else x


class InvertedResidual(nn.Module):
  """MobileNetV2 inverted residual (timm BottleneckBlock with bottle_in, linear out).

  1x1 expand (BN, SiLU) -> depthwise 3x3 with stride (BN, SiLU) -> 1x1 project
  (BN); residual only when stride is 1 and the channels are unchanged.

  Attributes:
    features: output channels.
    stride: stride of the depthwise conv.
    expand_ratio: hidden = make_divisible(in_channels * expand_ratio, 8).
    drop_path_rate: stochastic depth on the residual branch.
    dtype: compute dtype.
  """

  features: int
  stride: int = 1
  expand_ratio: float = 2.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  # Hidden channels kept by structured pruning (vit_edge.compress); None = default.
  hidden_features: Optional[int] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    in_features = x.shape[-1]
    hidden = (self.hidden_features
              or layers.make_divisible(in_features * self.expand_ratio))
    shortcut = x
    x = ConvNormAct(hidden, 1, dtype=self.dtype, name="conv1_1x1")(x, train)
    x = ConvNormAct(hidden, 3, stride=self.stride, groups=hidden, dtype=self.dtype,
                    name="conv2_kxk")(x, train)
    x = ConvNormAct(self.features, 1, apply_act=False, dtype=self.dtype,
                    name="conv3_1x1")(x, train)
    if self.stride == 1 and in_features == self.features:
      x = layers.DropPath(self.drop_path_rate)(x, deterministic=not train)
      x = x + shortcut
    return x


class LinearSelfAttention(nn.Module):
  """Separable self-attention (ml-cvnets / timm LinearSelfAttention).

  Works on unfolded tokens ``[B, P, N, d]`` and mixes only along N (the patches)
  for each of the P pixel positions: a context score per token (softmax over N)
  weights the keys into one context vector, which gates ReLU(values). Cost is
  linear in N.

  Attributes:
    dtype: compute dtype.
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              kernel_init=layers.conv_kernel_init,
                              bias_init=nn.initializers.zeros,
                              dot_general=layers.dense_dot_general)
    qkv = dense(1 + 2 * dim, name="qkv_proj")(x)
    query, key, value = qkv[..., :1], qkv[..., 1:1 + dim], qkv[..., 1 + dim:]
    # Softmax over the N patches and the weighted sum over them run in float32:
    # under bf16 compute a sum over up to ~1000 patches would lose precision.
    scores = jax.nn.softmax(query.astype(jnp.float32), axis=2)
    context = jnp.sum(key.astype(jnp.float32) * scores, axis=2, keepdims=True)
    context = context.astype(key.dtype)  # [B, P, 1, d]
    out = nn.relu(value) * context
    return dense(dim, name="out_proj")(out)


class LinearTransformerBlock(nn.Module):
  """Pre-norm transformer layer of MobileViTv2: separable attention + FFN.

  ``x + DropPath(attn(norm1(x)))`` then ``x + DropPath(mlp(norm2(x)))``; both norms
  are GroupNorm with one group over the whole ``[P, N, d]`` sample (eps 1e-5).

  Attributes:
    mlp_ratio: FFN hidden width = int(d * mlp_ratio).
    drop_path_rate: stochastic depth of both residual branches.
    ffn: factory of the FFN module, called as
      ``ffn(hidden_features=..., dtype=..., name="mlp")``; the module is applied as
      ``mlp(y, deterministic=not train)`` to ``y`` of shape [B, P, N, d] (P pixel
      positions, N patches) and returns that shape. Replace it (e.g. with a
      per-patch mixture of experts) to change this layer's FFN; the default is
      timm's ConvMlp (``fc1``/``fc2``, SiLU).
    return_ffn_aux: return ``(x, ffn_aux)`` ({} when the FFN returns an array)
      instead of ``x``.
    dtype: compute dtype.

  Example::

      layer = LinearTransformerBlock(ffn=functools.partial(MyMoeFfn, num_experts=4))
  """

  mlp_ratio: float = 2.0
  drop_path_rate: float = 0.0
  ffn: FfnFactory = DEFAULT_FFN
  return_ffn_aux: bool = False
  dtype: Dtype = jnp.float32
  # FFN hidden width kept by structured pruning; None = int(d * mlp_ratio).
  mlp_hidden: Optional[int] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> Any:
    dim = x.shape[-1]
    norm = functools.partial(nn.GroupNorm, num_groups=1, epsilon=1e-5,
                             use_fast_variance=False, dtype=self.dtype)
    drop_path = layers.DropPath(self.drop_path_rate)
    y = LinearSelfAttention(dtype=self.dtype, name="attn")(norm(name="norm1")(x))
    x = x + drop_path(y, deterministic=not train)
    mlp = self.ffn(hidden_features=self.mlp_hidden or int(dim * self.mlp_ratio),
                   dtype=self.dtype, name="mlp")
    y = mlp(norm(name="norm2")(x), deterministic=not train)
    ffn_aux = {}
    if isinstance(y, tuple):  # An FFN with intermediates (a mixture of experts).
      y, ffn_aux = y
    x = x + drop_path(y, deterministic=not train)
    return (x, ffn_aux) if self.return_ffn_aux else x


def _align_corners_matrix(out_size: int, in_size: int) -> np.ndarray:
  """[out, in] bilinear weights of PyTorch's interpolate(align_corners=True)."""
  mat = np.zeros((out_size, in_size), np.float32)
  scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
  for o in range(out_size):
    src = o * scale
    i0 = min(int(math.floor(src)), in_size - 1)
    i1 = min(i0 + 1, in_size - 1)
    frac = src - i0
    mat[o, i0] += 1.0 - frac
    mat[o, i1] += frac
  return mat


def resize_bilinear_align_corners(x: jax.Array, height: int,
                                  width: int) -> jax.Array:
  """Resizes NHWC like ``F.interpolate(..., 'bilinear', align_corners=True)``.

  Two constant matrix products, so it exports as plain dots (no gather).
  Example: ``resize_bilinear_align_corners(jnp.ones((1, 7, 7, 8)), 8, 8)``.
  """
  rows = jnp.asarray(_align_corners_matrix(height, x.shape[1]), x.dtype)
  cols = jnp.asarray(_align_corners_matrix(width, x.shape[2]), x.dtype)
  x = jnp.einsum("oh,bhwc->bowc", rows, x)
  return jnp.einsum("ow,bhwc->bhoc", cols, x)


def unfold_patches(x: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, P, N, C], P = patch_size**2 pixels, N patches (row-major).

  Same order as timm/ml-cvnets: P indexes (row, col) inside a patch and N indexes
  the patch grid, so token [b, p, n] is pixel p of patch n.
  """
  b, h, w, c = x.shape
  nh, nw = h // patch_size, w // patch_size
  x = x.reshape(b, nh, patch_size, nw, patch_size, c)
  x = x.transpose(0, 2, 4, 1, 3, 5)
  return x.reshape(b, patch_size * patch_size, nh * nw, c)


def fold_patches(x: jax.Array, patch_size: int, height: int,
                 width: int) -> jax.Array:
  """Inverse of :func:`unfold_patches`: [B, P, N, C] -> [B, H, W, C]."""
  b, _, _, c = x.shape
  nh, nw = height // patch_size, width // patch_size
  x = x.reshape(b, patch_size, patch_size, nh, nw, c)
  x = x.transpose(0, 3, 1, 4, 2, 5)
  return x.reshape(b, height, width, c)


class MobileViTv2Block(nn.Module):
  """The MobileViTv2 block (timm MobileVitV2Block).

  Depthwise 3x3 (BN, SiLU) -> 1x1 conv C->d (no bias) -> unfold into [B, P, N, d]
  -> ``depth`` x :class:`LinearTransformerBlock` -> GroupNorm(1) -> fold -> 1x1
  conv d->C + BN. No fusion conv and no block-level skip. An input whose size is
  not a multiple of the patch size is first resized up to one (as in timm), and the
  output keeps that size.

  Attributes:
    features: C, input and output channels.
    attn_features: d, the transformer width.
    depth: number of transformer layers L.
    patch_size: patch side (2: P = 4 pixels per patch).
    mlp_ratio: FFN hidden width over d.
    drop_path_rate: stochastic depth of every transformer layer.
    ffns: per transformer layer, an FFN factory or None for ``DEFAULT_FFN`` (see
      :class:`LinearTransformerBlock`); None means the default everywhere.
    return_ffn_aux: return ``(x, ffn_aux)`` with the FFN intermediates of layer
      i as ``"layer{i}/<key>"`` instead of ``x``.
    dtype: compute dtype.
  """

  features: int
  attn_features: int
  depth: int
  patch_size: int = _PATCH_SIZE
  mlp_ratio: float = 2.0
  drop_path_rate: float = 0.0
  ffns: Optional[Sequence[Optional[FfnFactory]]] = None
  return_ffn_aux: bool = False
  dtype: Dtype = jnp.float32
  # Per transformer layer, the FFN hidden width kept by structured pruning
  # (None entries / None = int(d * mlp_ratio)).
  mlp_hiddens: Optional[Sequence[Optional[int]]] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> Any:
    p = self.patch_size
    h, w = -(-x.shape[1] // p) * p, -(-x.shape[2] // p) * p
    if (h, w) != x.shape[1:3]:
      x = resize_bilinear_align_corners(x, h, w)
    x = ConvNormAct(self.features, 3, groups=self.features, dtype=self.dtype,
                    name="conv_kxk")(x, train)
    x = nn.Conv(self.attn_features, (1, 1), use_bias=False, dtype=self.dtype,
                conv_general_dilated=layers.conv_general_dilated,
                kernel_init=_conv_init(), name="conv_1x1")(x)
    x = unfold_patches(x, p)
    ffns = self.ffns if self.ffns is not None else (None,) * self.depth
    if len(ffns) != self.depth:
      raise ValueError(f"ffns has {len(ffns)} entries; expected one per "
                       f"transformer layer ({self.depth}).")
    ffn_aux = {}
    for i, ffn in enumerate(ffns):
      x, layer_aux = LinearTransformerBlock(
          mlp_ratio=self.mlp_ratio, drop_path_rate=self.drop_path_rate,
          ffn=ffn or DEFAULT_FFN, return_ffn_aux=True, dtype=self.dtype,
          mlp_hidden=self.mlp_hiddens[i] if self.mlp_hiddens else None,
          name=f"transformer_{i}")(x, train)
      ffn_aux.update({f"layer{i}/{k}": v for k, v in layer_aux.items()})
    x = nn.GroupNorm(num_groups=1, epsilon=1e-5, use_fast_variance=False,
                     dtype=self.dtype, name="norm")(x)
    x = fold_patches(x, p, h, w)
    x = ConvNormAct(self.features, 1, apply_act=False, dtype=self.dtype,
                    name="conv_proj")(x, train)
    return (x, ffn_aux) if self.return_ffn_aux else x


def mobilevitv2_channels(width_multiplier: float) -> tuple[int, tuple[int, ...],
                                                           tuple[int, ...]]:
  """(stem, per-layer output, per-transformer d) channels of a width multiplier.

  As timm: stem int(32a); layer i make_divisible(int(c_i * a)); attention width
  make_divisible(C / 2). Example: ``mobilevitv2_channels(0.5)[2] == (64, 96, 128)``.
  """
  a = width_multiplier
  stem = int(32 * a)
  outs = tuple(layers.make_divisible(int(c * a)) for c in _BASE_CHANNELS)
  attn = tuple(layers.make_divisible(c * 0.5) for c in outs[2:])
  return stem, outs, attn


class MobileViTv2(nn.Module):
  """MobileViTv2 classifier (timm ``mobilevitv2_*``); returns ``(logits, aux)``.

  aux: "stem", "stage1".."stage5" (outputs of the five layers, NHWC) and
  "pre_logits" (globally pooled features, before dropout and the head); with FFNs
  that return intermediates (``ffn_for_layer``), also
  ``"stage{s}_layer{i}/<key>"`` for each of them.

  Attributes:
    width_multiplier: a in {0.5, 0.75, ..., 2.0}; scales every width.
    num_classes: classifier outputs; 0 returns the pooled features as logits.
    drop_path_rate: maximum stochastic-depth rate (linear over the nine blocks).
    dropout_rate: dropout before the classifier.
    ffn_for_layer: optional ``fn(stage, layer) -> FfnFactory | None`` choosing the
      FFN of transformer layer ``layer`` (0-based) of layer ``stage`` (3, 4 or 5,
      as in the aux names); None keeps the default ConvMlp. This is the hook for
      mixture-of-experts variants.
    dtype: compute dtype (parameters stay float32).

  Example::

      model = MobileViTv2(width_multiplier=1.0, num_classes=10)
      variables = model.init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
      logits, aux = model.apply(variables, images)  # images in [0, 1]
  """

  width_multiplier: float = 1.0
  num_classes: int = 1000
  drop_path_rate: float = 0.0
  dropout_rate: float = 0.0
  ffn_for_layer: Optional[Callable[[int, int], Optional[FfnFactory]]] = None
  dtype: Dtype = jnp.float32
  # Units kept by structured pruning (vit_edge.compress), by module path:
  # "stages_1_0" -> inverted-residual hidden channels, "stages_2_1/transformer_0/mlp"
  # -> FFN hidden units. None (default) / unlisted = the size's widths.
  unit_widths: Optional[Mapping[str, int]] = None

  def layer_ffn(self, stage: int, layer: int) -> Optional[FfnFactory]:
    """The FFN factory of one transformer layer (None: the default ConvMlp).

    Subclasses with other FFNs (`vit_edge.models.mobilevitv2_moe`) override it.
    """
    if self.ffn_for_layer is None:
      return None
    return self.ffn_for_layer(stage, layer)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    layers.check_divisible_resolution(x, _STRIDE, "mobilevitv2")
    x = x.astype(self.dtype)
    stem_ch, outs, attn = mobilevitv2_channels(self.width_multiplier)
    # Blocks per layer: IR; IR, IR; then IR + MobileViTv2 block for layers 3-5.
    dpr = layers.drop_path_rates(self.drop_path_rate, (1, 2, 2, 2, 2))
    aux = {}
    x = ConvNormAct(stem_ch, 3, stride=2, dtype=self.dtype, name="stem")(x, train)
    aux["stem"] = x
    for s in range(5):
      widths = self.unit_widths or {}
      x = InvertedResidual(outs[s], stride=1 if s == 0 else 2,
                           drop_path_rate=dpr[s][0], dtype=self.dtype,
                           hidden_features=widths.get(f"stages_{s}_0"),
                           name=f"stages_{s}_0")(x, train)
      if s == 1:
        x = InvertedResidual(outs[s], drop_path_rate=dpr[s][1], dtype=self.dtype,
                             hidden_features=widths.get(f"stages_{s}_1"),
                             name=f"stages_{s}_1")(x, train)
      elif s >= 2:
        depth = _TRANSFORMER_DEPTHS[s - 2]
        ffns = tuple(self.layer_ffn(s + 1, i) for i in range(depth))
        x, ffn_aux = MobileViTv2Block(
            outs[s], attn[s - 2], depth, drop_path_rate=dpr[s][1], ffns=ffns,
            return_ffn_aux=True, dtype=self.dtype, name=f"stages_{s}_1",
            mlp_hiddens=tuple(widths.get(f"stages_{s}_1/transformer_{i}/mlp")
                              for i in range(depth)))(x, train)
        aux.update({f"stage{s + 1}_{k}": v for k, v in ffn_aux.items()})
      aux[f"stage{s + 1}"] = x
    x = jnp.mean(x, axis=(1, 2))
    aux["pre_logits"] = x
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return layers.classifier_head(x, self.num_classes, self.dtype), aux


# ----------------------------------------------------------------------------
# Weight conversion from timm.

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "mean": "running_mean", "var": "running_var"}


def torch_name(path: Sequence[str]) -> str:
  """timm state_dict key of a Flax variable path (collection excluded).

  Example: ``torch_name(("stages_2_1", "transformer_0", "attn", "qkv_proj",
  "kernel")) == "stages.2.1.transformer.0.attn.qkv_proj.weight"``.
  """
  parts = []
  for p in path[:-1]:
    if p == "head":
      parts.append("head.fc")
    else:
      # stages_2_1 -> stages.2.1, transformer_0 -> transformer.0 (Sequential
      # indices); other names (conv_1x1, conv_proj, ...) are timm's verbatim.
      parts.append(p.replace("_", ".") if re.match(r"^(stages|transformer)_\d", p)
                   else p)
  return ".".join(parts + [_LEAF_TO_TORCH[path[-1]]])


def _from_torch(path: Sequence[str], value: np.ndarray,
                target_shape: tuple[int, ...]) -> np.ndarray:
  """Re-lays a torch tensor out for Flax: OIHW -> HWIO, (O, I[, 1, 1]) -> (I, O)."""
  del path
  if len(target_shape) == 4:
    return value.transpose(2, 3, 1, 0)
  if len(target_shape) == 2:
    return value.reshape(value.shape[0], -1).T
  return value


def convert_torch_state_dict(state_dict: Mapping[str, Any],
                             model: MobileViTv2) -> dict[str, Any]:
  """Maps a timm ``mobilevitv2_*`` state_dict (name -> numpy) to Flax variables.

  Example::

      sd = {k: v.numpy() for k, v in timm_model.state_dict().items()}
      variables = convert_torch_state_dict(sd, create_model("mobilevitv2_050"))

  Raises:
    convert.StateDictMismatchError: naming every missing, unexpected (not used by
      the model) and mis-shaped key (a KeyError and a ValueError).
  """
  return convert.convert_state_dict(
      state_dict, convert.variable_shapes(model, 64),
      torch_name=lambda path: torch_name(path[1:]), to_flax=_from_torch,
      family="MobileViTv2", hint="Check the width (mobilevitv2_050 ... _200) and "
      "num_classes.")


# ----------------------------------------------------------------------------
# Registered sizes.

def _register(top1: float):
  return registry.register_model(
      family="mobilevitv2", image_size=256, stride=_STRIDE, top1=top1,
      reference="apple/ml-cvnets; timm mobilevitv2_*",
      mean=registry.UNIT_MEAN, std=registry.UNIT_STD)


@_register(top1=70.18)
def mobilevitv2_050(**kwargs) -> MobileViTv2:
  """MobileViTv2-0.5 (1.37M params at 1000 classes)."""
  return registry.build(MobileViTv2, dict(width_multiplier=0.5), kwargs)


@_register(top1=75.56)
def mobilevitv2_075(**kwargs) -> MobileViTv2:
  """MobileViTv2-0.75 (2.87M params)."""
  return registry.build(MobileViTv2, dict(width_multiplier=0.75), kwargs)


@_register(top1=78.09)
def mobilevitv2_100(**kwargs) -> MobileViTv2:
  """MobileViTv2-1.0 (4.90M params)."""
  return registry.build(MobileViTv2, dict(width_multiplier=1.0), kwargs)


@_register(top1=79.65)
def mobilevitv2_125(**kwargs) -> MobileViTv2:
  """MobileViTv2-1.25 (7.48M params)."""
  return registry.build(MobileViTv2, dict(width_multiplier=1.25), kwargs)


@_register(top1=80.38)
def mobilevitv2_150(**kwargs) -> MobileViTv2:
  """MobileViTv2-1.5 (10.59M params)."""
  return registry.build(MobileViTv2, dict(width_multiplier=1.5), kwargs)


@_register(top1=80.84)
def mobilevitv2_175(**kwargs) -> MobileViTv2:
  """MobileViTv2-1.75 (14.25M params)."""
  return registry.build(MobileViTv2, dict(width_multiplier=1.75), kwargs)


@_register(top1=81.17)
def mobilevitv2_200(**kwargs) -> MobileViTv2:
  """MobileViTv2-2.0 (18.45M params)."""
  return registry.build(MobileViTv2, dict(width_multiplier=2.0), kwargs)
