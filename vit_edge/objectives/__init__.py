"""Training objectives: one seam between the train step and every loss.

``config.objective.name`` names one term or several joined by ``+``; the loss is
their sum. Terms (`vit_edge.objectives.terms`):

* ``cross_entropy``: label CE (the default).
* ``soft_kd``: ``(1-alpha) CE + alpha tau^2 KL(teacher || student)``.
* ``hard_token``: DeiT ``(1-alpha) CE(z_cls, y) + alpha CE(z_dist, argmax z_T)``.
* ``feature``: ``weight * MSE(P(student aux), teacher aux)``, P learned.
* ``relation``: DeViT/MiniLM Q/K/V relation KL at one block of each ViT.
* ``logit_map``: ``weight * MSE`` of student and teacher logits (dense maps too).

A term that needs a teacher reads it from ``config.teacher.workdir`` (see
`vit_edge.objectives.teacher`). The train step calls only `Objective.teacher_outputs`
and `Objective.__call__`, and logs whatever metrics the objective names.

Example::

    python -m vit_edge.main --config=configs/distill/deit_tiny_hard_token.py \
        --config.teacher.workdir=workdir/teacher --workdir=workdir/deit_hard
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vit_edge.objectives import losses
from vit_edge.objectives import teacher as teacher_lib
from vit_edge.objectives.terms import StepOutputs
from vit_edge.objectives.terms import Term
from vit_edge.objectives.terms import TERMS

__all__ = ["Objective", "StepOutputs", "Term", "TERMS", "create_objective",
           "default_config", "label_only", "losses"]


def default_config() -> ml_collections.ConfigDict:
  """``config.objective`` and ``config.teacher`` fields with their defaults."""
  objective = ml_collections.ConfigDict({
      "name": "cross_entropy",
      "alpha": 0.5,   # soft_kd / hard_token: weight of the teacher term.
      "tau": 1.0,     # soft_kd temperature.
      "feature": {"student": "pre_logits", "teacher": "pre_logits", "weight": 1.0},
      "relation": {
          # None: block depth // 2 - 1 of each model (DeViT).
          "student_block": ml_collections.FieldReference(None, field_type=int),
          "teacher_block": ml_collections.FieldReference(None, field_type=int),
          "weights": (0.2, 0.1, 0.3),  # Q, K, V.
      },
      "logit_map_weight": 1.0,
  })
  teacher = ml_collections.ConfigDict({
      "workdir": "",  # A run directory (training or import_torch).
      "step": -1,     # -1: the newest checkpoint.
      "use_ema": True,
      # The teacher's logit columns the student's labels are, in order (empty:
      # the same classes); e.g. DeViT's sub-models taught by the full teacher.
      "classes": (),
  })
  return ml_collections.ConfigDict({"objective": objective, "teacher": teacher})


def parse_names(name: str) -> list[str]:
  """``"hard_token+relation"`` -> ["hard_token", "relation"], each checked."""
  names = [n.strip() for n in name.split("+") if n.strip()]
  unknown = [n for n in names if n not in TERMS]
  if not names or unknown:
    raise ValueError(
        f"config.objective.name={name!r}: unknown term(s) {unknown or [name]}; "
        f"choose from {sorted(TERMS)}, joined by '+' (e.g. 'hard_token+relation').")
  if len(set(names)) != len(names):
    raise ValueError(f"config.objective.name={name!r} repeats a term.")
  return names


@dataclasses.dataclass(frozen=True)
class TeacherOutputs:
  logits: jax.Array
  aux: dict[str, jax.Array]


class Objective:
  """The sum of the configured terms, with the (optional) frozen teacher.

  Build with `create_objective`; then `adapt_student` the model, call
  `bind_shapes` once, and use `init_params`, `teacher_outputs` and `__call__` in the
  train step.
  """

  def __init__(self, terms: Sequence[Term], teacher: Optional[teacher_lib.Teacher]):
    self.terms = tuple(terms)
    self.teacher = teacher
    self._student_aux: Any = None
    self._teacher_aux: Any = None

  @property
  def needs_teacher(self) -> bool:
    return any(t.needs_teacher for t in self.terms)

  def metric_names(self) -> tuple[str, ...]:
    names = ["loss", "accuracy"]
    for term in self.terms:
      names += [n for n in term.metric_names() if n not in names]
    return tuple(names)

  def adapt_student(self, model: nn.Module) -> nn.Module:
    for term in self.terms:
      model = term.adapt_student(model)
    return model

  def bind_shapes(self, student: nn.Module, image_size: int,
                  teacher_variables: Any) -> None:
    """Records the abstract aux trees that parameterised terms size themselves by."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(student.init, jax.random.key(0), x)
    logits, self._student_aux = jax.eval_shape(
        lambda v, x: student.apply(v, x, train=False), variables, x)
    if self.teacher is not None:
      t_logits, self._teacher_aux = jax.eval_shape(self.teacher, teacher_variables,
                                                   jnp.zeros(x.shape, x.dtype))
      if t_logits.shape[-1] != logits.shape[-1] and any(
          t.uses_teacher_logits for t in self.terms):
        raise ValueError(
            f"The teacher in config.teacher.workdir has {t_logits.shape[-1]} classes "
            f"but the student has {logits.shape[-1]}; logit distillation needs the same "
            "classes. Train the teacher on the student's data set, or use the "
            "'feature' or 'relation' objective.")

  def init_params(self, rng: jax.Array) -> dict[str, Any]:
    """Learned objective parameters (trained with the student, never exported)."""
    params = {}
    for term, term_rng in zip(self.terms, jax.random.split(rng, len(self.terms))):
      p = term.init_params(term_rng, self._student_aux, self._teacher_aux)
      if p:
        params[term.name] = p
    return params

  def teacher_outputs(self, teacher_variables: Any, images: jax.Array
                      ) -> Optional[TeacherOutputs]:
    if self.teacher is None:
      return None
    logits, aux = self.teacher(teacher_variables, images)
    return TeacherOutputs(logits, aux)

  def __call__(self, logits: jax.Array, aux: dict[str, jax.Array],
               targets: jax.Array, teacher: Optional[TeacherOutputs],
               params: dict[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total loss, metrics) of one batch; metrics are named by `metric_names`."""
    out = StepOutputs(logits=logits, aux=aux, targets=targets,
                      teacher_logits=None if teacher is None else teacher.logits,
                      teacher_aux=None if teacher is None else teacher.aux)
    total, metrics = 0.0, {}
    for term in self.terms:
      loss, term_metrics = term(out, params.get(term.name, {}))
      total = total + loss
      metrics.update(term_metrics)
    metrics["loss"] = total
    metrics["accuracy"] = label_accuracy(logits, targets)
    return total, metrics


def label_accuracy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Share of argmax hits among the rows that have a target.

  An all-zero target row (a segmentation pixel with the ignore label, see
  objectives/dense.py) is left out; every classification row has a target.
  """
  counted = (jnp.sum(targets, -1) > 0).astype(jnp.float32)
  hits = (jnp.argmax(logits, -1) == jnp.argmax(targets, -1)).astype(jnp.float32)
  return jnp.sum(hits * counted) / jnp.maximum(jnp.sum(counted), 1.0)


def label_only() -> Objective:
  """Plain cross-entropy and no teacher: what evaluation needs of any objective."""
  return Objective([TERMS["cross_entropy"](default_config().objective)], teacher=None)


def create_objective(config: ml_collections.ConfigDict, *, student_image_size: int,
                     student_mean: Sequence[float], student_std: Sequence[float]
                     ) -> tuple[Objective, Any]:
  """(Objective, teacher variables or {}) for a training config.

  Configs written before objectives existed train with cross-entropy.
  """
  defaults = default_config()
  objective_config = config.get("objective", defaults.objective)
  teacher_config = config.get("teacher", defaults.teacher)
  terms = [TERMS[name](objective_config) for name in parse_names(objective_config.name)]
  objective = Objective(terms, teacher=None)
  teacher_variables: Any = {}
  if objective.needs_teacher:
    step = teacher_config.step if teacher_config.step >= 0 else None
    teacher, teacher_variables = teacher_lib.load_teacher(
        teacher_config.workdir, student_image_size=student_image_size,
        student_mean=student_mean, student_std=student_std, step=step,
        use_ema=teacher_config.use_ema,
        classes=tuple(teacher_config.get("classes", ()) or ()))
    model = teacher.model
    for term in terms:
      model = term.adapt_teacher(model)
    objective = Objective(terms, dataclasses.replace(teacher, model=model))
  return objective, teacher_variables
