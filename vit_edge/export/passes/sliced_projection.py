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
  p = eqn.params
  if not ctx.options.split_projections or (
      p.get("strides") and any(s != 1 for s in p["strides"])):
    return None
  last = x.ndim - 1
  if any(p["start_indices"][d] != 0 or p["limit_indices"][d] != x.shape[d]
         for d in range(last)):
    return None
  start, limit = p["start_indices"][last], p["limit_indices"][last]
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
