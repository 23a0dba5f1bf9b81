"""TFormer (Lu et al., IEEE TPDS 2023, arXiv 2302.07734): a RECONSTRUCTION.

TFormer is a transmission-friendly ViT for IoT devices: its token mixer ("hybrid layer")
is made of non-learnable pooling modules plus one pointwise convolution, and its
feed-forward network ("PCS-FFN", partially connected with channel shuffle) is built from
group convolutions. **The authors released no code and the paper's architecture table is
not available to us**, so this module is a documented reconstruction, not a port. It is
built to reproduce all six published complexity figures exactly or within rounding:

=========  ======================  ================  ===============  =========
model      depths                  params (exact)    MACs at 224      paper
=========  ======================  ================  ===============  =========
tformer_s  2, 2, 6, 2              8,379,560         1.22G            8.4M 1.2G
tformer_m  4, 4, 12, 4             14,317,736        2.21G            14M 2.2G
tformer_l  6, 6, 18, 6             20,255,912        3.20G            20M 3.2G
=========  ======================  ================  ===============  =========

What the paper states (and this module follows):
  * the token mixer is a hybrid layer of non-learnable modules, max and average pooling
    at several scales ("multi-type and multi-scale features"), followed by one
    pointwise convolution;
  * the FFN is PCS-FFN: group convolutions with a channel shuffle;
  * three variants S / M / L with 8.4M / 14M / 20M params and 1.2G / 2.2G / 3.2G MACs,
    76.1 / 79.7 / 80.6 ImageNet-1K top-1, DeiT-style training.

What is assumed (chosen so that the figures above come out; change them here only):
  * Macro layout: MetaFormer / PoolFormer (Yu et al., CVPR 2022), four stages of widths
    64 / 128 / 320 / 512 at strides 4 / 8 / 16 / 32; depths S 2,2,6,2, M 4,4,12,4,
    L 6,6,18,6 (PoolFormer-S12 / S24 / S36 depths).
  * Stem: 7x7 conv, stride 4, padding 2, with bias, no norm. Downsampling between
    stages: 3x3 conv, stride 2, padding 1, with bias, no norm (PoolFormer's PatchEmbed).
  * Norms: GroupNorm with ONE group (normalises over H, W and C per sample, per-channel
    affine), epsilon 1e-5, as PoolFormer; pre-norm on both residual branches; a final
    GroupNorm(1 group) on the stage-4 map, then global average pooling, then the head.
  * Block: ``x = x + DropPath(ls1 * mixer(norm1(x)))``;
    ``x = x + DropPath(ls2 * ffn(norm2(x)))``; layer-scale vectors ``ls1``/``ls2`` are
    per-channel and initialised to 1e-5 (PoolFormer's ``layer_scale_init_value``).
  * Hybrid mixer branches: six parameter-free poolings, average and max at 3x3, 5x5 and
    7x7, stride 1, 'same' padding (k // 2). Average pooling excludes the padding from the
    divisor (PoolFormer's ``count_include_pad=False``); max pooling pads with -inf
    (PyTorch's ``MaxPool2d``).
  * Branch combination: the MEAN of the six pooled maps minus the input (PoolFormer's
    ``pool(x) - x``, which removes the identity already carried by the residual), then ONE
    d->d 1x1 conv with bias (``token_mixer.proj``):
    ``mixer(x) = proj(mean_b(pool_b(x)) - x)``.
  * PCS-FFN: 1x1 group conv d->4d with 2 groups (bias) -> channel shuffle with 2 groups
    (ShuffleNet order: channel ``g * (4d/2) + i`` moves to ``i * 2 + g``) -> exact GELU ->
    1x1 group conv 4d->d with 2 groups (bias). The shuffle sits between the first group
    conv and the GELU; GELU is elementwise, so placing the shuffle after it gives the
    same function.
  * Dropout: ``dropout_rate`` is applied to the pooled features before the head (timm
    MetaFormer's ``drop_rate``); the FFN has no dropout.
  * Initialisation: the head Linear trunc_normal(0.02), bias 0 (PoolFormer); convs use
    PyTorch's default kaiming-uniform(a=sqrt(5)) variance (uniform, var 1/(3 fan_in)),
    biases 0.

The published figures are printed to two significant digits; these counts match them at
that precision (14.32M prints as 14M, 1.22G as 1.2G), which is as close as they can be
checked. A 1% tolerance against the printed numbers holds for S params (0.2%) and L MACs
(0.2%) only: M params are 2.3% above "14M", L params 1.3% above "20M", S MACs 1.6%
above "1.2G", M MACs 0.3% above "2.2G".

The per-block parameter count is ``5 d^2 + 12 d`` (mixer proj d^2 + d, fc1 2d^2 + 4d,
fc2 2d^2 + d, two norms 4d, two layer scales 2d) and its MACs ``5 d^2 H W``; the poolings
add no parameters and no multiply-accumulates.

PyTorch layout (for :func:`convert_torch_state_dict`; what a PoolFormer-style PyTorch
TFormer has, ``network`` being PoolFormer's ModuleList with stages at even and
downsamplers at odd indices)::

  patch_embed.proj.{weight (64,3,7,7), bias}
  network.{0,2,4,6}.{j}.norm1.{weight, bias}                   GroupNorm(1, d)
  network.{0,2,4,6}.{j}.token_mixer.proj.{weight (d,d,1,1), bias}
  network.{0,2,4,6}.{j}.norm2.{weight, bias}
  network.{0,2,4,6}.{j}.mlp.fc1.{weight (4d,d/2,1,1), bias}     Conv2d(groups=2)
  network.{0,2,4,6}.{j}.mlp.fc2.{weight (d,2d,1,1), bias}       Conv2d(groups=2)
  network.{0,2,4,6}.{j}.layer_scale_1 (d,)   .layer_scale_2 (d,)
  network.{1,3,5}.proj.{weight (d_out,d_in,3,3), bias}
  norm.{weight, bias}                                           GroupNorm(1, 512)
  head.{weight (num_classes,512), bias}

The Flax tree mirrors it with ``network.K.J`` -> ``network_K_J``, ``network.K`` ->
``network_K``, conv weights OIHW -> HWIO, Linear weight -> its transpose, GroupNorm
``weight`` -> ``scale``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_edge.models import layers
from vit_edge.models import registry

Dtype = Any

STRIDE = 32
_REFERENCE = ("TFormer (Lu et al., IEEE TPDS 2023, arXiv 2302.07734); reconstruction, "
              "no public code")

# TFormer-as-PoolFormer keeps PyTorch's default conv init.
torch_conv_init = layers.torch_conv_kernel_init


def avg_pool_same(x: jax.Array, kernel: int) -> jax.Array:
  """Stride-1 'same' average pooling that leaves padding out of the divisor.

  Equals PyTorch ``AvgPool2d(k, 1, k // 2, count_include_pad=False)`` on NHWC input,
  e.g. ``avg_pool_same(x, 3)[:, 0, 0]`` is the mean of the 2x2 corner ``x[:, :2, :2]``.
  The divisor depends only on the (static) shape, so it is a numpy constant. The
  window sum is separable: a 1 x k sum, then a k x 1 sum of it (2k adds per pixel
  forward and backward where a k x k window takes k^2; the same sums up to float
  rounding). The export form is :func:`avg_pool_same_as_window_ratio`.
  """
  pad = kernel // 2
  zero = np.array(0, x.dtype)
  rows = jax.lax.reduce_window(x, zero, jax.lax.add, (1, 1, kernel, 1), (1, 1, 1, 1),
                               ((0, 0), (0, 0), (pad, pad), (0, 0)))
  summed = jax.lax.reduce_window(rows, zero, jax.lax.add, (1, kernel, 1, 1),
                                 (1, 1, 1, 1), ((0, 0), (pad, pad), (0, 0), (0, 0)))
  h, w = x.shape[1], x.shape[2]

  def counts(n):
    idx = np.arange(n)
    return np.minimum(idx + pad, n - 1) - np.maximum(idx - pad, 0) + 1

  inv = 1.0 / np.outer(counts(h), counts(w)).astype(np.float32)
  return summed * jnp.asarray(inv[None, :, :, None], dtype=x.dtype)


def avg_pool_same_as_window_ratio(x: jax.Array, kernel: int) -> jax.Array:
  """:func:`avg_pool_same` as ``window_sum(x) / window_sum(ones)`` (the export form).

  The same values; this is the pattern TFLite's converter lowers to one
  AVERAGE_POOL_2D op (SAME padding leaves the padding out of its divisor, like
  the count), where the multiply by constant inverse counts stays a window sum
  (a slow reference kernel that int8 rejects) plus a MUL.
  """
  pad = kernel // 2
  window, strides = (1, kernel, kernel, 1), (1, 1, 1, 1)
  padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  zero = np.array(0, x.dtype)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, zero, jax.lax.add, window, strides, padding)
  summed = jax.lax.reduce_window(x, zero, jax.lax.add, window, strides, padding)
  return summed / count


def max_pool_same(x: jax.Array, kernel: int, separable: bool = True) -> jax.Array:
  """Stride-1 'same' max pooling padded with -inf (PyTorch ``MaxPool2d(k, 1, k // 2)``).

  Example: ``max_pool_same(x, 5)`` has the shape of ``x``.

  ``separable``: a 1 x k max pool, then a k x 1 max pool of it: the same values
  exactly, with 2k taps per pixel forward and backward where one k x k pool takes
  k^2. The gradient goes to the same element as the k x k pool's, the window's
  first maximum in row-major order: the row pass sends it to the first maximal
  column within each row, the column pass to the first row holding the maximum.
  False gives one k x k pool, the export form (one TFLite MAX_POOL_2D).
  """
  pad = kernel // 2
  if not separable:
    return layers.max_pool(x, (kernel, kernel), (1, 1), ((pad, pad), (pad, pad)))
  rows = layers.max_pool(x, (1, kernel), (1, 1), ((0, 0), (pad, pad)))
  return layers.max_pool(rows, (kernel, 1), (1, 1), ((pad, pad), (0, 0)))


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """ShuffleNet channel shuffle on the last (channel) axis of an NHWC map.

  Channel ``g * (C / groups) + i`` moves to position ``i * groups + g``, as PyTorch's
  ``x.view(N, groups, C // groups, H, W).transpose(1, 2).reshape(N, C, H, W)``.
  :class:`PCSFFN` applies it, or with ``fold_shuffle`` folds it into its convs.
  """
  *lead, c = x.shape
  x = x.reshape(*lead, groups, c // groups)
  x = jnp.swapaxes(x, -1, -2)
  return x.reshape(*lead, c)


class HybridMixer(nn.Module):
  """TFormer's hybrid token mixer (reconstruction): pooling branches + one 1x1 conv.

  ``proj(mean_b(pool_b(x)) - x)`` over average and max pooling at each kernel size.

  Attributes:
    kernel_sizes: pooling window sizes; every size gets an average and a max branch.
    window_ratio: the export form: average pools as
      :func:`avg_pool_same_as_window_ratio` and max pools as one k x k pool, else
      both as separable 1 x k and k x 1 windows (faster in XLA).
    dtype: compute dtype.
  """

  kernel_sizes: Sequence[int] = (3, 5, 7)
  window_ratio: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    average = avg_pool_same_as_window_ratio if self.window_ratio else avg_pool_same
    branches = []
    for k in self.kernel_sizes:
      branches.append(average(x, k))
      branches.append(max_pool_same(x, k, separable=not self.window_ratio))
    pooled = sum(branches[1:], branches[0]) * (1.0 / len(branches))
    # Subtracting x as PoolFormer does: the residual already carries the identity.
    mixed = pooled - x
    return nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, kernel_init=torch_conv_init,
                   conv_general_dilated=layers.conv_general_dilated, name="proj")(mixed)


def shuffle_folding_orders(hidden: int, groups: int) -> tuple[np.ndarray, np.ndarray]:
  """Static channel orders that fold PCS-FFN's channel shuffle into its two convs.

  fc2's group ``h`` reads, after the shuffle, the chunk ``h`` (``m = hidden / groups^2``
  channels) of every fc1 group's output, interleaved. So fc1 can emit its outputs as
  blocks ``(h, g)`` = chunk ``h`` of group ``g`` (a ``groups^2``-group conv over the input
  tiled ``groups`` times: block ``h * groups + g`` reads input block ``g``), and fc2's
  kernel rows can be permuted within each group to read the blocks instead of the
  interleaving. The function and the parameters are unchanged; the transpose of the
  ``hidden``-channel map is gone (it cost as much as all int8 convs of a block at 224).

  Returns:
    ``fc1_out``: fc1 output channels in the folded order (index into fc1's kernel and
    bias output axis); ``fc2_rows``: fc2 kernel input rows in the folded order (the
    same for every group).

  Example: ``shuffle_folding_orders(8, 2)`` gives fc1_out ``[0 1 4 5 2 3 6 7]`` and
  fc2_rows ``[0 2 1 3]``.
  """
  if hidden % (groups * groups):
    raise ValueError(f"PCS-FFN hidden width {hidden} must be divisible by groups^2 = "
                     f"{groups * groups} for the channel shuffle to feed whole groups; "
                     "change mlp_ratio or groups.")
  per_group, m = hidden // groups, hidden // (groups * groups)
  fc1_out = np.array([g * per_group + h * m + t for h in range(groups)
                      for g in range(groups) for t in range(m)])
  fc2_rows = np.array([t * groups + g for g in range(groups) for t in range(m)])
  return fc1_out, fc2_rows


def _permuted(kernel_index=None, bias_index=None, kernel_axis: int = -1):
  """A map_variables function reading an nn.Conv's kernel/bias in a permuted order."""

  def permute(variables):
    params = dict(variables["params"])
    if kernel_index is not None:
      params["kernel"] = jnp.take(params["kernel"], kernel_index, axis=kernel_axis)
    if bias_index is not None:
      params["bias"] = params["bias"][bias_index]
    return {**variables, "params": params}

  return permute


def _pointwise(features: int, groups: int, dtype: Dtype, name: str,
               permute=None, initializing: bool = False) -> nn.Module:
  """A 1x1 group ``nn.Conv``; with `permute`, reading its parameters permuted.

  The parameters stay an ``nn.Conv``'s (``kernel`` [1, 1, in / groups, out],
  ``bias``) in their stored order either way, so layer interceptors, converters
  and checkpoints see one layout; only the folded form reads them permuted.
  """
  conv = nn.Conv
  if permute is not None:
    # At init the stored parameters are created unpermuted (same shapes).
    conv = nn.map_variables(nn.Conv, "params", trans_in_fn=permute,
                            init=initializing)
  # layers.conv_general_dilated: the same forward, matmul gradients.
  return conv(features, (1, 1), feature_group_count=groups, dtype=dtype,
              kernel_init=torch_conv_init, name=name,
              conv_general_dilated=layers.conv_general_dilated)


class PCSFFN(nn.Module):
  """Partially connected FFN with channel shuffle (reconstruction).

  1x1 group conv d -> ratio*d, channel shuffle, GELU, 1x1 group conv ratio*d -> d.
  With ``fold_shuffle`` the shuffle is folded into the convs
  (:func:`shuffle_folding_orders`): the same function from the same parameters
  (``fc1``/``fc2`` in ``nn.Conv`` layout either way), without the transpose, which is
  what a TFLite CPU graph wants; XLA on a CPU trains the unfolded form faster (a 4-group
  conv plus the kernel gathers cost ~1.4x a 56x56 block's fwd+bwd), so training keeps it.

  Attributes:
    mlp_ratio: hidden expansion.
    groups: group count of both 1x1 convs and of the shuffle.
    fold_shuffle: compute the folded form.
    dtype: compute dtype.
  """

  mlp_ratio: int = 4
  groups: int = 2
  fold_shuffle: bool = False
  dtype: Dtype = jnp.float32
  # Hidden width; None = dim * mlp_ratio. Structured pruning keeps it a multiple of
  # groups^2 (whole shuffle groups), so the shuffle still feeds whole fc2 groups.
  hidden_features: Optional[int] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim, g = x.shape[-1], self.groups
    hidden = self.hidden_features or dim * self.mlp_ratio
    # Without the shuffle each half of the output would only ever see its own half of
    # the input; the shuffle lets fc2's groups mix information from both fc1 groups.
    x = x.astype(self.dtype)
    if not self.fold_shuffle:
      h = channel_shuffle(_pointwise(hidden, g, self.dtype, "fc1")(x), g)
      return _pointwise(dim, g, self.dtype, "fc2")(layers.gelu(h))
    fc1_out, fc2_rows = shuffle_folding_orders(hidden, g)
    init = self.is_initializing()
    # fc1 as a g^2-group conv over the input tiled g times, emitting its outputs
    # in the folded order; fc2 reading its input rows in that order.
    fc1 = _pointwise(hidden, g * g, self.dtype, "fc1",
                     _permuted(fc1_out, fc1_out, kernel_axis=3), init)
    fc2 = _pointwise(dim, g, self.dtype, "fc2", _permuted(fc2_rows, kernel_axis=2),
                     init)
    h = fc1(jnp.concatenate([x] * g, axis=-1) if g > 1 else x)
    return fc2(layers.gelu(h))


def group_norm(dtype: Dtype, name: str) -> nn.GroupNorm:
  """GroupNorm with one group and PyTorch's epsilon (PoolFormer's ``GroupNorm``)."""
  # Two-pass variance as PyTorch computes it; E[x^2] - E[x]^2 loses precision.
  return nn.GroupNorm(num_groups=1, epsilon=1e-5, dtype=dtype,
                      use_fast_variance=False, name=name)


class TFormerBlock(nn.Module):
  """Pre-norm MetaFormer block: hybrid mixer and PCS-FFN, each layer-scaled.

  Attributes:
    drop_path: stochastic-depth rate of this block.
    mlp_ratio: PCS-FFN expansion.
    groups: PCS-FFN group count.
    layer_scale_init: initial value of both layer-scale vectors.
    fold_shuffle: the export form: see :class:`PCSFFN`, and average pools as
      window-sum ratios (:class:`HybridMixer`).
    dtype: compute dtype.
  """

  drop_path: float = 0.0
  mlp_ratio: int = 4
  groups: int = 2
  layer_scale_init: float = 1e-5
  fold_shuffle: bool = False
  dtype: Dtype = jnp.float32
  mlp_hidden: Optional[int] = None  # PCS-FFN hidden width (None = dim * mlp_ratio).

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    ls_init = nn.initializers.constant(self.layer_scale_init)
    ls1 = self.param("layer_scale_1", ls_init, (dim,), jnp.float32)
    ls2 = self.param("layer_scale_2", ls_init, (dim,), jnp.float32)
    drop = layers.DropPath(self.drop_path)

    y = group_norm(self.dtype, "norm1")(x)
    y = HybridMixer(window_ratio=self.fold_shuffle, dtype=self.dtype,
                    name="token_mixer")(y)
    x = x + drop(ls1.astype(y.dtype) * y, deterministic=not train)
    y = group_norm(self.dtype, "norm2")(x)
    y = PCSFFN(self.mlp_ratio, self.groups, self.fold_shuffle, dtype=self.dtype,
               hidden_features=self.mlp_hidden, name="mlp")(y)
    return x + drop(ls2.astype(y.dtype) * y, deterministic=not train)


class PatchEmbed(nn.Module):
  """A strided conv with bias and no norm (PoolFormer's ``PatchEmbed`` with ``proj``).

  Attributes:
    features: output channels.
    kernel: square kernel size.
    stride: conv stride.
    padding: symmetric zero padding.
    dtype: compute dtype.
  """

  features: int
  kernel: int
  stride: int
  padding: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = ((self.padding, self.padding),) * 2
    return nn.Conv(self.features, (self.kernel, self.kernel),
                   strides=(self.stride, self.stride), padding=pad, dtype=self.dtype,
                   kernel_init=torch_conv_init, name="proj")(x)


class TFormer(nn.Module):
  """TFormer image classifier (reconstruction; see the module docstring).

  Example::

      model = TFormer(depths=(2, 2, 6, 2), num_classes=10)   # = tformer_s(num_classes=10)
      variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
      logits, aux = model.apply(variables, images)  # aux["stage3"]: (N, 14, 14, 320)

  Attributes:
    depths: blocks per stage.
    widths: channels per stage.
    mlp_ratio: PCS-FFN expansion.
    ffn_groups: PCS-FFN group count.
    layer_scale_init: initial layer-scale value.
    num_classes: head size (0 = no head; logits are the pooled features).
    drop_path_rate: stochastic depth, rising linearly over all blocks to this value.
    dropout_rate: dropout on the pooled features before the head.
    export_friendly: compute the same function in the form that converts best to
      TFLite (PCS-FFN's shuffle folded into its convs, see :class:`PCSFFN`;
      average pools as window-sum ratios); :meth:`export_form` turns it on for
      the exporter, training leaves it off.
    dtype: compute dtype (parameters stay float32).
    unit_widths: PCS-FFN hidden widths kept by structured pruning
      (vit_edge.compress), keyed by module path (``"network_4_1/mlp"``), each a
      multiple of ffn_groups^2; blocks not listed keep dim * mlp_ratio. None
      (default) = unpruned.
  """

  depths: Sequence[int] = (2, 2, 6, 2)
  widths: Sequence[int] = (64, 128, 320, 512)
  mlp_ratio: int = 4
  ffn_groups: int = 2
  layer_scale_init: float = 1e-5
  num_classes: int = 1000
  drop_path_rate: float = 0.0
  dropout_rate: float = 0.0
  export_friendly: bool = False
  dtype: Dtype = jnp.float32
  unit_widths: Optional[Mapping[str, int]] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    layers.check_divisible_resolution(x, STRIDE, "tformer")
    aux = {}
    x = x.astype(self.dtype)
    x = PatchEmbed(self.widths[0], 7, 4, 2, dtype=self.dtype, name="patch_embed")(x)
    aux["stem"] = x

    rates = layers.drop_path_rates(self.drop_path_rate, self.depths)
    for i, (depth, width) in enumerate(zip(self.depths, self.widths)):
      if i > 0:
        # PoolFormer's network list: stage i sits at index 2i, its downsampler at 2i-1.
        x = PatchEmbed(width, 3, 2, 1, dtype=self.dtype, name=f"network_{2 * i - 1}")(x)
      for j in range(depth):
        block = f"network_{2 * i}_{j}"
        x = TFormerBlock(drop_path=rates[i][j], mlp_ratio=self.mlp_ratio,
                         groups=self.ffn_groups, layer_scale_init=self.layer_scale_init,
                         fold_shuffle=self.export_friendly, dtype=self.dtype,
                         mlp_hidden=(self.unit_widths or {}).get(f"{block}/mlp"),
                         name=block)(x, train)
      aux[f"stage{i + 1}"] = x

    x = group_norm(self.dtype, "norm")(x)
    x = jnp.mean(x, axis=(1, 2))
    aux["pre_logits"] = x
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return layers.classifier_head(x, self.num_classes, self.dtype), aux

  def export_form(self) -> "TFormer":
    """The same function and parameters in the form that converts best to TFLite.

    vit_edge.export traces this form of every model that has one
    (:class:`vit_edge.export.HasExportForm`).

    Example::

        model.export_form().apply(variables, x)  # == model.apply(variables, x)
    """
    return self.clone(export_friendly=True)


def _torch_name(path: Sequence[str]) -> str:
  """The PyTorch key of a Flax variable path (collection first; module docstring).

  Flax ``network_K_J`` / ``network_K`` are the PyTorch ``network.K.J`` /
  ``network.K`` Sequential entries; kernels and norm scales are ``weight``.
  Example: ``("params", "network_0_1", "norm1", "scale")`` -> ``network.0.1.norm1.weight``.
  """
  _, *modules, leaf = path
  modules = [m.replace("_", ".") if m.startswith("network_") else m for m in modules]
  return ".".join(modules + [{"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])


def convert_torch_state_dict(state_dict: Mapping[str, np.ndarray],
                             model: TFormer) -> dict[str, Any]:
  """Converts a PoolFormer-style PyTorch TFormer state_dict to Flax variables.

  There is no reference implementation: the expected names are the layout documented
  in the module docstring (``patch_embed.proj``, ``network.K.J.token_mixer.proj``,
  ``network.K.J.mlp.fc1``, ``network.K.J.layer_scale_1``, ``norm``, ``head``, ...).

  Example::

      sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
      variables = convert_torch_state_dict(sd, create_model("tformer_s"))

  Args:
    state_dict: parameter name -> numpy array (torch tensors converted with .numpy()).
    model: the TFormer module the weights are for (used to check every shape).

  Returns:
    ``{'params': ...}`` matching ``model.init``'s tree (TFormer has no batch stats).

  Raises:
    convert.StateDictMismatchError: naming every missing, unexpected and
      mis-shaped key (a KeyError and a ValueError).
  """
  # Imported here: the shared checker is this function's only use of it.
  from vit_edge.models import convert  # pylint: disable=g-import-not-at-top

  return convert.convert_state_dict(
      state_dict, convert.variable_shapes(model, STRIDE), torch_name=_torch_name,
      to_flax=convert.torch_layout_to_flax, family="TFormer",
      hint="Check the depths, widths and num_classes.")


def _factory(depths: Sequence[int], kwargs: dict[str, Any]) -> TFormer:
  kwargs.setdefault("depths", tuple(depths))  # Overridable, e.g. for tiny tests.
  return TFormer(**kwargs)


@registry.register_model(family="tformer", image_size=224, stride=STRIDE, top1=76.1,
                         reference=_REFERENCE, mean=registry.IMAGENET_MEAN,
                         std=registry.IMAGENET_STD)
def tformer_s(**kwargs) -> TFormer:
  """TFormer-S (reconstruction): depths 2,2,6,2; 8,379,560 params, 1.22 GMACs."""
  return _factory((2, 2, 6, 2), kwargs)


@registry.register_model(family="tformer", image_size=224, stride=STRIDE, top1=79.7,
                         reference=_REFERENCE, mean=registry.IMAGENET_MEAN,
                         std=registry.IMAGENET_STD)
def tformer_m(**kwargs) -> TFormer:
  """TFormer-M (reconstruction): depths 4,4,12,4; 14,317,736 params, 2.21 GMACs."""
  return _factory((4, 4, 12, 4), kwargs)


@registry.register_model(family="tformer", image_size=224, stride=STRIDE, top1=80.6,
                         reference=_REFERENCE, mean=registry.IMAGENET_MEAN,
                         std=registry.IMAGENET_STD)
def tformer_l(**kwargs) -> TFormer:
  """TFormer-L (reconstruction): depths 6,6,18,6; 20,255,912 params, 3.20 GMACs."""
  return _factory((6, 6, 18, 6), kwargs)
