"""A weighted sum over tokens of a projection, as the projection of the weighted sum.

MobileViTv2's separable attention projects every token to a key, weights the
keys by the context scores (a softmax over the patches) and sums them into one
context vector per pixel position:

    sum_n s_n (x_n W + b) = (sum_n s_n x_n) W + b sum_n s_n

The left side is a product over all N patches (N * d * d MACs per pixel
position); the right side weights and sums the inputs (the same elementwise
work as weighting the keys) and projects one vector. The keys are a slice of
the fused query/key/value projection, so the other slices (query, value) are
taken from a product of their own columns only, and the fused product is left
dead for the converter to drop. That is 5% of the MACs of MobileViTv2-0.5 and
-1.0 at 256. Only the rounding changes.

The pattern: ``reduce_sum(mul(p, s), axes)`` where ``p`` is ``x @ W (+ b)`` or
a last-axis slice of it, ``s`` has one channel (it weights tokens, not
channels), the summed axes leave the channel axis alone, and the projection's
output is read only by such slices (so nothing else keeps it alive).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from vit_edge.export.passes import base
from vit_edge.export.passes import projection


@dataclasses.dataclass(frozen=True)
class _Plan:
  """How one projection's output is replaced.

  Attributes:
    dot: the projection's dot_general equation (``x @ W``).
    bias: the bias as a [channels] vector (zeros when there is none).
    kept: the (start, limit) column ranges read other than by weighted sums,
      computed as one narrower product, in this order.
  """

  dot: Any
  bias: np.ndarray
  kept: tuple


def _summed_by(var, ctx: base.Context):
  """(reduce_sum eqn, weights atom) when `var`'s one reader is a token-weighted sum."""
  if not ctx.used_once(var):
    return None
  (mul,) = ctx.consumers[var]
  if mul.primitive.name != "mul" or not ctx.used_once(mul.outvars[0]):
    return None
  (total,) = ctx.consumers[mul.outvars[0]]
  shape = var.aval.shape
  if (total.primitive.name != "reduce_sum" or len(shape) - 1 in total.params["axes"]
      or mul.outvars[0].aval.shape != shape):
    return None
  weights = mul.invars[1] if mul.invars[0] is var else mul.invars[0]
  w_shape = np.shape(weights.val) if base.is_literal(weights) else weights.aval.shape
  if (len(w_shape) != len(shape) or w_shape[-1] != 1
      or any(a not in (1, b) for a, b in zip(w_shape, shape))):
    return None
  return total, weights


def _make_plan(out, ctx: base.Context) -> Optional[_Plan]:
  if out in ctx.outputs:
    return None
  dot, bias = projection.product_and_bias(out, ctx)
  if dot is None or (bias is not None and not ctx.used_once(dot.outvars[0])):
    return None
  lhs, rhs = ctx.read(dot.invars[0]), ctx.read(dot.invars[1])
  if not projection.is_projection(dot, lhs, rhs):
    return None
  shape, channels = out.aval.shape, out.aval.shape[-1]
  vector = np.zeros(channels) if bias is None else base.channel_vector(bias, shape, channels)
  if vector is None:
    return None
  if _summed_by(out, ctx) is not None:
    return _Plan(dot, vector, ())
  kept, summed = [], False
  for reader in ctx.consumers.get(out, ()):
    columns = base.last_axis_range(reader) if reader.primitive.name == "slice" else None
    if columns is None:
      return None
    if _summed_by(reader.outvars[0], ctx) is not None:
      summed = True
    elif columns not in kept:
      kept.append(columns)
  return _Plan(dot, vector, tuple(kept)) if summed else None


def _plan(out, ctx: base.Context) -> Optional[_Plan]:
  key = ("weighted_sum_plan", out)
  if key not in ctx.cache:
    ctx.cache[key] = _make_plan(out, ctx)
  return ctx.cache[key]


def _kept_slice(eqn, ctx: base.Context):
  """A slice the weighted sums do not read, from the product of the kept columns."""
  if ctx.options.split_projections:  # sliced_projection gives each slice its product.
    return None
  out = eqn.invars[0]
  plan = _plan(out, ctx)
  columns = base.last_axis_range(eqn)
  if plan is None or columns not in plan.kept:
    return None
  key = ("weighted_sum_kept", out)
  if key not in ctx.cache:
    index = np.concatenate([np.arange(a, b) for a, b in plan.kept])
    x, kernel = ctx.read(plan.dot.invars[0]), np.asarray(ctx.read(plan.dot.invars[1]))
    ctx.cache[key] = (projection.project(plan.dot, x, kernel[:, index])
                      + plan.bias[index].astype(x.dtype))
  offset = sum(b - a for a, b in plan.kept[:plan.kept.index(columns)])
  kept = ctx.cache[key]
  return kept[..., offset:offset + columns[1] - columns[0]].astype(eqn.outvars[0].aval.dtype)


def _projected_sum(eqn, ctx: base.Context):
  """``reduce_sum(mul(x @ W[:, a:b] + b[a:b], s))`` from the weighted sum of x."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  mul = ctx.producer(eqn.invars[0], "mul")
  if mul is None:
    return None
  for var in mul.invars:
    summed = None if base.is_literal(var) else _summed_by(var, ctx)
    if summed is None:
      continue
    weights = summed[1]
    piece = ctx.producer(var, "slice")
    out, columns = ((piece.invars[0], base.last_axis_range(piece)) if piece is not None
                    else (var, (0, var.aval.shape[-1])))
    plan = _plan(out, ctx)
    if plan is None:
      continue
    axes = tuple(eqn.params["axes"])
    x, s = ctx.read(plan.dot.invars[0]), ctx.read(weights)
    kernel = np.asarray(ctx.read(plan.dot.invars[1]))[:, columns[0]:columns[1]]
    pooled = jnp.sum(x * s, axis=axes)
    rows = pooled.reshape(-1, pooled.shape[-1])  # A 2-D product: one FULLY_CONNECTED.
    projected = lax.dot_general(
        rows, kernel.astype(rows.dtype), (((1,), (0,)), ((), ())),
        precision=plan.dot.params["precision"],
        preferred_element_type=plan.dot.params["preferred_element_type"])
    result = projected.reshape(pooled.shape[:-1] + (kernel.shape[1],))
    bias = plan.bias[columns[0]:columns[1]]
    if np.any(bias):
      result = result + jnp.sum(s, axis=axes) * bias.astype(result.dtype)
    return result.astype(eqn.outvars[0].aval.dtype)
  return None


def _apply(eqn, invals, ctx: base.Context):
  del invals
  if eqn.primitive.name == "slice":
    return _kept_slice(eqn, ctx)
  return _projected_sum(eqn, ctx)


PASS = base.Pass("weighted_sum_projection", frozenset({"slice", "reduce_sum"}), _apply)
