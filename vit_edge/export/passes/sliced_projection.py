"""For int8: a last-axis slice of ``x @ W (+ b)`` as its own ``x @ W[:, a:b] (+ b[a:b])``.

A fused projection whose output is sliced into parts of very different ranges
(MobileViTv2's query/key/value: one score channel next to the keys and values)
gets one int8 scale for all parts, which wipes out the small ones (its top-1
agreement with JAX fell to 29%). Separate products get separate scales. Only
with ``Options(split_projections=True)``.
"""

from __future__ import annotations

import numpy as np

from vit_edge.export.passes import base
from vit_edge.export.passes import projection


def _apply(eqn, invals, ctx: base.Context):
  (x,) = invals
  columns = base.last_axis_range(eqn)
  if not ctx.options.split_projections or columns is None:
    return None
  start, limit = columns
  dot, bias = projection.product_and_bias(eqn.invars[0], ctx)
  if dot is None:
    return None
  lhs, rhs = ctx.read(dot.invars[0]), ctx.read(dot.invars[1])
  if not projection.is_projection(dot, lhs, rhs):
    return None
  out = projection.project(dot, lhs, np.asarray(rhs)[:, start:limit])
  if bias is not None:
    out = out + np.broadcast_to(bias, bias.shape[:-1] + (x.shape[-1],))[..., start:limit]
  return out.astype(x.dtype)


PASS = base.Pass("sliced_projection", frozenset({"slice"}), _apply)
