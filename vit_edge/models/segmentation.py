"""Semantic segmentation: Semantic-FPN and a light UPerNet over the 4-stage backbones.

A `SegmentationModel` runs a registered backbone (EdgeViT, MobileViTv2, TFormer)
without its classifier, takes its four pyramid levels at strides 4, 8, 16 and 32
from ``aux`` (`PYRAMID_KEYS`), and decodes them with one of two heads
(reconstructed from mmsegmentation's FPNHead / UPerHead, see
../shared/reference/methods.md section 6):

* ``"fpn"`` (Semantic-FPN, Kirillov et al. 2019): FPN neck (lateral 1x1 convs to
  ``fpn_width``, nearest top-down upsampling and adds, 3x3 output convs), then per
  level ``max(1, log2(stride / 4))`` conv3x3-BN-ReLU blocks of ``head_width``
  channels, each followed by a 2x bilinear upsampling until stride 4; the levels
  are summed and a 1x1 conv classifies.
* ``"upernet"`` (Xiao et al. 2018): a pyramid pooling module (bins 1, 2, 3, 6) on
  the last level, lateral 1x1 convs, bilinear top-down adds, 3x3 FPN convs, all
  levels upsampled to stride 4 and concatenated, a 3x3 fuse conv and a 1x1
  classifier. efficient-vit's edge UPerNet uses an FPN width of 64 (our default);
  mmsegmentation's is 512.

The pyramid pooling is written as products with fixed averaging matrices (PyTorch's
``adaptive_avg_pool2d`` windows) and every resize as products with fixed bilinear
matrices (`vit_edge.export.serving.resize_bilinear`): both are constants of the
input size, so the same code trains and exports at any size divisible by 32, and
the exported resize is exactly the trained one.

The model returns ``(logits, aux)`` with logits ``[N, H, W, num_classes]`` at the
input resolution (the stride-4 map upsampled bilinearly, as mmsegmentation does
before its loss); ``aux`` keeps the backbone's entries plus ``logits_stride4`` and,
with ``aux_head=True``, ``aux_logits`` (an FCN head on the stride-16 level that the
`pixel_cross_entropy` objective weights by 0.4, as mmsegmentation).

Example::

    model = create_model("upernet_edgevit_xxs", num_classes=14)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 512, 512, 3)))
    logits, aux = model.apply(variables, images, train=False)  # [N, 512, 512, 14]
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_edge.export.serving import resize_bilinear
from vit_edge.models import layers
from vit_edge.models import registry

Dtype = Any

# The aux entries holding each family's maps at strides 4, 8, 16, 32.
PYRAMID_KEYS = {
    "edgevit": ("stage1", "stage2", "stage3", "stage4"),
    "tformer": ("stage1", "stage2", "stage3", "stage4"),
    "mobilevitv2": ("stage2", "stage3", "stage4", "stage5"),
}
HEADS = ("fpn", "upernet")
PPM_BINS = (1, 2, 3, 6)
# efficient-vit's edge UPerNet width; mmsegmentation uses 256 (FPN) / 512 (UPerNet).
EDGE_FPN_WIDTH = 64
AUX_HEAD_STAGE = 2  # Stride 16, the third level (mmsegmentation's in_index=2).


def adaptive_pool_matrix(bins: int, size: int) -> np.ndarray:
  """[bins, size] averaging weights of PyTorch's ``adaptive_avg_pool`` windows.

  Window i covers ``[floor(i * size / bins), ceil((i + 1) * size / bins))``; for a
  map smaller than the bin count windows repeat pixels, as in PyTorch.

  Example: ``adaptive_pool_matrix(2, 4)`` averages pixels (0, 1) and (2, 3).
  """
  matrix = np.zeros((bins, size), np.float32)
  for i in range(bins):
    start = (i * size) // bins
    end = -(-((i + 1) * size) // bins)
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_avg_pool(x: jax.Array, bins: int) -> jax.Array:
  """[N, h, w, C] -> [N, bins, bins, C] by two products with constant matrices."""
  rows = jnp.asarray(adaptive_pool_matrix(bins, x.shape[1]), x.dtype)
  cols = jnp.asarray(adaptive_pool_matrix(bins, x.shape[2]), x.dtype)
  x = jnp.einsum("bi,nijc->nbjc", rows, x)
  return jnp.einsum("dj,nbjc->nbdc", cols, x)


def nearest_matrix(out_size: int, in_size: int) -> np.ndarray:
  """[out, in] one-hot rows of PyTorch's ``interpolate(mode='nearest')``."""
  matrix = np.zeros((out_size, in_size), np.float32)
  matrix[np.arange(out_size), (np.arange(out_size) * in_size) // out_size] = 1.0
  return matrix


def resize_nearest(x: jax.Array, height: int, width: int) -> jax.Array:
  """[N, h, w, C] -> [N, height, width, C] (FPN's top-down path).

  An exact 2x is a repetition; other ratios (MobileViTv2's last map is resized
  up to its patch size, e.g. 4x4 under a 6x6 level at 96 px) are products with
  one-hot matrices: no gather, so it converts to ops XNNPACK runs.
  """
  n, h, w, c = x.shape
  if (height, width) == (h, w):
    return x
  if (height, width) == (2 * h, 2 * w):
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
    return x.reshape(n, height, width, c)
  rows = jnp.asarray(nearest_matrix(height, h), x.dtype)
  cols = jnp.asarray(nearest_matrix(width, w), x.dtype)
  x = jnp.einsum("hi,nijc->nhjc", rows, x)
  return jnp.einsum("wj,nhjc->nhwc", cols, x)


class ConvNormAct(nn.Module):
  """Conv (no bias) + BatchNorm + ReLU: mmsegmentation's ConvModule."""

  features: int
  kernel: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    pad = self.kernel // 2
    x = nn.Conv(self.features, (self.kernel, self.kernel),
                padding=((pad, pad), (pad, pad)), use_bias=False, dtype=self.dtype,
                kernel_init=nn.initializers.kaiming_normal(), name="conv")(x)
    x = layers.batch_norm(train, self.dtype, name="bn")(x)
    return nn.relu(x)


class Classifier(nn.Module):
  """Dropout then a 1x1 conv to class logits (mmsegmentation's cls_seg)."""

  num_classes: int
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                   kernel_init=nn.initializers.normal(0.01), name="conv")(x)


class PyramidPooling(nn.Module):
  """PSPNet's pyramid pooling: per bin, pool -> 1x1 ConvNormAct -> bilinear back."""

  width: int
  bins: Sequence[int] = PPM_BINS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
    height, width = x.shape[1], x.shape[2]
    outs = []
    for i, bins in enumerate(self.bins):
      pooled = adaptive_avg_pool(x, bins)
      pooled = ConvNormAct(self.width, 1, self.dtype, name=f"pool{i}")(pooled, train)
      outs.append(resize_bilinear(pooled, height, width))
    return outs


class FPNHead(nn.Module):
  """Semantic-FPN: FPN neck + per-level upsampling heads summed at stride 4."""

  num_classes: int
  fpn_width: int = EDGE_FPN_WIDTH
  head_width: int = EDGE_FPN_WIDTH
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array], train: bool) -> jax.Array:
    laterals = [nn.Conv(self.fpn_width, (1, 1), dtype=self.dtype, name=f"lateral{i}")(x)
                for i, x in enumerate(levels)]
    for i in range(len(laterals) - 1, 0, -1):
      below = laterals[i - 1]
      laterals[i - 1] = below + resize_nearest(laterals[i], below.shape[1],
                                               below.shape[2])
    outs = [nn.Conv(self.fpn_width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                    name=f"fpn{i}")(x) for i, x in enumerate(laterals)]
    height, width = outs[0].shape[1], outs[0].shape[2]
    fused = None
    for i, x in enumerate(outs):
      for j in range(max(1, i)):  # Level i (stride 4 * 2^i) needs i doublings.
        x = ConvNormAct(self.head_width, 3, self.dtype, name=f"scale{i}_{j}")(x, train)
        if i > 0:
          x = resize_bilinear(x, 2 * x.shape[1], 2 * x.shape[2])
      # As mmsegmentation: then to level 0's size (a no-op unless a backbone
      # rounded a map up, as MobileViTv2 does).
      x = resize_bilinear(x, height, width)
      fused = x if fused is None else fused + x
    return Classifier(self.num_classes, self.dropout_rate, self.dtype,
                      name="classifier")(fused, train)


class UPerHead(nn.Module):
  """UPerNet: PPM on the last level, FPN, concat at stride 4, fuse, classify."""

  num_classes: int
  fpn_width: int = EDGE_FPN_WIDTH
  bins: Sequence[int] = PPM_BINS
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array], train: bool) -> jax.Array:
    top = levels[-1]
    pooled = PyramidPooling(self.fpn_width, tuple(self.bins), self.dtype,
                            name="ppm")(top, train)
    top = ConvNormAct(self.fpn_width, 3, self.dtype, name="ppm_bottleneck")(
        jnp.concatenate([top] + pooled, axis=-1), train)
    laterals = [ConvNormAct(self.fpn_width, 1, self.dtype, name=f"lateral{i}")(x, train)
                for i, x in enumerate(levels[:-1])] + [top]
    for i in range(len(laterals) - 1, 0, -1):
      below = laterals[i - 1]
      laterals[i - 1] = below + resize_bilinear(laterals[i], below.shape[1],
                                                below.shape[2])
    outs = [ConvNormAct(self.fpn_width, 3, self.dtype, name=f"fpn{i}")(x, train)
            for i, x in enumerate(laterals[:-1])] + [laterals[-1]]
    height, width = outs[0].shape[1], outs[0].shape[2]
    fused = jnp.concatenate([resize_bilinear(x, height, width) for x in outs], axis=-1)
    fused = ConvNormAct(self.fpn_width, 3, self.dtype, name="fpn_bottleneck")(fused, train)
    return Classifier(self.num_classes, self.dropout_rate, self.dtype,
                      name="classifier")(fused, train)


class SegmentationModel(nn.Module):
  """A registered 4-stage backbone with a dense head; logits at the input size.

  Attributes:
    backbone: registry name of the backbone ("edgevit_xxs", "mobilevitv2_100", ...).
    head: "fpn" (Semantic-FPN) or "upernet".
    num_classes: segmentation classes.
    fpn_width: channels of the FPN (and of UPerNet's fuse conv).
    head_width: Semantic-FPN's per-level head channels (mmsegmentation: 128).
    aux_head: add an FCN head on the stride-16 level (``aux["aux_logits"]``).
    dropout_rate: dropout before the classifiers (mmsegmentation: 0.1).
    drop_path_rate: the backbone's stochastic depth.
    backbone_overrides: (field, value) pairs for the backbone (e.g. smaller widths).
    backbone_export_form: build the backbone's export form (`export_form`).
    dtype: compute dtype; parameters stay float32.
  """

  backbone: str = "edgevit_xxs"
  head: str = "upernet"
  num_classes: int = 14
  fpn_width: int = EDGE_FPN_WIDTH
  head_width: int = EDGE_FPN_WIDTH
  aux_head: bool = False
  dropout_rate: float = 0.1
  drop_path_rate: float = 0.1
  backbone_overrides: tuple[tuple[str, Any], ...] = ()
  backbone_export_form: bool = False
  dtype: Dtype = jnp.float32

  def export_form(self) -> "SegmentationModel":
    """The form vit_edge.export traces: the backbone's export form, same parameters."""
    return self.clone(backbone_export_form=True)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    info = registry.get_model_info(self.backbone)
    if info.family not in PYRAMID_KEYS:
      raise ValueError(
          f"backbone={self.backbone!r} ({info.family}) has no 4-level pyramid; "
          f"segmentation heads take one of the families {sorted(PYRAMID_KEYS)}.")
    if self.head not in HEADS:
      raise ValueError(f"head={self.head!r}; expected one of {HEADS}.")
    layers.check_divisible_resolution(x, info.stride, f"{self.head}_{self.backbone}")
    # Built unbound (parent=None) so that its export form, a clone, can be taken
    # before it is bound here as "backbone": the same parameters either way.
    backbone = info.builder(num_classes=0, drop_path_rate=self.drop_path_rate,
                            dtype=self.dtype, parent=None,
                            **dict(self.backbone_overrides))
    if self.backbone_export_form and hasattr(backbone, "export_form"):
      backbone = backbone.export_form()
    backbone = backbone.clone(parent=self, name="backbone")
    _, aux = backbone(x, train=train)
    levels = [aux[k] for k in PYRAMID_KEYS[info.family]]
    if self.head == "fpn":
      logits = FPNHead(self.num_classes, self.fpn_width, self.head_width,
                       self.dropout_rate, self.dtype, name="decode_head")(levels, train)
    else:
      logits = UPerHead(self.num_classes, self.fpn_width, PPM_BINS, self.dropout_rate,
                        self.dtype, name="decode_head")(levels, train)
    aux = dict(aux)
    aux["logits_stride4"] = logits
    height, width = x.shape[1], x.shape[2]
    if self.aux_head:
      aux_x = ConvNormAct(self.fpn_width, 3, self.dtype, name="aux_conv")(
          levels[AUX_HEAD_STAGE], train)
      aux_logits = Classifier(self.num_classes, self.dropout_rate, self.dtype,
                              name="aux_classifier")(aux_x, train)
      aux["aux_logits"] = resize_bilinear(aux_logits, height, width)
    return resize_bilinear(logits, height, width), aux


def _register(head: str, backbone: str):
  info = registry.get_model_info(backbone)
  name = f"{head}_{backbone}"

  def factory(**kwargs):
    return registry.build(SegmentationModel, dict(backbone=backbone, head=head), kwargs)

  factory.__name__ = name
  factory.__qualname__ = name
  # LPCVC 2023 scores at 512x512; any multiple of the backbone stride works.
  return registry.register_model(
      family="segmentation", image_size=512, stride=info.stride, mean=info.mean,
      std=info.std,
      reference=(f"{'Semantic-FPN' if head == 'fpn' else 'UPerNet'} head "
                 "(mmsegmentation, reconstructed) on " + backbone))(factory)


SEGMENTATION_BACKBONES = ("edgevit_xxs", "edgevit_xs", "mobilevitv2_050",
                          "mobilevitv2_100", "tformer_s")
for _head in HEADS:
  for _backbone in SEGMENTATION_BACKBONES:
    globals()[f"{_head}_{_backbone}"] = _register(_head, _backbone)

