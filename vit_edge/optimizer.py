"""Optimizer: AdamW with linear warm-up + cosine decay, a weight-decay mask,
gradient clipping, and an EMA of the parameters.

Example::

    tx, schedule = create_optimizer(config.optim, num_train_steps=10_000)
    opt_state = tx.init(params)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Parameters that are never decayed (timm / DeiT convention): every bias, every
# norm scale, position embeddings, class/distillation tokens, layer-scale gammas.
_NO_DECAY_NAMES = ("bias", "scale", "pos_embed", "cls_token", "dist_token",
                   "layer_scale", "gamma")


def decay_mask(params: Any) -> Any:
  """Pytree of bools: True where weight decay applies (kernels / embeddings of rank >= 2).

  Example: ``decay_mask({"dense": {"kernel": w, "bias": b}}) == {"dense":
  {"kernel": True, "bias": False}}``.
  """

  def is_decayed(path, leaf) -> bool:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if any(any(tag in n for tag in _NO_DECAY_NAMES) for n in names):
      return False
    return leaf.ndim >= 2

  return jax.tree_util.tree_map_with_path(is_decayed, params)


def create_schedule(config: ml_collections.ConfigDict,
                    num_train_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to config.lr, then cosine to config.min_lr."""
  warmup = min(int(config.warmup_steps), max(num_train_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
      decay_steps=max(num_train_steps, warmup + 1), end_value=config.min_lr)


def create_optimizer(config: ml_collections.ConfigDict, num_train_steps: int):
  """Returns (optax transformation, learning-rate schedule).

  config fields: lr, min_lr, warmup_steps, weight_decay, b1, b2, grad_clip_norm
  (0 = off).
  """
  schedule = create_schedule(config, num_train_steps)
  chain = []
  if config.grad_clip_norm and config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=config.b1, b2=config.b2,
                           weight_decay=config.weight_decay, mask=decay_mask))
  return optax.chain(*chain), schedule


def ema_update(ema_params: Any, params: Any, decay: float) -> Any:
  """One step of the exponential moving average: ema <- decay * ema + (1 - decay) * p."""
  return jax.tree_util.tree_map(
      lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema_params, params)


def global_norm(tree: Any) -> jax.Array:
  """L2 norm over all leaves, in float32."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree_util.tree_leaves(tree)))
