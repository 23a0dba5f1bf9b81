"""The exact GELU (erfc polynomial with ``select`` ops) as a fused tanh GELU or rational erf.

JAX lowers ``jax.nn.gelu(approximate=False)`` to a polynomial erfc with
``select`` ops (43 XNNPACK partitions and 2.7x the latency for edgevit_xxs). With
``gelu="tanh"`` it becomes the tanh form that the converter fuses into one
TFLite ``GELU`` op (|error| <= 4.8e-4 per activation); with ``gelu="exact"``, or
for any other erf/erfc, a clamped rational erf of XNNPACK-supported ops
(|error| < 1e-6).
"""

from __future__ import annotations

import math

from vit_edge.export.passes import base

# Eigen's float erf: x clamped to [-4, 4], an odd rational polynomial; the error
# is below 2e-7 everywhere and only min/max/mul/add/div are needed.
_ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
              -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
              -1.60960333262415e-02)
_ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
             -7.37332916720468e-03, -1.42647390514189e-02)


def erf_rational(x):
  """erf(x) to 2e-7 with clip, mul, add and div only (Eigen's float erf)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.clip(x, -4.0, 4.0)
  x2 = x * x
  p = x2 * _ERF_ALPHA[0] + _ERF_ALPHA[1]
  for a in _ERF_ALPHA[2:]:
    p = p * x2 + a
  q = x2 * _ERF_BETA[0] + _ERF_BETA[1]
  for b in _ERF_BETA[2:]:
    q = q * x2 + b
  return x * p / q


def _one_plus_tanh_gelu(x):
  """1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)), spelled as the converter fuses it.

  With the surrounding ``(0.5 * x) * (...)`` of jax.nn.gelu this is one of the
  tanh-GELU patterns of TFLite's optimizer (``x * x * x``, not ``integer_pow``
  or a coefficient-first product), which becomes a single ``GELU`` op.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return 1.0 + jnp.tanh(0.7978845608028654 * (x + 0.044715 * (x * x * x)))


def _exact_gelu_input(atom, ctx: base.Context):
  """x when `atom` is ``neg(x) * sqrt(1/2)``, as jax.nn.gelu(approximate=False) has it."""
  mul = ctx.producer(atom, "mul")
  if mul is None:
    return None
  for i in (0, 1):
    value = base.literal_scalar(mul.invars[1 - i])
    if value is not None and abs(value - math.sqrt(0.5)) < 1e-6:
      neg = ctx.producer(mul.invars[i], "neg")
      if neg is not None:
        return neg.invars[0]
  return None


def _apply(eqn, invals, ctx: base.Context):
  (x,) = invals
  if eqn.primitive.name == "erf":
    return erf_rational(x).astype(x.dtype)
  gelu_input = _exact_gelu_input(eqn.invars[0], ctx)
  if ctx.options.gelu == "tanh" and gelu_input is not None:
    # erfc(-x / sqrt 2) = 1 + erf(x / sqrt 2) ~ 1 + tanh(...).
    return _one_plus_tanh_gelu(ctx.read(gelu_input)).astype(x.dtype)
  return (1.0 - erf_rational(x)).astype(x.dtype)


PASS = base.Pass("gelu", frozenset({"erf", "erfc"}), _apply)
