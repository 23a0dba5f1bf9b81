"""Mixture-of-experts balance losses as objective terms.

Each routed layer (`vit_edge.models.moe.MoeFfn`) returns its router logits and
choices in the model's ``aux`` (``"<layer>/moe_*"``); these terms read them, so the
train step needs no change. Combine them with the label loss by name::

    --config.objective.name=cross_entropy+moe_importance+moe_load

Losses (all per image, the routing group, then averaged over images and summed
over the routed layers; weights from ``config.objective.moe``):

* ``moe_importance`` (V-MoE): ``CV(sum_tokens softmax(logits))^2`` with
  ``CV = std / mean`` over experts, on the noise-free router probabilities (as
  ``vmoe/nn/routing.py``); weight 0.005.
* ``moe_load`` (V-MoE, Shazeer et al.): the probability that expert e would stay
  among a token's top K if the noise were redrawn,
  ``p = 1 - Phi((threshold - logit_e) / noise_std)`` with threshold the token's
  K-th largest noisy logit; ``CV(mean_tokens p)^2``; weight 0.005. Needs the
  training noise (0 when ``noise_scale`` is 0).
* ``moe_switch`` (Switch Transformer): ``E sum_e f_e P_e``, f_e the fraction of
  tokens whose first choice is e, P_e the mean routing probability; weight 0.01.
* ``moe_z`` (ST-MoE router z-loss): ``mean(logsumexp(logits)^2)``; weight 0.001.

Every term also logs ``moe_dropped_rate`` (the fraction of token choices that
found no slot) and ``moe_max_load`` (the largest expert's share of the routed
tokens, 1/E when balanced), averaged over layers; TensorBoard shows them as
``train/moe_*``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vit_edge.models import moe
from vit_edge.objectives import terms as terms_lib

DEFAULT_WEIGHTS = {"importance": 0.005, "load": 0.005, "switch": 0.01, "z": 0.001}
ROUTING_METRICS = ("moe_dropped_rate", "moe_max_load")


def _cv_squared(x: jax.Array) -> jax.Array:
  """``var / mean^2`` over the last axis (V-MoE's form: no sqrt, finite gradient)."""
  return jnp.var(x, axis=-1) / jnp.mean(x, axis=-1) ** 2


def importance_loss(logits: jax.Array) -> jax.Array:
  """V-MoE importance loss of router logits [B, S, E], averaged over images."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(_cv_squared(jnp.sum(probs, axis=1)))


def load_loss(logits: jax.Array, noisy_logits: jax.Array, noise_std: jax.Array,
              expert: jax.Array) -> jax.Array:
  """V-MoE load loss; `expert` [B, S, K] the chosen experts (K-th = threshold)."""
  logits = logits.astype(jnp.float32)
  noisy_logits = noisy_logits.astype(jnp.float32)
  threshold = jnp.take_along_axis(noisy_logits, expert[..., -1:], axis=-1)
  # Guard the eval case (no noise): the loss is undefined there, report 0.
  safe_std = jnp.where(noise_std > 0, noise_std, 1.0)
  p = 1.0 - jax.scipy.stats.norm.cdf((threshold - logits) / safe_std)
  return jnp.where(noise_std > 0, jnp.mean(_cv_squared(jnp.mean(p, axis=1))), 0.0)


def switch_loss(noisy_logits: jax.Array, expert: jax.Array) -> jax.Array:
  """Switch Transformer balance loss ``E sum_e f_e P_e``, averaged over images."""
  num_experts = noisy_logits.shape[-1]
  probs = jax.nn.softmax(noisy_logits.astype(jnp.float32), axis=-1)
  fraction = jnp.mean(jax.nn.one_hot(expert[..., 0], num_experts), axis=1)
  return jnp.mean(num_experts * jnp.sum(fraction * jnp.mean(probs, axis=1), -1))


def z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss ``mean(logsumexp(logits)^2)``."""
  return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2)


def routing_metrics(aux: dict[str, Any]) -> dict[str, jax.Array]:
  """Dropped-choice rate and largest expert share, averaged over the layers."""
  layers = moe.routed_layers(aux)
  dropped, max_load = [], []
  for layer in layers:
    dropped.append(1.0 - jnp.mean(aux[f"{layer}/moe_kept"]))
    load = jnp.sum(aux[f"{layer}/moe_expert_load"], axis=0)
    max_load.append(jnp.max(load) / jnp.maximum(jnp.sum(load), 1.0))
  return {"moe_dropped_rate": jnp.mean(jnp.stack(dropped)),
          "moe_max_load": jnp.mean(jnp.stack(max_load))}


class _BalanceTerm(terms_lib.Term):
  """Base: sums one loss over the routed layers of the student's aux."""

  loss_key = ""  # Key of DEFAULT_WEIGHTS and of config.objective.moe.

  def __init__(self, config: ml_collections.ConfigDict):
    weights = dict(DEFAULT_WEIGHTS)
    moe_config = config.get("moe", None)
    if moe_config is not None:
      weights.update({k: float(v) for k, v in moe_config.items()
                      if k in DEFAULT_WEIGHTS})
    self.weight = weights[self.loss_key]

  def metric_names(self):
    return (f"{self.name}_loss",) + ROUTING_METRICS

  def layer_loss(self, aux: dict[str, Any], layer: str) -> jax.Array:
    raise NotImplementedError

  def __call__(self, out, params):
    layers = moe.routed_layers(out.aux)
    if not layers:
      raise ValueError(
          f"config.objective.name includes {self.name!r} but the model returns no "
          "mixture-of-experts routing in aux (no '<layer>/moe_expert' key); use a "
          "routed model such as mobilevitv2_moe_xs, or drop the term.")
    raw = sum(self.layer_loss(out.aux, layer) for layer in layers)
    loss = self.weight * raw
    return loss, {f"{self.name}_loss": loss, **routing_metrics(out.aux)}


class ImportanceLoss(_BalanceTerm):
  name = "moe_importance"
  loss_key = "importance"

  def layer_loss(self, aux, layer):
    return importance_loss(aux[f"{layer}/moe_router_logits"])


class LoadLoss(_BalanceTerm):
  name = "moe_load"
  loss_key = "load"

  def layer_loss(self, aux, layer):
    return load_loss(aux[f"{layer}/moe_router_logits"],
                     aux[f"{layer}/moe_router_logits_noisy"],
                     aux[f"{layer}/moe_noise_std"], aux[f"{layer}/moe_expert"])


class SwitchLoss(_BalanceTerm):
  name = "moe_switch"
  loss_key = "switch"

  def layer_loss(self, aux, layer):
    return switch_loss(aux[f"{layer}/moe_router_logits_noisy"],
                       aux[f"{layer}/moe_expert"])


class ZLoss(_BalanceTerm):
  name = "moe_z"
  loss_key = "z"

  def layer_loss(self, aux, layer):
    return z_loss(aux[f"{layer}/moe_router_logits"])


BALANCE_TERMS = (ImportanceLoss, LoadLoss, SwitchLoss, ZLoss)


def default_config() -> ml_collections.ConfigDict:
  """``config.objective.moe``: the weight of each balance term."""
  return ml_collections.ConfigDict(dict(DEFAULT_WEIGHTS))
