"""A softmax over a middle axis, redone over the last axis (one fused SOFTMAX op).

The converter fuses only a last-axis softmax into one SOFTMAX op; over another
axis (MobileViTv2's context scores, over the patches) it stays REDUCE_MAX, SUB,
EXP, SUM and DIV ops, which int8 quantises badly and XNNPACK partly rejects.
"""

from __future__ import annotations

from vit_edge.export.passes import base


def _apply(eqn, invals, ctx: base.Context):
  """`eqn` is the final division of exp(x - max) / sum; None unless it matches."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  del invals
  numerator, denominator = eqn.invars
  exp = ctx.producer(numerator, "exp")
  total = ctx.producer(denominator, "broadcast_in_dim")
  total = ctx.producer(total.invars[0], "reduce_sum") if total is not None else (
      ctx.producer(denominator, "reduce_sum"))
  if (exp is None or total is None or total.invars[0] is not numerator
      or len(total.params["axes"]) != 1):
    return None
  shifted = ctx.producer(exp.invars[0], "sub")
  if shifted is None:
    return None
  x = ctx.read(shifted.invars[0])
  axis = total.params["axes"][0]
  if axis == x.ndim - 1:
    return None
  moved = jax.nn.softmax(jnp.moveaxis(x, axis, -1), axis=-1)
  return jnp.moveaxis(moved, -1, axis)


PASS = base.Pass("softmax_to_last_axis", frozenset({"div"}), _apply)
