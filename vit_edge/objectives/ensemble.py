"""DeViT's ensemble distillation (DEKD): the fused tokens matched to the teacher's.

DeViT's ensemble loss (falcon-xu/DeViT ``ensemble.py``) is
``MSE(P(concat device tokens), teacher's final token) + (1-a) CE + a CE(argmax z_T)``.
The projection P (the feature-matching ``Linear(N*d -> d_teacher)``) is part of
the ensemble model (:class:`vit_edge.devit.ensemble.DeViTEnsemble`, aux
``fused_tokens`` [B, P, d_teacher]); this term is the MSE part, and the existing
``hard_token`` term the two cross-entropies, so the ensemble trains with
``config.objective.name = "hard_token+dekd_feature"``.

The teacher is the large model trained on all classes. Branch p of the ensemble
(cls, dist) is matched to the teacher's final prefix token p, or to its class
token when the teacher has fewer prefix tokens (a plain ViT teacher of a DeDeiT
ensemble, the paper's ViT-L/16 setting); a teacher without tokens (a CNN) is
matched through its ``pre_logits``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from vit_edge.objectives import losses
from vit_edge.objectives.terms import Term

STUDENT_KEY = "fused_tokens"


class EnsembleTokenMatch(Term):
  """``weight * MSE(fused_tokens, teacher's final prefix token(s))``."""

  name = "dekd_feature"
  needs_teacher = True

  def __init__(self, config: ml_collections.ConfigDict):
    self.weight = float(config.get("dekd_weight", 1.0))
    self._teacher_prefix = 1

  def adapt_teacher(self, model):
    self._teacher_prefix = int(getattr(model, "num_prefix_tokens", 1))
    return model

  def _teacher_tokens(self, teacher_aux, num_branches: int) -> jax.Array:
    # A ViT teacher's prefix tokens alone leave its patch tokens' last block unused.
    tokens = teacher_aux.get("prefix_tokens", teacher_aux.get("tokens"))
    if tokens is not None:
      index = [min(p, self._teacher_prefix - 1) for p in range(num_branches)]
      return tokens[:, jnp.asarray(index)]
    pre = teacher_aux["pre_logits"]
    return jnp.broadcast_to(pre[:, None], (pre.shape[0], num_branches, pre.shape[-1]))

  def init_params(self, rng, student_aux, teacher_aux):
    del rng
    if STUDENT_KEY not in student_aux:
      raise ValueError(
          f"The 'dekd_feature' objective needs a DeViT ensemble student (aux "
          f"{STUDENT_KEY!r}); the student returns {sorted(student_aux)}. Use "
          "--config.model=devit_tiny_patch16 (configs/devit/ensemble.py).")
    if "tokens" not in teacher_aux and "pre_logits" not in teacher_aux:
      raise ValueError("The 'dekd_feature' teacher returns neither 'tokens' nor "
                       f"'pre_logits' (it has {sorted(teacher_aux)}).")
    student_width = student_aux[STUDENT_KEY].shape[-1]
    teacher = teacher_aux.get("tokens", teacher_aux.get("pre_logits"))
    if student_width != teacher.shape[-1]:
      raise ValueError(
          f"The ensemble projects to teacher_dim={student_width} but the teacher's "
          f"tokens are {teacher.shape[-1]} wide; set "
          f"--config.model_overrides.teacher_dim={teacher.shape[-1]}.")
    return {}

  def __call__(self, out, params):
    student = out.aux[STUDENT_KEY].astype(jnp.float32)
    teacher = self._teacher_tokens(out.teacher_aux, student.shape[1])
    mse = losses.mse(student, teacher.astype(jnp.float32))
    loss = self.weight * mse
    return loss, {f"{self.name}_loss": loss}
