"""A broadcast that feeds a non-broadcasting op as ``x[M, 1] @ ones[1, N]``.

TFLite keeps a broadcast that feeds a reshape (GroupNorm's statistics) as a
BROADCAST_TO op, which XNNPACK does not run, splitting its graph; the converter
folds a multiply by ones back into that broadcast, but not a product with a
ones matrix (one FULLY_CONNECTED). Broadcasts into elementwise ops are left to
the ops' implicit broadcasting.
"""

from __future__ import annotations

import math

from vit_edge.export.passes import base

# Ops whose TFLite lowering broadcasts implicitly, so a broadcast feeding them folds.
BROADCASTING_OPS = frozenset({"add", "sub", "mul", "div", "max", "min", "pow",
                              "select_n", "and", "or", "eq", "ne", "lt", "le", "gt",
                              "ge", "atan2", "rem"})


def broadcast_as_matmul(x, shape, broadcast_dimensions):
  """broadcast_in_dim along trailing dims as a product with ones; None otherwise."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  expanded = [1] * len(shape)
  for axis, dim in enumerate(broadcast_dimensions):
    expanded[dim] = x.shape[axis]
  grown = [d for d, (e, s) in enumerate(zip(expanded, shape)) if e == 1 and s > 1]
  if not grown or grown != list(range(grown[0], len(shape))):
    return None
  lead = math.prod(expanded[:grown[0]])
  cols = math.prod(shape[grown[0]:])
  out = x.reshape(lead, 1) @ jnp.ones((1, cols), x.dtype)
  return out.reshape(shape)


def _apply(eqn, invals, ctx: base.Context):
  users = ctx.consumers.get(eqn.outvars[0], ())
  if not base.is_traced(invals[0]) or all(u.primitive.name in BROADCASTING_OPS
                                          for u in users):
    return None
  return broadcast_as_matmul(invals[0], eqn.params["shape"],
                             eqn.params["broadcast_dimensions"])


PASS = base.Pass("broadcast_as_matmul", frozenset({"broadcast_in_dim"}), _apply)
