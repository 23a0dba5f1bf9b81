"""Objective terms: each one a named, configurable piece of a training loss.

A term reads what the train step produced (`StepOutputs`: student logits and
intermediates, targets, the frozen teacher's outputs) plus its own learned
parameters (e.g. a feature projection, trained with the student and dropped at
export), and returns ``(loss, metrics)``. `vit_edge.objectives.create_objective`
sums the terms named in ``config.objective.name`` ("hard_token+relation").

Adding an objective (a mixture-of-experts balance loss, segmentation CE, DeViT's
ensemble loss) is one more class here and one entry in `TERMS`; the train step and
the metric classes stay as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vit_edge.objectives import losses

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StepOutputs:
  """What one forward pass of the train step hands to the objective.

  logits: student logits [B, C] (or [B, H, W, C] for dense models), float32.
  aux: the student's named intermediates (``model.apply`` second output).
  targets: one-hot (mixup / cutmix / label-smoothed) targets [B, C].
  teacher_logits, teacher_aux: the frozen teacher's outputs on its view of the
    same (mixed) images; None without a teacher.
  """
  logits: jax.Array
  aux: dict[str, jax.Array]
  targets: jax.Array
  teacher_logits: Optional[jax.Array] = None
  teacher_aux: Optional[dict[str, jax.Array]] = None


class Term:
  """Base class: no teacher, no parameters, no model changes."""

  name = ""
  needs_teacher = False
  uses_teacher_logits = False  # Then the teacher must have the student's classes.

  def metric_names(self) -> tuple[str, ...]:
    return (f"{self.name}_loss",)

  def adapt_student(self, model: nn.Module) -> nn.Module:
    """The student model this term needs (e.g. one that returns q/k/v in aux)."""
    return model

  def adapt_teacher(self, model: nn.Module) -> nn.Module:
    return model

  def init_params(self, rng: jax.Array, student_aux: Any, teacher_aux: Any) -> Params:
    """Learned parameters of the term, from the abstract aux shapes; {} for most."""
    del rng, student_aux, teacher_aux
    return {}

  def __call__(self, out: StepOutputs, params: Params
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    raise NotImplementedError


def _two_heads(out: StepOutputs) -> tuple[jax.Array, jax.Array]:
  """(class-token logits, distillation-token logits); a one-head model gives both."""
  aux = out.aux
  if "logits_cls" in aux and "logits_dist" in aux:
    return aux["logits_cls"].astype(jnp.float32), aux["logits_dist"].astype(jnp.float32)
  return out.logits, out.logits


class CrossEntropy(Term):
  """Label cross-entropy on the model's logits (the default objective)."""

  name = "cross_entropy"

  def __init__(self, config: ml_collections.ConfigDict):
    del config

  def __call__(self, out, params):
    loss = losses.cross_entropy(out.logits, out.targets)
    return loss, {f"{self.name}_loss": loss}


class SoftKD(Term):
  """``(1-alpha) CE(z, y) + alpha tau^2 KL(softmax(z_T/tau) || softmax(z_S/tau))``.

  A distilled DeiT puts CE on its class head and KD on its distillation head
  (DeiT's soft variant); any other model uses its one logits for both.
  """

  name = "soft_kd"
  needs_teacher = True
  uses_teacher_logits = True

  def __init__(self, config: ml_collections.ConfigDict):
    self.alpha = float(config.alpha)
    self.tau = float(config.tau)

  def __call__(self, out, params):
    z_cls, z_dist = _two_heads(out)
    ce = losses.cross_entropy(z_cls, out.targets)
    kd = losses.soft_kd(z_dist, out.teacher_logits, self.tau)
    loss = (1.0 - self.alpha) * ce + self.alpha * kd
    return loss, {f"{self.name}_loss": loss, "kd_kl": kd}


class HardToken(Term):
  """DeiT hard-token distillation: ``(1-a) CE(z_cls, y) + a CE(z_dist, argmax z_T)``."""

  name = "hard_token"
  needs_teacher = True
  uses_teacher_logits = True

  def __init__(self, config: ml_collections.ConfigDict):
    self.alpha = float(config.alpha)

  def __call__(self, out, params):
    z_cls, z_dist = _two_heads(out)
    ce = losses.cross_entropy(z_cls, out.targets)
    hard = losses.hard_label_ce(z_dist, out.teacher_logits)
    loss = (1.0 - self.alpha) * ce + self.alpha * hard
    return loss, {f"{self.name}_loss": loss, "hard_ce": hard}


def _as_tokens(x: jax.Array) -> jax.Array:
  """[B, D] -> [B, 1, D]; [B, H, W, C] -> [B, H*W, C]; [B, N, D] unchanged."""
  if x.ndim == 2:
    return x[:, None, :]
  if x.ndim == 4:
    return x.reshape(x.shape[0], -1, x.shape[-1])
  return x


class Feature(Term):
  """``weight * MSE(P(student feature), teacher feature)`` between two aux entries.

  P is learned (trained with the student, dropped at export): a linear map over the
  token axis when token counts differ and over the width when widths differ;
  identity when both agree. Spatial maps count as tokens (H*W).
  """

  name = "feature"
  needs_teacher = True

  def __init__(self, config: ml_collections.ConfigDict):
    self.student_key = config.feature.student
    self.teacher_key = config.feature.teacher
    self.weight = float(config.feature.weight)

  def _check(self, student_aux, teacher_aux) -> None:
    for who, aux, key in (("student", student_aux, self.student_key),
                          ("teacher", teacher_aux, self.teacher_key)):
      if key not in aux:
        raise ValueError(
            f"config.objective.feature.{who}={key!r} is not an intermediate of the "
            f"{who}; it returns {sorted(aux)}.")

  def init_params(self, rng, student_aux, teacher_aux):
    self._check(student_aux, teacher_aux)
    s = _as_tokens(jnp.zeros(student_aux[self.student_key].shape)).shape
    t = _as_tokens(jnp.zeros(teacher_aux[self.teacher_key].shape)).shape
    token_rng, width_rng = jax.random.split(rng)
    params = {}
    if s[1] != t[1]:
      params["token_kernel"] = (jax.random.normal(token_rng, (s[1], t[1]))
                                / jnp.sqrt(float(s[1])))
    if s[2] != t[2]:
      params["kernel"] = (jax.random.normal(width_rng, (s[2], t[2]))
                          / jnp.sqrt(float(s[2])))
      params["bias"] = jnp.zeros((t[2],))
    return params

  def __call__(self, out, params):
    student = _as_tokens(out.aux[self.student_key].astype(jnp.float32))
    teacher = _as_tokens(out.teacher_aux[self.teacher_key].astype(jnp.float32))
    if "token_kernel" in params:
      student = jnp.einsum("bnd,nm->bmd", student, params["token_kernel"])
    if "kernel" in params:
      student = student @ params["kernel"] + params["bias"]
    mse = losses.mse(student, teacher)
    loss = self.weight * mse
    return loss, {f"{self.name}_loss": loss}


class Relation(Term):
  """Token-relation (Q/K/V) distillation at one block of each ViT (DeViT / MiniLM).

  ``sum_X g_X KL(R_T^X || R_S^X)`` with ``R = rowsoftmax(X X^T / sqrt(d_h))`` at
  block ``depth // 2 - 1`` of each model by default. The reference divides the sum
  by the depth although it uses one block; here the weights apply as given, so
  ``relation.weights`` is the effective scale. When the models have different
  prefix tokens (a distilled DeiT and a ViT), only the patch tokens are related.
  """

  name = "relation"
  needs_teacher = True

  def __init__(self, config: ml_collections.ConfigDict):
    self.student_block = config.relation.student_block
    self.teacher_block = config.relation.teacher_block
    self.weights = tuple(float(w) for w in config.relation.weights)
    if len(self.weights) != 3:
      raise ValueError(f"config.objective.relation.weights={self.weights} must hold "
                       "three weights (Q, K, V), e.g. (0.2, 0.1, 0.3).")
    self._prefix = {"student": 0, "teacher": 0}  # Set by adapt_student/teacher.

  def metric_names(self):
    return (f"{self.name}_loss", "relation_q", "relation_k", "relation_v")

  @staticmethod
  def _with_qkv(model: nn.Module, block: Optional[int], who: str) -> nn.Module:
    if not hasattr(model, "qkv_block") or not hasattr(model, "depth"):
      raise ValueError(
          f"Relation distillation needs a ViT/DeiT {who} (a model with transformer "
          f"blocks that return q/k/v); got {type(model).__name__}. Use the "
          "'feature' or 'soft_kd' objective for other families.")
    return model.clone(qkv_block=model.depth // 2 - 1 if block is None else block)

  def adapt_student(self, model):
    model = self._with_qkv(model, self.student_block, "student")
    self._prefix["student"] = model.num_prefix_tokens
    return model

  def adapt_teacher(self, model):
    model = self._with_qkv(model, self.teacher_block, "teacher")
    self._prefix["teacher"] = model.num_prefix_tokens
    return model

  def _tokens(self, aux: dict[str, jax.Array], who: str, same_prefix: bool
              ) -> dict[str, jax.Array]:
    """q/k/v of every token, or of the patch tokens only when the prefixes differ."""
    start = 0 if same_prefix else self._prefix[who]
    return {k: aux[k][:, :, start:].astype(jnp.float32) for k in ("q", "k", "v")}

  def __call__(self, out, params):
    same_prefix = self._prefix["student"] == self._prefix["teacher"]
    student = self._tokens(out.aux, "student", same_prefix)
    teacher = self._tokens(out.teacher_aux, "teacher", same_prefix)
    loss, parts = losses.qkv_relation(student, teacher, self.weights)
    metrics = {f"relation_{k}": v for k, v in parts.items()}
    metrics[f"{self.name}_loss"] = loss
    return loss, metrics


class LogitMap(Term):
  """``weight * MSE(z_S, z_T)`` on pre-softmax logits; dense maps are compared at
  the larger of the two resolutions (bilinear upsampling, as efficient-vit)."""

  name = "logit_map"
  needs_teacher = True
  uses_teacher_logits = True

  def __init__(self, config: ml_collections.ConfigDict):
    self.weight = float(config.logit_map_weight)

  def __call__(self, out, params):
    student, teacher = out.logits, out.teacher_logits.astype(jnp.float32)
    if student.ndim == 4 and student.shape[1:3] != teacher.shape[1:3]:
      size = max(student.shape[1], teacher.shape[1]), max(student.shape[2],
                                                          teacher.shape[2])
      student = jax.image.resize(student, student.shape[:1] + size + student.shape[3:],
                                 "bilinear")
      teacher = jax.image.resize(teacher, teacher.shape[:1] + size + teacher.shape[3:],
                                 "bilinear")
    mse = losses.mse(student, teacher)
    loss = self.weight * mse
    return loss, {f"{self.name}_loss": loss}


# Dense terms subclass Term, so they are imported once it exists.
from vit_edge.objectives.dense import PixelCrossEntropy  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from vit_edge.objectives.ensemble import EnsembleTokenMatch  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

TERMS: dict[str, type[Term]] = {
    cls.name: cls for cls in (CrossEntropy, SoftKD, HardToken, Feature, Relation,
                              LogitMap, PixelCrossEntropy, EnsembleTokenMatch)}

# Mixture-of-experts balance losses (moe_importance, moe_load, moe_switch, moe_z):
# their module subclasses Term, so it is imported once Term exists.
from vit_edge.objectives import balance  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
TERMS.update({cls.name: cls for cls in balance.BALANCE_TERMS})
