"""EdgeViT (Pan et al., ECCV 2022, arXiv 2205.03436) in Flax linen.

Reference: the official code, saic-fi/edgevit ``src/edgevit.py`` (``EdgeVit``,
``LGLBlock``, ``LocalAgg``, ``SelfAttn``, ``GlobalSparseAttn``, ``PatchEmbed``).

Faithful to the reference:

* Layer order, every norm and its epsilon (patch-embed LayerNorm 1e-5, the two
  SelfAttn LayerNorms 1e-6, the LayerNorm after the local propagation 1e-5,
  BatchNorm 1e-5 in LocalAgg and on the last feature map), paddings (3x3 CPE pad 1,
  5x5 depthwise "attn" conv pad 2), biases (every conv and Linear has one; qkv too).
* The delegate sampler ``AvgPool2d(kernel=1, stride=r)`` is exactly a strided slice
  ``x[:, ::r, ::r]``; the local propagation ``ConvTranspose2d(C, C, r, stride=r,
  groups=C)`` has kernel == stride, so its output windows never overlap and it is
  an exact per-channel broadcast multiply followed by a reshape (no conv_transpose
  in the exported graph).
* Drop-path rates rise linearly over all blocks (``torch.linspace``); both
  sub-blocks of one block share a rate. ``dropout_rate`` is the reference's
  ``drop_rate``: the dropout after the first patch embedding (``pos_drop``), inside
  both MLPs and after the attention projection. The reference has no dropout
  right before the head, so neither does this port.
* Initialisation: Linear trunc-normal(0.02) with zero bias, LayerNorm 1/0 (the
  reference's ``_init_weights``); convolutions keep PyTorch's default
  Kaiming-uniform(a=sqrt(5)) weight and uniform bias, as in the reference, which
  never re-initialises them.
* Parameter names follow the reference attributes (``patch_embed1.proj``,
  ``blocks3_1.SelfAttn.attn.LocalProp``, ...), one Flax parameter per torch tensor;
  see :func:`convert_torch_state_dict`.

Differences: the layout is NHWC; the reference asserts the exact training
resolution in ``PatchEmbed`` while this port (which has no position embedding)
accepts any resolution divisible by the total stride 32. Attention logits are
soft-maxed in float32 when the compute dtype is lower, for stability.
No pretrained weights were released by the authors.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_edge.models import convert
from vit_edge.models import layers
from vit_edge.models import registry

Dtype = Any

# Patch-embedding kernel = stride before each of the four stages.
PATCH_SIZES = (4, 2, 2, 2)
TOTAL_STRIDE = 32

torch_conv_kernel_init = layers.torch_conv_kernel_init
torch_conv_bias_init = layers.torch_conv_bias_init


def _conv(features: int, kernel: int, in_features: int, dtype: Dtype, name: str,
          groups: int = 1, stride: int = 1, padding: int = 0) -> nn.Conv:
  """A torch-initialised Conv2d with bias (explicit symmetric padding)."""
  fan_in = in_features // groups * kernel * kernel
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)),
                 feature_group_count=groups, dtype=dtype,
                 conv_general_dilated=layers.conv_general_dilated,
                 kernel_init=torch_conv_kernel_init,
                 bias_init=torch_conv_bias_init(fan_in), name=name)


def _layer_norm(epsilon: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  """LayerNorm over channels with the reference's epsilon."""
  # Two-pass variance, as torch computes it (the fast E[x^2]-E[x]^2 form drifts).
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, use_fast_variance=False, name=name)


class DepthwiseConvTransposeNoOverlap(nn.Module):
  """Depthwise ``ConvTranspose2d(C, C, r, stride=r, groups=C)`` with bias, NHWC.

  Because kernel == stride the output windows do not overlap: output pixel
  ``(i * r + a, j * r + b)`` of channel c is ``x[i, j, c] * kernel[a, b, 0, c] +
  bias[c]``. Written as a broadcast multiply plus reshape so that TFLite export
  needs no transposed convolution. Kernel layout (r, r, 1, C) is torch's
  (C, 1, r, r) transposed like any conv kernel (OIHW -> HWIO).

  Example: ``DepthwiseConvTransposeNoOverlap(2)(jnp.ones((1, 7, 7, 8)))`` has shape
  (1, 14, 14, 8).
  """

  ratio: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    r = self.ratio
    # torch computes fan_in of a ConvTranspose2d weight from size(1) * r * r = r * r.
    kernel = self.param("kernel", torch_conv_kernel_init, (r, r, 1, c), jnp.float32)
    bias = self.param("bias", torch_conv_bias_init(r * r), (c,), jnp.float32)
    kernel = kernel.astype(self.dtype)[:, :, 0, :]  # (r, r, C)
    y = x[:, :, None, :, None, :] * kernel[None, None, :, None, :, :]
    y = y.reshape(b, h * r, w * r, c)
    return y + bias.astype(self.dtype)


class PatchEmbed(nn.Module):
  """Non-overlapping patch conv (kernel = stride, bias) then LayerNorm(eps 1e-5)."""

  embed_dim: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    x = _conv(self.embed_dim, p, x.shape[-1], self.dtype, "proj", stride=p)(x)
    return _layer_norm(1e-5, self.dtype, "norm")(x)


class CMlp(nn.Module):
  """1x1 conv d -> hidden, GELU, dropout, 1x1 conv hidden -> d, dropout."""

  hidden_features: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    dim = x.shape[-1]
    x = _conv(self.hidden_features, 1, dim, self.dtype, "fc1")(x)
    x = layers.gelu(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = _conv(dim, 1, self.hidden_features, self.dtype, "fc2")(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class LocalAgg(nn.Module):
  """Local aggregation: CPE, then BN -> 1x1 -> DW5x5 -> 1x1, then BN -> ConvMLP."""

  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  # ConvMLP hidden width; None = dim * mlp_ratio (structured pruning sets it).
  mlp_hidden: Optional[int] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    x = x + _conv(dim, 3, dim, self.dtype, "pos_embed", groups=dim, padding=1)(x)
    y = layers.batch_norm(train, self.dtype, name="norm1")(x)
    y = _conv(dim, 1, dim, self.dtype, "conv1")(y)
    y = _conv(dim, 5, dim, self.dtype, "attn", groups=dim, padding=2)(y)
    y = _conv(dim, 1, dim, self.dtype, "conv2")(y)
    x = x + layers.DropPath(self.drop_path)(y, deterministic=not train)
    y = layers.batch_norm(train, self.dtype, name="norm2")(x)
    y = CMlp(self.mlp_hidden or int(dim * self.mlp_ratio), self.dropout_rate,
             self.dtype, name="mlp")(
        y, deterministic=not train)
    return x + layers.DropPath(self.drop_path)(y, deterministic=not train)


class GlobalSparseAttn(nn.Module):
  """Attention among delegate tokens (one per r x r window), then local propagation.

  With ``sr_ratio == 1`` this is plain multi-head self-attention over all tokens.
  Input and output are NHWC feature maps.
  """

  num_heads: int
  sr_ratio: int = 1
  qkv_bias: bool = True
  attn_dropout_rate: float = 0.0
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  # Per-head width; None = c // num_heads. Structured pruning removes whole heads
  # (only where sr_ratio == 1: LocalProp's LayerNorm would mix the removed channels
  # into the kept ones), so the inner width num_heads * head_dim falls below c.
  head_dim: Optional[int] = None

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    b, h, w, c = x.shape
    r = self.sr_ratio
    head_dim = self.head_dim or c // self.num_heads
    inner = self.num_heads * head_dim
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=layers.trunc_normal,
                              bias_init=nn.initializers.zeros,
                              dot_general=layers.dense_dot_general)
    if r > 1:
      # AvgPool2d(kernel_size=1, stride=r): keep the top-left token of each window.
      x = x[:, ::r, ::r, :]
    hs, ws = x.shape[1], x.shape[2]
    tokens = x.reshape(b, hs * ws, c)
    qkv = dense(3 * inner, use_bias=self.qkv_bias, name="qkv")(tokens)
    qkv = qkv.reshape(b, hs * ws, 3, self.num_heads, head_dim)
    if (layers.fused_attention_applies(qkv.dtype)
        and (deterministic or self.attn_dropout_rate == 0.0)):
      out = layers.fused_attention(qkv, head_dim ** -0.5).reshape(b, hs, ws, inner)
    else:
      qkv = qkv.transpose(2, 0, 3, 1, 4)
      q, k, v = qkv[0], qkv[1], qkv[2]
      attn = (q @ k.swapaxes(-2, -1)) * (head_dim ** -0.5)
      attn = jax.nn.softmax(attn.astype(jnp.promote_types(attn.dtype, jnp.float32)),
                            axis=-1).astype(self.dtype)
      attn = nn.Dropout(self.attn_dropout_rate)(attn, deterministic=deterministic)
      out = (attn @ v).transpose(0, 2, 1, 3).reshape(b, hs, ws, inner)
    if r > 1:
      out = DepthwiseConvTransposeNoOverlap(r, self.dtype, name="LocalProp")(out)
      out = _layer_norm(1e-5, self.dtype, "norm")(out)
    out = dense(c, name="proj")(out)
    return nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)


class SelfAttn(nn.Module):
  """Second CPE, then pre-norm global sparse attention and pre-norm MLP (LN eps 1e-6)."""

  num_heads: int
  mlp_ratio: float = 4.0
  sr_ratio: int = 1
  qkv_bias: bool = True
  drop_path: float = 0.0
  dropout_rate: float = 0.0
  attn_dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  # Structured pruning's widths (None = the defaults): see GlobalSparseAttn.
  head_dim: Optional[int] = None
  mlp_hidden: Optional[int] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    x = x + _conv(dim, 3, dim, self.dtype, "pos_embed", groups=dim, padding=1)(x)
    y = _layer_norm(1e-6, self.dtype, "norm1")(x)
    y = GlobalSparseAttn(self.num_heads, self.sr_ratio, self.qkv_bias,
                         self.attn_dropout_rate, self.dropout_rate, self.dtype,
                         head_dim=self.head_dim, name="attn")(
                             y, deterministic=not train)
    x = x + layers.DropPath(self.drop_path)(y, deterministic=not train)
    y = _layer_norm(1e-6, self.dtype, "norm2")(x)
    y = layers.Mlp(self.mlp_hidden or int(dim * self.mlp_ratio),
                   dropout_rate=self.dropout_rate,
                   dtype=self.dtype, name="mlp")(y, deterministic=not train)
    return x + layers.DropPath(self.drop_path)(y, deterministic=not train)


class LGLBlock(nn.Module):
  """Local-Global-Local block: LocalAgg (only when sr_ratio > 1), then SelfAttn."""

  num_heads: int
  mlp_ratio: float = 4.0
  sr_ratio: int = 1
  qkv_bias: bool = True
  drop_path: float = 0.0
  dropout_rate: float = 0.0
  attn_dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  # Structured pruning's widths (None = the defaults).
  head_dim: Optional[int] = None
  local_mlp_hidden: Optional[int] = None
  mlp_hidden: Optional[int] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.sr_ratio > 1:
      x = LocalAgg(self.mlp_ratio, self.drop_path, self.dropout_rate, self.dtype,
                   mlp_hidden=self.local_mlp_hidden, name="LocalAgg")(x, train)
    return SelfAttn(self.num_heads, self.mlp_ratio, self.sr_ratio, self.qkv_bias,
                    self.drop_path, self.dropout_rate, self.attn_dropout_rate,
                    self.dtype, head_dim=self.head_dim, mlp_hidden=self.mlp_hidden,
                    name="SelfAttn")(x, train)


class EdgeViT(nn.Module):
  """EdgeViT classifier: four (patch embed -> LGL blocks) stages, BN, GAP, Linear.

  Example::

      model = EdgeViT(depths=(1, 1, 3, 2), embed_dims=(36, 72, 144, 288), head_dim=36)
      variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
      logits, aux = model.apply(variables, images)  # aux["stage4"]: (1, 7, 7, 288)

  Attributes:
    depths: LGL blocks per stage.
    embed_dims: channels per stage.
    head_dim: attention head width; heads per stage = dim // head_dim.
    mlp_ratio: hidden width of both MLPs relative to the stage width.
    sr_ratios: delegate sample ratio r per stage (1 = plain global attention and
      no LocalAgg).
    qkv_bias: bias on the qkv projection.
    num_classes: classifier size; 0 keeps no head (logits are the pre-logits).
    drop_path_rate: stochastic-depth rate of the last block (linear from 0).
    dropout_rate: the reference's drop_rate (after the stem, in MLPs, after proj).
    attn_dropout_rate: dropout on attention probabilities (reference attn_drop_rate).
    dtype: compute dtype; parameters stay float32.
    unit_widths: units kept per block after structured pruning (vit_edge.compress),
      keyed by module path: ``"blocks4_0/SelfAttn/attn"`` -> heads (stages with
      sr_ratio 1 only; each head keeps head_dim), ``"blocks2_0/SelfAttn/mlp"`` and
      ``"blocks2_0/LocalAgg/mlp"`` -> MLP hidden units. None (default) = unpruned.
  """

  depths: Sequence[int] = (1, 1, 3, 2)
  embed_dims: Sequence[int] = (36, 72, 144, 288)
  head_dim: int = 36
  mlp_ratio: float = 4.0
  sr_ratios: Sequence[int] = (4, 2, 2, 1)
  qkv_bias: bool = True
  num_classes: int = 1000
  drop_path_rate: float = 0.0
  dropout_rate: float = 0.0
  attn_dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  unit_widths: Optional[Mapping[str, int]] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    layers.check_divisible_resolution(x, TOTAL_STRIDE, "EdgeViT")
    widths = self.unit_widths or {}
    x = x.astype(self.dtype)
    dpr = layers.drop_path_rates(self.drop_path_rate, self.depths)
    aux = {}
    for s, (depth, dim) in enumerate(zip(self.depths, self.embed_dims)):
      x = PatchEmbed(dim, PATCH_SIZES[s], self.dtype, name=f"patch_embed{s + 1}")(x)
      if s == 0:
        aux["stem"] = x
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)  # pos_drop
      for i in range(depth):
        block = f"blocks{s + 1}_{i}"
        heads = dim // self.head_dim
        x = LGLBlock(widths.get(f"{block}/SelfAttn/attn", heads),
                     self.mlp_ratio, self.sr_ratios[s], self.qkv_bias, dpr[s][i],
                     self.dropout_rate, self.attn_dropout_rate, self.dtype,
                     head_dim=dim // heads,
                     local_mlp_hidden=widths.get(f"{block}/LocalAgg/mlp"),
                     mlp_hidden=widths.get(f"{block}/SelfAttn/mlp"),
                     name=block)(x, train)
      aux[f"stage{s + 1}"] = x
    x = layers.batch_norm(train, self.dtype, name="norm")(x)
    x = jnp.mean(x, axis=(1, 2))
    aux["pre_logits"] = x
    logits = layers.classifier_head(x, self.num_classes, self.dtype, name="head")
    return logits, aux


def convert_torch_state_dict(state_dict: Mapping[str, Any], model: EdgeViT) -> dict:
  """Maps an official-code EdgeViT state_dict (name -> array) to Flax variables.

  Torch ``blocksN.i.`` becomes Flax ``blocksN_i``; Linear weights are transposed;
  conv and transposed-conv weights go OIHW -> HWIO; norm ``weight`` becomes
  ``scale``; BatchNorm running stats go to 'batch_stats' (``num_batches_tracked``
  is dropped). Every tensor is checked against ``model``'s expected shapes.

  Example::

      sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
      variables = convert_torch_state_dict(sd, edgevit_xxs())

  Args:
    state_dict: reference parameter names -> numpy-convertible arrays.
    model: the Flax module the weights are for (fixes the expected tree).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` as nested dicts of numpy arrays.

  Raises:
    convert.StateDictMismatchError: naming every missing, unexpected and
      mis-shaped key (a ValueError and a KeyError).
  """
  return convert.convert_state_dict(
      state_dict, convert.variable_shapes(model, TOTAL_STRIDE, train=False),
      torch_name=torch_name, to_flax=convert.torch_layout_to_flax, family="EdgeViT",
      hint="Check the model size (depths/embed_dims) and num_classes.")


_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "mean": "running_mean",
               "var": "running_var"}


def torch_name(path: Sequence[str]) -> str:
  """The official code's state_dict key of a Flax variable path (collection first).

  Example: ``torch_name(("params", "blocks3_2", "SelfAttn", "attn", "qkv",
  "kernel")) == "blocks3.2.SelfAttn.attn.qkv.weight"``.
  """
  _, *modules, leaf = path
  # Flax blocksN_i is the official nn.Sequential entry blocksN.i.
  modules = [m.replace("_", ".") if re.fullmatch(r"blocks\d+_\d+", m) else m
             for m in modules]
  return ".".join(modules + [_TORCH_LEAF.get(leaf, leaf)])


_REGISTRY_INFO = dict(family="edgevit", image_size=224, stride=TOTAL_STRIDE,
                      mean=registry.IMAGENET_MEAN, std=registry.IMAGENET_STD,
                      reference="saic-fi/edgevit src/edgevit.py")


@registry.register_model(top1=74.4, **_REGISTRY_INFO)
def edgevit_xxs(**kwargs) -> EdgeViT:
  """EdgeViT-XXS: 4.07M params, 0.55 GMACs at 224, 74.4% top-1."""
  return registry.build(
      EdgeViT, dict(depths=(1, 1, 3, 2), embed_dims=(36, 72, 144, 288), head_dim=36),
      kwargs)


@registry.register_model(top1=77.5, **_REGISTRY_INFO)
def edgevit_xs(**kwargs) -> EdgeViT:
  """EdgeViT-XS: 6.77M params, 1.13 GMACs at 224, 77.5% top-1."""
  return registry.build(
      EdgeViT, dict(depths=(1, 1, 3, 1), embed_dims=(48, 96, 240, 384), head_dim=48),
      kwargs)


@registry.register_model(top1=81.0, **_REGISTRY_INFO)
def edgevit_s(**kwargs) -> EdgeViT:
  """EdgeViT-S: 13.11M params, 1.91 GMACs at 224, 81.0% top-1."""
  return registry.build(
      EdgeViT, dict(depths=(1, 2, 5, 3), embed_dims=(48, 96, 240, 384), head_dim=48),
      kwargs)
