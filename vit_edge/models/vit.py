"""ViT and DeiT (plain and distilled): the teachers and DeViT's building blocks.

References: Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021); Touvron et
al., "Training data-efficient image transformers & distillation through attention" (DeiT,
ICML 2021). The computation follows timm's ``VisionTransformer`` and
``VisionTransformerDistilled`` (timm/models/vision_transformer.py, deit.py) exactly:

* patch embedding = Conv(kernel = stride = patch, bias), flattened row-major to tokens;
* class token (and, distilled, a distillation token) concatenated *before* the learned
  position embedding is added, so ``pos_embed`` has one entry per prefix token too;
* pre-norm blocks ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` with LayerNorm eps 1e-6,
  one fused ``qkv`` Linear (3 * dim, with bias) split as timm does (3, heads, head_dim),
  scale head_dim ** -0.5, exact (erf) GELU, MLP ratio 4;
* final LayerNorm, linear head on the class token; the distilled model adds ``head_dist``
  on the distillation token and returns the average of both heads (timm's inference
  output; the two heads' logits are also in ``aux`` for the DeiT hard-distillation loss).

Parameters are one Flax leaf per timm tensor (``blocks.3.attn.qkv.weight`` ->
``blocks_3/attn/qkv/kernel``, transposed); :func:`convert_torch_state_dict` ports timm
weights (checked against timm: logits within 3e-6 in float32). Not ported from timm: the
dynamic-image-size, register-token, layer-scale, qk-norm and global-average-pool options
(none of the registered models uses them); dropout applies before the head only (timm's
``drop_rate``; its pos/proj/attn dropouts default to 0 in every registered config).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_edge.models import convert
from vit_edge.models import layers
from vit_edge.models import registry

Dtype = Any
Grid = Union[int, Sequence[int]]

# timm keeps PyTorch's default Conv2d init for the patch embedding (its ViT init only
# touches Linear layers): kaiming_uniform(a=sqrt(5)), i.e. variance 1/(3 fan_in). The
# conv bias starts at zero here (PyTorch draws it uniformly; immaterial for training).
_patch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# timm: cls_token ~ N(0, 1e-6); pos_embed and dist_token ~ trunc_normal(0.02).
_cls_token_init = nn.initializers.normal(stddev=1e-6)
_LN_EPS = 1e-6


class PatchEmbed(nn.Module):
  """Non-overlapping patches -> tokens [B, N, D] (timm ``PatchEmbed``; conv named proj).

  Attributes:
    patch_size: kernel and stride of the conv.
    embed_dim: token width.
    dtype: compute dtype.
  """

  patch_size: int
  embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """NHWC images -> row-major flattened patch embeddings (timm's flatten(2))."""
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID",
                dtype=self.dtype, kernel_init=_patch_kernel_init, name="proj")(x)
    return x.reshape(x.shape[0], -1, self.embed_dim)


class Attention(nn.Module):
  """Multi-head self-attention with one fused qkv projection (timm ``Attention``).

  Attributes:
    num_heads: number of heads; the token width must be divisible by it unless
      head_dim is set.
    qkv_bias: bias on the qkv projection (True for ViT/DeiT).
    dtype: compute dtype.
    head_dim: per-head width; None = token width / num_heads. Set by structured
      pruning, which keeps each head's width but removes whole heads, so the
      attention's inner width (num_heads * head_dim) is below the token width.
  """

  num_heads: int
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32
  head_dim: Optional[int] = None

  @nn.compact
  def __call__(self, x: jax.Array, split: Optional[int] = None
               ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Returns the attended tokens and (q, k, v), each [B, heads, N, hd].

    The attended tokens are ``(out,)``, [B, N, D], or with ``split=p`` the pair
    ``(out[:, :p], out[:, p:])`` computed apart from each other (every key and value
    still feeds both), so that a caller that uses only one part leaves the other as
    dead code for the compiler to drop.
    """
    b, n, dim = x.shape
    if self.head_dim is None and dim % self.num_heads:
      raise ValueError(f"Token width {dim} is not divisible by num_heads="
                       f"{self.num_heads}; pick a num_heads that divides embed_dim.")
    head_dim = self.head_dim or dim // self.num_heads
    inner = self.num_heads * head_dim
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              kernel_init=layers.trunc_normal,
                              bias_init=nn.initializers.zeros,
                              dot_general=layers.dense_dot_general)
    qkv = dense(3 * inner, use_bias=self.qkv_bias, name="qkv")(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    proj = dense(dim, name="proj")
    if layers.fused_attention_applies(qkv.dtype):
      out = layers.fused_attention(qkv, head_dim ** -0.5)
      q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
      parts = _row_parts(out, split, axis=1)
    else:
      # Same split as timm: reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4).
      qkv = qkv.transpose(2, 0, 3, 1, 4)
      q, k, v = qkv[0], qkv[1], qkv[2]
      parts = tuple(_attend(rows, k, v, head_dim ** -0.5)
                    for rows in _row_parts(q, split, axis=2))
    return tuple(proj(part) for part in parts), (q, k, v)


def _row_parts(x: jax.Array, split: Optional[int], axis: int) -> tuple[jax.Array, ...]:
  """``(x,)``, or x cut along `axis` into its first `split` rows and the rest."""
  if split is None:
    return (x,)
  return (jax.lax.slice_in_dim(x, 0, split, axis=axis),
          jax.lax.slice_in_dim(x, split, x.shape[axis], axis=axis))


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  """softmax(q k^T * scale) v for q [B, heads, M, hd] -> [B, M, heads * hd]."""
  logits = jnp.einsum("bhqd,bhkd->bhqk", q * scale, k)
  # Softmax in float32 so bf16 inference keeps the attention rows normalised.
  attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  out = jnp.einsum("bhqk,bhkd->bhqd", attn, v)
  b, heads, m, head_dim = out.shape
  return out.transpose(0, 2, 1, 3).reshape(b, m, heads * head_dim)


class Block(nn.Module):
  """Pre-norm transformer block (timm ``Block`` without layer scale).

  Attributes:
    num_heads: attention heads.
    mlp_ratio: MLP hidden width / token width.
    qkv_bias: bias on the qkv projection.
    drop_path_rate: stochastic-depth rate of both residual branches.
    dtype: compute dtype.
    head_dim: per-head width (None = token width / num_heads); see Attention.
    mlp_hidden: MLP hidden width; None = token width * mlp_ratio.
  """

  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  head_dim: Optional[int] = None
  mlp_hidden: Optional[int] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, split: Optional[int] = None
               ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Returns the block output and the attention's (q, k, v).

    The output is ``(x,)``, or with ``split=p`` the pair (first p tokens, the rest)
    computed apart after the attention (see `Attention`); the same parameters,
    and stochastic depth drops a sample's parts together.
    """
    norm = functools.partial(nn.LayerNorm, epsilon=_LN_EPS, dtype=self.dtype)
    ys, qkv = Attention(self.num_heads, self.qkv_bias, dtype=self.dtype,
                        head_dim=self.head_dim, name="attn")(norm(name="norm1")(x), split)
    ys = layers.DropPath(self.drop_path_rate, name="drop_path1")(
        ys, deterministic=not train)
    parts = tuple(rows + y for rows, y in zip(_row_parts(x, split, axis=1), ys))
    hidden = self.mlp_hidden or int(x.shape[-1] * self.mlp_ratio)
    mlp = layers.Mlp(hidden, dtype=self.dtype, name="mlp")
    norm2 = norm(name="norm2")
    ys = tuple(mlp(norm2(rows), deterministic=not train) for rows in parts)
    ys = layers.DropPath(self.drop_path_rate, name="drop_path2")(
        ys, deterministic=not train)
    return tuple(rows + y for rows, y in zip(parts, ys)), qkv


class VisionTransformer(nn.Module):
  """ViT / DeiT classifier; usable directly for custom (e.g. DeViT-sized) models.

  Example::

      model = VisionTransformer(embed_dim=192, depth=4, num_heads=3, image_size=32,
                                patch_size=4, num_classes=100, qkv_block=2)
      variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      logits, aux = model.apply(variables, images)   # aux["q"]: [B, 3, 65, 64]

  aux holds "stem" (the patch embeddings), "tokens" (every final token, after the
  last norm), "prefix_tokens" (the class/distillation ones alone), "pre_logits",
  the chosen block's "q", "k", "v", and the distilled model's two heads' logits.

  Attributes:
    num_classes: classes of the head(s); 0 = no head, the logits are the pre-logits
      (for the distilled model timm's average of the class and distillation tokens).
    image_size: the input resolution the position embedding is built for; other
      resolutions raise (see :func:`resize_pos_embed` for fine-tuning at a new one).
    patch_size: patch (and conv stride) size.
    embed_dim: token width.
    depth: number of blocks.
    num_heads: attention heads per block.
    mlp_ratio: MLP hidden width / token width.
    qkv_bias: bias on the qkv projections.
    distilled: DeiT distillation token and second head ``head_dist``.
    qkv_block: when set, aux carries "q", "k", "v" ([B, heads, tokens, head_dim]) of
      this block (0-based; negative counts from the end) for relation distillation.
    drop_path_rate: stochastic depth, rising linearly over blocks from 0 (timm).
    dropout_rate: dropout on the token(s) fed to the head(s) (timm ``drop_rate``).
    dtype: compute dtype; parameters stay float32.
    unit_widths: units kept per block after structured pruning (vit_edge.compress),
      keyed by module path: ``"blocks_3/attn"`` -> heads (each keeps the width
      embed_dim // num_heads), ``"blocks_3/mlp"`` -> MLP hidden units. Blocks not
      listed keep the size's widths; None (default) = unpruned.
  """

  num_classes: int = 1000
  image_size: int = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  distilled: bool = False
  qkv_block: Optional[int] = None
  drop_path_rate: float = 0.0
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  unit_widths: Optional[Mapping[str, int]] = None

  # int8 exports quantise this family's matmul inputs per row at run time: its
  # residual stream cannot take one static int8 scale per tensor, because the
  # class token's row starts ~100x below the patch rows (vit_edge.export.quantize,
  # "Activations").
  int8_activations: ClassVar[str] = "dynamic"

  @property
  def num_prefix_tokens(self) -> int:
    """Class token, plus the distillation token when distilled."""
    return 2 if self.distilled else 1

  @property
  def grid_size(self) -> int:
    """Patches per side at ``image_size``."""
    return self.image_size // self.patch_size

  def _check_input(self, x: jax.Array) -> None:
    if self.image_size % self.patch_size:
      raise ValueError(
          f"image_size={self.image_size} is not a multiple of patch_size="
          f"{self.patch_size}; pick e.g. image_size="
          f"{max(1, self.image_size // self.patch_size) * self.patch_size}.")
    if x.ndim != 4:
      raise ValueError(f"VisionTransformer expects an NHWC batch of rank 4, got shape "
                       f"{x.shape}. Add a batch axis, e.g. x[None].")
    h, w = x.shape[1], x.shape[2]
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(
          f"This ViT was built for {self.image_size}x{self.image_size} inputs (its "
          f"position embedding fixes the resolution) but got {h}x{w}. Resize the "
          f"images to {self.image_size}x{self.image_size}, or build the model for the "
          f"new size with create_model(..., image_size={h}) (square inputs; port "
          "trained weights with vit.resize_pos_embed).")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads="
                       f"{self.num_heads}; pick a num_heads that divides embed_dim.")
    if self.depth < 1:
      raise ValueError(f"depth={self.depth}: a ViT needs at least one block; set "
                       "depth to 1 or more.")
    if _qkv_block_out_of_range(self.qkv_block, self.depth):
      raise ValueError(f"qkv_block={self.qkv_block} is out of range for depth="
                       f"{self.depth}; use 0..{self.depth - 1} or a negative index.")

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Maps NHWC images to (logits [B, num_classes], aux dict of intermediates)."""
    self._check_input(x)
    aux = {}
    x = PatchEmbed(self.patch_size, self.embed_dim, dtype=self.dtype,
                   name="patch_embed")(x.astype(self.dtype))
    b = x.shape[0]
    aux["stem"] = x

    prefix = [self.param("cls_token", _cls_token_init, (1, 1, self.embed_dim))]
    if self.distilled:
      prefix.append(self.param("dist_token", layers.trunc_normal,
                               (1, 1, self.embed_dim)))
    prefix = [jnp.broadcast_to(t.astype(self.dtype), (b, 1, self.embed_dim))
              for t in prefix]
    pos_embed = self.param(
        "pos_embed", layers.trunc_normal,
        (1, self.num_prefix_tokens + self.grid_size ** 2, self.embed_dim))
    # Original ViT/DeiT: concatenate the tokens first, then add (pos_embed covers them).
    x = jnp.concatenate(prefix + [x], axis=1) + pos_embed.astype(self.dtype)

    rates = layers.drop_path_rates(self.drop_path_rate, [self.depth])[0]
    qkv_block = (None if self.qkv_block is None
                 else self.qkv_block % self.depth)
    widths = self.unit_widths or {}
    for i, rate in enumerate(rates):
      heads = widths.get(f"blocks_{i}/attn", self.num_heads)
      # The heads read only the prefix tokens, so after its attention the last block
      # computes them apart from the patch tokens: a caller that does not use
      # aux["tokens"] (inference, the export, a classification loss) leaves the
      # patch tokens' projection and MLP as dead code, 6% of DeiT-Ti's MACs.
      last = i == self.depth - 1
      parts, qkv = Block(heads, self.mlp_ratio, self.qkv_bias, rate, dtype=self.dtype,
                         head_dim=self.embed_dim // self.num_heads,
                         mlp_hidden=widths.get(f"blocks_{i}/mlp"),
                         name=f"blocks_{i}")(
                             x, train, self.num_prefix_tokens if last else None)
      x = parts if last else parts[0]
      if i == qkv_block:
        aux["q"], aux["k"], aux["v"] = qkv

    norm = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="norm")
    prefix, patches = (norm(rows) for rows in x)
    aux["tokens"] = jnp.concatenate([prefix, patches], axis=1)
    aux["prefix_tokens"] = prefix  # Without the concatenation, for DeViT's devices.
    x = prefix
    cls_tok = x[:, 0]
    aux["pre_logits"] = cls_tok
    drop = nn.Dropout(self.dropout_rate)
    cls_tok = drop(cls_tok, deterministic=not train)
    if not self.distilled:
      return layers.classifier_head(cls_tok, self.num_classes, self.dtype), aux

    dist_tok = drop(x[:, 1], deterministic=not train)
    if self.num_classes <= 0:
      return (cls_tok + dist_tok) / 2, aux  # timm's pre_logits for the distilled model.
    logits_cls = layers.classifier_head(cls_tok, self.num_classes, self.dtype, "head")
    logits_dist = layers.classifier_head(dist_tok, self.num_classes, self.dtype,
                                         "head_dist")
    aux["logits_cls"], aux["logits_dist"] = logits_cls, logits_dist
    return (logits_cls + logits_dist) / 2, aux


def _qkv_block_out_of_range(qkv_block: Optional[int], depth: int) -> bool:
  """True when ``qkv_block`` names no block of a ``depth``-block model."""
  return qkv_block is not None and not -depth <= qkv_block < depth


def _as_grid(grid: Grid) -> tuple[int, int]:
  if isinstance(grid, int):
    return grid, grid
  h, w = grid
  return int(h), int(w)


def resize_pos_embed(pos_embed: Any, old_grid: Grid, new_grid: Grid,
                     num_prefix_tokens: int = 1, method: str = "bilinear"):
  """Resamples a learned position embedding to a new patch grid (for fine-tuning).

  The prefix-token entries (class / distillation) are kept; the patch entries are
  reshaped to the grid and resized with ``jax.image.resize`` (half-pixel centres, like
  PyTorch's ``align_corners=False``). timm's ``resample_abs_pos_embed`` defaults to
  antialiased bicubic; pass ``method="bicubic"`` to come closer (jax's cubic kernel uses
  a=-0.5, PyTorch's a=-0.75, so the values differ slightly).

  Example (DeiT-Tiny from 224 to 384)::

      params["pos_embed"] = resize_pos_embed(params["pos_embed"], 14, 24, 1)
      model = create_model("deit_tiny_patch16", image_size=384)

  Args:
    pos_embed: [1, num_prefix_tokens + old_h * old_w, D].
    old_grid: patches per side (int) or (h, w) the embedding was trained for.
    new_grid: target patches per side (int) or (h, w).
    num_prefix_tokens: 1 for ViT/DeiT, 2 for distilled DeiT.
    method: any ``jax.image.resize`` method ("bilinear", "bicubic", ...).

  Returns:
    [1, num_prefix_tokens + new_h * new_w, D] in the input's dtype.

  Raises:
    ValueError: when the token count does not match ``old_grid`` and the prefix.
  """
  pos_embed = jnp.asarray(pos_embed)
  (oh, ow), (nh, nw) = _as_grid(old_grid), _as_grid(new_grid)
  if pos_embed.ndim != 3 or pos_embed.shape[1] != num_prefix_tokens + oh * ow:
    raise ValueError(
        f"pos_embed of shape {pos_embed.shape} does not hold {num_prefix_tokens} prefix "
        f"tokens + a {oh}x{ow} grid ({num_prefix_tokens + oh * ow} tokens); check "
        "old_grid and num_prefix_tokens (2 for distilled DeiT).")
  prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
  dim = pos_embed.shape[2]
  grid = grid.reshape(1, oh, ow, dim).astype(jnp.float32)
  grid = jax.image.resize(grid, (1, nh, nw, dim), method=method)
  grid = grid.reshape(1, nh * nw, dim).astype(pos_embed.dtype)
  return jnp.concatenate([prefix, grid], axis=1)


# ---------------------------------------------------------------------------
# Porting timm weights.


def torch_name(path: Sequence[str]) -> str:
  """timm state_dict key of a Flax variable path (collection first).

  Example: ``torch_name(("params", "blocks_3", "attn", "qkv", "kernel")) ==
  "blocks.3.attn.qkv.weight"``.
  """
  _, *mods, leaf = path
  mods = [m.replace("blocks_", "blocks.", 1) if m.startswith("blocks_") else m
          for m in mods]
  if not mods:  # cls_token, dist_token, pos_embed.
    return leaf
  return ".".join(mods + [{"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])


def convert_torch_state_dict(state_dict: Mapping[str, Any],
                             model: VisionTransformer) -> dict[str, Any]:
  """Maps a timm ViT/DeiT state_dict (name -> numpy array) to Flax variables of `model`.

  Example::

      sd = {k: v.numpy() for k, v in timm_model.state_dict().items()}
      variables = convert_torch_state_dict(sd, create_model("deit_tiny_patch16"))

  Args:
    state_dict: timm ``VisionTransformer`` / ``VisionTransformerDistilled`` tensors
      as numpy arrays (or anything ``np.asarray`` accepts).
    model: the module the weights are for (sizes, ``distilled`` and ``image_size``
      must match the checkpoint; resize ``pos_embed`` first for another resolution).

  Returns:
    ``{"params": ...}`` (ViTs have no batch statistics).

  Raises:
    convert.StateDictMismatchError: naming every missing, unexpected and
      mis-shaped key (a KeyError and a ValueError).
  """
  return convert.convert_state_dict(
      state_dict, convert.variable_shapes(model, model.image_size),
      torch_name=torch_name, to_flax=convert.torch_layout_to_flax, family="ViT/DeiT",
      hint="Check the variant (distilled?), num_classes and image_size "
           "(vit.resize_pos_embed for another resolution).")


# ---------------------------------------------------------------------------
# Registered sizes.

_DEIT_REF = "DeiT / timm vit_*_patch16_224"
# timm's vit_*_patch16_224 checkpoints (Google AugReg) expect inputs in [-1, 1].
_INCEPTION = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _build(overrides: dict[str, Any], **config: Any) -> VisionTransformer:
  """The size's config updated by the user's overrides (so depth etc. can shrink too)."""
  return registry.build(VisionTransformer, config, overrides)


def _register(family: str, top1: Optional[float], **info: Any):
  return registry.register_model(family=family, image_size=224, stride=16,
                                 fixed_resolution=True, top1=top1,
                                 reference=_DEIT_REF, **info)


@_register("deit", 72.2)
def deit_tiny_patch16(**kwargs) -> VisionTransformer:
  """DeiT-Tiny/16 (192 wide, 12 blocks, 3 heads), 5.7M params."""
  return _build(kwargs, embed_dim=192, depth=12, num_heads=3)


@_register("deit", 79.8)
def deit_small_patch16(**kwargs) -> VisionTransformer:
  """DeiT-Small/16 (384 wide, 12 blocks, 6 heads), 22.1M params."""
  return _build(kwargs, embed_dim=384, depth=12, num_heads=6)


@_register("deit", 81.8)
def deit_base_patch16(**kwargs) -> VisionTransformer:
  """DeiT-Base/16 (768 wide, 12 blocks, 12 heads), 86.6M params."""
  return _build(kwargs, embed_dim=768, depth=12, num_heads=12)


@_register("deit", 74.5)
def deit_tiny_distilled_patch16(**kwargs) -> VisionTransformer:
  """DeiT-Tiny/16 with distillation token and head, 5.9M params."""
  return _build(kwargs, embed_dim=192, depth=12, num_heads=3, distilled=True)


@_register("deit", 81.2)
def deit_small_distilled_patch16(**kwargs) -> VisionTransformer:
  """DeiT-Small/16 with distillation token and head, 22.4M params."""
  return _build(kwargs, embed_dim=384, depth=12, num_heads=6, distilled=True)


@_register("deit", 83.4)
def deit_base_distilled_patch16(**kwargs) -> VisionTransformer:
  """DeiT-Base/16 with distillation token and head, 87.3M params."""
  return _build(kwargs, embed_dim=768, depth=12, num_heads=12, distilled=True)


@_register("vit", None, **_INCEPTION)
def vit_base_patch16(**kwargs) -> VisionTransformer:
  """ViT-B/16 (768 wide, 12 blocks, 12 heads), 86.6M params."""
  return _build(kwargs, embed_dim=768, depth=12, num_heads=12)


@_register("vit", None, **_INCEPTION)
def vit_large_patch16(**kwargs) -> VisionTransformer:
  """ViT-L/16 (1024 wide, 24 blocks, 16 heads), 304.3M params."""
  return _build(kwargs, embed_dim=1024, depth=24, num_heads=16)
