"""Strided slices ``x[:, ::r, ::r]`` (EdgeViT's subsampling) as reshape + slice.

A strided slice converts to STRIDED_SLICE, which XNNPACK does not run; padding
to a multiple of the stride, reshaping the axis to (count, stride) and taking
index 0 is the same selection with unit-stride ops that it does.
"""

from __future__ import annotations

from vit_edge.export.passes import base


def strided_slice(x, start, limit, strides):
  """``lax.slice`` with strides as pad + reshape + unit-stride slice."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  x = lax.slice(x, start, limit)
  for axis, stride in enumerate(strides):
    if stride == 1:
      continue
    length = x.shape[axis]
    count = -(-length // stride)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, count * stride - length)
    if pad[axis][1]:
      x = jnp.pad(x, pad)
    shape = x.shape[:axis] + (count, stride) + x.shape[axis + 1:]
    x = lax.index_in_dim(x.reshape(shape), 0, axis + 1, keepdims=False)
  return x


def _apply(eqn, invals, ctx: base.Context):
  del ctx
  p = eqn.params
  if not p.get("strides") or all(s == 1 for s in p["strides"]):
    return None
  return strided_slice(invals[0], p["start_indices"], p["limit_indices"],
                       p["strides"])


PASS = base.Pass("strided_slice", frozenset({"slice"}), _apply)
