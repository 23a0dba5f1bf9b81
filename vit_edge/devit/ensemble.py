"""The DeViT ensemble: N small ViTs (one per device) and the fusion head, as one module.

DeViT (Xu et al., IEEE TMC; falcon-xu/DeViT ``models/ensemble_models.py``) runs
N small ViTs side by side, each trained on one class subset
(:mod:`vit_edge.devit.decompose`), drops their heads, concatenates their final
(normed) class tokens -- and distillation tokens for DeDeiT -- and maps each
concatenation through a feature-matching ``Linear(N*d -> d_teacher)`` and a
classifier ``Linear(d_teacher -> C)``; DeDeiT has separate cls and dist branches
whose logits are averaged (the reference's ``cls_mlp``/``dist_mlp``).

Here the N sub-models are one stacked module (``nn.vmap`` over a leading device
axis of every parameter), so the whole ensemble trains in one jitted, sharded
step. Added to the reference: *failout* (ResiliNet, arXiv 2002.07386): in
training each device's tokens are dropped with probability ``failout_rate`` and
replaced by a learned per-device ``missing_token``, the same vector the runtime
sends to the fusion head for a device that is dead, slow or failing
(``presence`` = 0), so the fused answer survives a lost device.

The two halves are methods, so export and the runtime run them apart:
``device_tokens(images)`` -> [B, N, P, d] (P = 1, or 2 with the distillation
token) and ``fuse(tokens, presence)`` -> (logits, aux).

Example::

    model = DeViTEnsemble(num_classes=10, num_devices=2, image_size=32,
                          embed_dim=32, depth=2, num_heads=2, teacher_dim=64)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    logits, aux = model.apply(variables, images)        # aux["fused_tokens"]
    tokens = model.apply(variables, images, method="device_tokens")
    logits, _ = model.apply(variables, tokens, presence, method="fuse")
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_edge.models import layers
from vit_edge.models import registry
from vit_edge.models import vit

Dtype = Any
BRANCHES = ("cls", "dist")  # Prefix token p feeds branch BRANCHES[p].


class DeViTEnsemble(nn.Module):
  """N stacked sub-ViTs + failout + feature-matching fusion + classifier(s).

  Attributes:
    num_classes: classes of the whole task (the sub-models have no heads).
    num_devices: N, the number of sub-models (devices).
    image_size, patch_size, embed_dim, depth, num_heads, mlp_ratio: each
      sub-model's ViT (DeiT-Ti width 192 by default, the reference config).
    distilled: DeDeiT sub-models (class and distillation token, two branches).
    teacher_dim: width of the feature-matching projection (the full-data
      teacher's token width, its MSE target).
    failout_rate: probability, per image and device in training, that a device's
      tokens are replaced by its learned missing token.
    drop_path_rate, dropout_rate: the sub-models' regularisation.
    dtype: compute dtype.
  """

  num_classes: int = 1000
  num_devices: int = 4
  image_size: int = 224
  patch_size: int = 16
  embed_dim: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_ratio: float = 4.0
  distilled: bool = False
  teacher_dim: int = 1024
  failout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @property
  def num_prefix_tokens(self) -> int:
    return 2 if self.distilled else 1

  def submodel(self, num_classes: int = 0, **overrides: Any) -> vit.VisionTransformer:
    """One device's ViT (headless by default), the architecture of each stack slice."""
    fields = dict(num_classes=num_classes, image_size=self.image_size,
                  patch_size=self.patch_size, embed_dim=self.embed_dim,
                  depth=self.depth, num_heads=self.num_heads,
                  mlp_ratio=self.mlp_ratio, distilled=self.distilled,
                  drop_path_rate=self.drop_path_rate, dropout_rate=self.dropout_rate,
                  dtype=self.dtype)
    # parent=None: a free-standing module, even when called inside this one.
    return vit.VisionTransformer(**{**fields, **overrides}, parent=None)

  def setup(self):
    if self.num_devices < 1:
      raise ValueError(f"num_devices={self.num_devices} must be >= 1.")
    if not 0.0 <= self.failout_rate < 1.0:
      raise ValueError(f"failout_rate={self.failout_rate} must lie in [0, 1).")
    stacked = nn.vmap(
        vit.VisionTransformer, variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True}, in_axes=(None, None),
        axis_size=self.num_devices)
    template = self.submodel()
    fields = {f.name: getattr(template, f.name)
              for f in dataclasses.fields(vit.VisionTransformer)
              if f.name not in ("parent", "name")}
    self.submodels = stacked(**fields)
    self.missing_token = self.param(
        "missing_token", layers.trunc_normal,
        (self.num_devices, self.num_prefix_tokens, self.embed_dim))
    dense = lambda width, name: nn.Dense(width, dtype=self.dtype,
                                         kernel_init=layers.trunc_normal, name=name)
    branches = BRANCHES[:self.num_prefix_tokens]
    self.feature_match = [dense(self.teacher_dim, f"feature_match_{b}")
                          for b in branches]
    # Named head/head_dist: init_from re-initialises them for another class count.
    self.heads = [dense(self.num_classes, "head" if b == "cls" else "head_dist")
                  for b in branches]

  def device_tokens(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Every device's final prefix tokens [B, N, P, d] (what each device sends)."""
    _, aux = self.submodels(images, train)  # aux["prefix_tokens"]: [N, B, P, d].
    tokens = aux["prefix_tokens"][:, :, :self.num_prefix_tokens]
    return tokens.transpose(1, 0, 2, 3)

  def fuse(self, tokens: jax.Array, presence: Optional[jax.Array] = None,
           train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Fusion head: tokens [B, N, P, d] and presence [B, N] (1 = arrived) -> logits.

    A device with presence 0 (or, in training, dropped by failout) contributes
    its learned missing token instead of its tokens.
    """
    b = tokens.shape[0]
    expected = (self.num_devices, self.num_prefix_tokens, self.embed_dim)
    if tokens.ndim != 4 or tokens.shape[1:] != expected:
      raise ValueError(f"fuse expects tokens [B, {', '.join(map(str, expected))}] "
                       f"(batch, devices, prefix tokens, width); got {tokens.shape}.")
    if presence is None:
      presence = jnp.ones((b, self.num_devices), jnp.float32)
    presence = presence.astype(jnp.float32)
    if train and self.failout_rate > 0:
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.failout_rate,
                                  (b, self.num_devices))
      presence = presence * keep.astype(jnp.float32)
    # A blend, not a select: presence is exactly 0 or 1, and the product form
    # converts to plain MUL/ADD ops for the exported fusion head.
    weight = presence[:, :, None, None]
    missing = self.missing_token.astype(tokens.dtype)[None]
    tokens = weight * tokens + (1.0 - weight) * missing
    fused, logits = [], []
    for p, (match, head) in enumerate(zip(self.feature_match, self.heads)):
      concat = tokens[:, :, p].reshape(b, self.num_devices * self.embed_dim)
      fused.append(match(concat))
      logits.append(head(fused[-1]).astype(jnp.float32))
    aux = {"device_tokens": tokens, "presence": presence,
           "fused_tokens": jnp.stack(fused, axis=1), "pre_logits": fused[0]}
    if self.distilled:
      aux["logits_cls"], aux["logits_dist"] = logits
      return (logits[0] + logits[1]) / 2, aux
    return logits[0], aux

  def __call__(self, images: jax.Array, train: bool = False,
               presence: Optional[jax.Array] = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Images [B, S, S, 3] -> (logits [B, C], aux); `presence` [B, N] optional."""
    return self.fuse(self.device_tokens(images, train), presence, train)


def submodel_params(params: dict[str, Any], device: int) -> dict[str, Any]:
  """Device `device`'s slice of the stacked sub-model parameters (a plain ViT's)."""
  return jax.tree_util.tree_map(lambda x: x[device], params["submodels"])


def fusion_params(params: dict[str, Any]) -> dict[str, Any]:
  """The fusion head's parameters (everything but the stacked sub-models)."""
  return {k: v for k, v in params.items() if k != "submodels"}


@registry.register_model(family="devit", image_size=224, stride=16,
                         fixed_resolution=True, top1=None,
                         reference="DeViT (Xu et al., IEEE TMC; falcon-xu/DeViT)")
def devit_tiny_patch16(**kwargs) -> DeViTEnsemble:
  """DeViT: 4 DeiT-Ti-wide sub-ViTs fused to a ViT-L teacher width (1024)."""
  return registry.build(DeViTEnsemble, dict(num_devices=4, embed_dim=192, depth=12,
                                            num_heads=3, teacher_dim=1024), kwargs)
