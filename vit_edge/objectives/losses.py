"""Pure loss functions: every training objective's arithmetic, on arrays only.

Each function takes float32 arrays and returns a scalar (the batch mean). The
objective terms in `vit_edge.objectives.terms` combine them; the tests compare each
one with a direct numpy computation. Formulas and references:
../shared/reference/methods.md section 1.

Example::

    loss = soft_kd(student_logits, teacher_logits, tau=4.0)
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean CE against (possibly soft: mixup / label smoothing) one-hot targets [B, C]."""
  return optax.softmax_cross_entropy(logits, targets).mean()


def soft_kd(student_logits: jax.Array, teacher_logits: jax.Array,
            tau: float) -> jax.Array:
  """``tau^2 KL(softmax(z_T / tau) || softmax(z_S / tau))``, summed over classes.

  The tau^2 factor keeps the gradient scale independent of tau (Hinton et al.);
  averaged over the batch (DeiT's soft variant uses ``reduction='batchmean'``).
  """
  log_p_s = jax.nn.log_softmax(student_logits / tau, axis=-1)
  log_p_t = jax.nn.log_softmax(teacher_logits / tau, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return (tau ** 2) * kl.mean()


def hard_label_ce(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """DeiT hard distillation: CE of the student against ``argmax z_T`` (no sort)."""
  hard = jax.nn.one_hot(jnp.argmax(teacher_logits, axis=-1), student_logits.shape[-1],
                        dtype=student_logits.dtype)
  return cross_entropy(student_logits, hard)


def mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error over every element (feature and logit-map distillation)."""
  return jnp.mean(jnp.square(prediction - target))


def token_relation(x: jax.Array) -> jax.Array:
  """Row-softmax self-relation of one of Q / K / V, heads concatenated.

  Args:
    x: [B, heads, tokens, head_dim], as ViT's ``aux["q"]`` with ``qkv_block`` set.

  Returns:
    log of ``rowsoftmax(X X^T / sqrt(head_dim))`` with X = [B, tokens, heads*head_dim]
    (DeViT / MiniLM-v2); [B, tokens, tokens].
  """
  head_dim = x.shape[-1]
  b, h, n, d = x.shape
  flat = jnp.transpose(x, (0, 2, 1, 3)).reshape(b, n, h * d)
  scores = jnp.einsum("bnd,bmd->bnm", flat, flat) / jnp.sqrt(float(head_dim))
  return jax.nn.log_softmax(scores, axis=-1)


def relation_kl(student_x: jax.Array, teacher_x: jax.Array) -> jax.Array:
  """``KL(R_T || R_S)`` summed over rows and columns, averaged over the batch.

  Student and teacher may differ in width and heads (relations are tokens x tokens)
  but must have the same number of tokens.
  """
  if student_x.shape[2] != teacher_x.shape[2]:
    raise ValueError(
        f"Relation distillation needs the same number of tokens in student and "
        f"teacher; got {student_x.shape[2]} and {teacher_x.shape[2]}. Use the same "
        "patch grid (image size / patch size) and prefix tokens for both models.")
  log_r_s = token_relation(student_x)
  log_r_t = token_relation(teacher_x)
  kl = jnp.sum(jnp.exp(log_r_t) * (log_r_t - log_r_s), axis=(-2, -1))
  return kl.mean()


def qkv_relation(student: dict[str, jax.Array], teacher: dict[str, jax.Array],
                 weights: Sequence[float]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum of the Q, K and V relation KLs; also returns each KL by name."""
  parts = {name: relation_kl(student[name], teacher[name]) for name in ("q", "k", "v")}
  total = sum(w * parts[name] for w, name in zip(weights, ("q", "k", "v")))
  return total, parts
