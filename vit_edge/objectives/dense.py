"""Dense (per-pixel) objective terms: segmentation cross-entropy with an ignore index.

The train step hands every term one-hot targets; for a segmentation batch they are
``[B, H, W, C]`` (`vit_edge.augment.mixup_cutmix` one-hots the integer mask), and a
pixel whose label is the ignore index (255, outside ``0..C-1``) has an all-zero
target row. So "ignored" needs no extra input: a pixel counts when its target row
sums to more than one half (label smoothing keeps that true for labelled pixels).

Logit-map distillation from a segmentation teacher is the existing ``logit_map``
term; joined with this one: ``config.objective.name="pixel_cross_entropy+logit_map"``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from vit_edge.export.serving import resize_bilinear
from vit_edge.objectives import terms

# mmsegmentation's defaults: auxiliary FCN head weight 0.4; OHEM keeps pixels whose
# true-class probability is below 0.7, and at least min_kept of the hardest.
DEFAULT_PIXEL_CE = {"aux_weight": 0.4, "ohem_thresh": 0.0, "ohem_min_kept": 10_000}


def pixel_cross_entropy(logits: jax.Array, targets: jax.Array, *,
                        ohem_thresh: float = 0.0, ohem_min_kept: int = 0
                        ) -> tuple[jax.Array, jax.Array]:
  """(mean CE over the counted pixels, fraction of labelled pixels counted).

  Args:
    logits: [B, h, w, C]; resized bilinearly to the targets' size when it differs.
    targets: [B, H, W, C] (soft) one-hot targets; all-zero rows are ignored.
    ohem_thresh: > 0 turns on online hard example mining (mmsegmentation's
      OHEMPixelSampler): only pixels whose softmax probability of the target class
      is at most ``max(ohem_thresh, p_k)`` count, where ``p_k`` is the
      ``ohem_min_kept``-th smallest such probability in the batch.
    ohem_min_kept: pixels always kept by OHEM (the hardest ones).

  Example::

      loss, kept = pixel_cross_entropy(logits, jax.nn.one_hot(mask, 14))
  """
  logits = resize_bilinear(logits.astype(jnp.float32), targets.shape[1],
                           targets.shape[2])
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  mass = jnp.sum(targets, axis=-1)
  labelled = mass > 0.5
  ce = -jnp.sum(targets * log_probs, axis=-1)
  counted = labelled
  if ohem_thresh > 0:
    true_prob = jnp.exp(jnp.sum(targets * log_probs, axis=-1) / jnp.maximum(mass, 1e-6))
    true_prob = jax.lax.stop_gradient(true_prob)
    # Unlabelled pixels sort last; the k-th smallest labelled probability.
    ranked = jnp.sort(jnp.where(labelled, true_prob, 2.0).ravel())
    k = min(max(int(ohem_min_kept), 1), ranked.shape[0]) - 1
    threshold = jnp.maximum(ohem_thresh, ranked[k])
    counted = labelled & (true_prob <= threshold)
  count = jnp.sum(counted)
  loss = jnp.sum(jnp.where(counted, ce, 0.0)) / jnp.maximum(count, 1)
  kept = count / jnp.maximum(jnp.sum(labelled), 1)
  return loss, kept.astype(jnp.float32)


class PixelCrossEntropy(terms.Term):
  """Per-pixel CE on ``logits`` (+ ``aux_weight`` x CE on ``aux["aux_logits"]``).

  Config (``config.objective.pixel_ce``, defaults `DEFAULT_PIXEL_CE`):
  ``aux_weight`` (the auxiliary head's weight when the model has one),
  ``ohem_thresh`` (0 is off) and ``ohem_min_kept``.
  """

  name = "pixel_cross_entropy"

  def __init__(self, config: ml_collections.ConfigDict):
    options = dict(DEFAULT_PIXEL_CE, **dict(config.get("pixel_ce", {})))
    unknown = sorted(set(options) - set(DEFAULT_PIXEL_CE))
    if unknown:
      raise ValueError(f"config.objective.pixel_ce has unknown fields {unknown}; "
                       f"expected {sorted(DEFAULT_PIXEL_CE)}.")
    self.aux_weight = float(options["aux_weight"])
    self.ohem_thresh = float(options["ohem_thresh"])
    self.ohem_min_kept = int(options["ohem_min_kept"])

  def metric_names(self):
    return (f"{self.name}_loss", "pixels_counted")

  def __call__(self, out, params):
    if out.targets.ndim != 4:
      raise ValueError(
          f"pixel_cross_entropy needs per-pixel targets [B, H, W, C]; got shape "
          f"{out.targets.shape}. Train it on a segmentation data set (config.dataset="
          "'seg:embedded' or 'seg:folder') with a segmentation model (e.g. "
          "upernet_edgevit_xxs).")
    loss, kept = pixel_cross_entropy(out.logits, out.targets,
                                     ohem_thresh=self.ohem_thresh,
                                     ohem_min_kept=self.ohem_min_kept)
    if self.aux_weight > 0 and "aux_logits" in out.aux:
      aux_loss, _ = pixel_cross_entropy(out.aux["aux_logits"], out.targets,
                                        ohem_thresh=self.ohem_thresh,
                                        ohem_min_kept=self.ohem_min_kept)
      loss = loss + self.aux_weight * aux_loss
    return loss, {f"{self.name}_loss": loss, "pixels_counted": kept}
