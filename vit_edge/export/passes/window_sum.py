"""Stride-1 'same' window sums as an average pool times the window counts.

``window_sum(x) / window_sum(ones)`` is the pattern TFLite lowers to one
AVERAGE_POOL_2D (SAME padding excludes the padding from the divisor, like the
count); a bare window sum stays a reference STABLEHLO_REDUCE_WINDOW kernel (14x
slower) that XNNPACK does not run and int8 quantisation rejects. So a bare sum
becomes ``average_pool(x) * counts`` (counts a constant map). A sum already in
the average-pool pattern (a model's export form, e.g. TFormer's
``export_form()``) is left alone.
"""

from __future__ import annotations

import numpy as np

from vit_edge.export.passes import base


def window_counts(spatial, kernel) -> np.ndarray:
  """In-bounds elements of each 'same' k x k window over an H x W map."""
  counts = []
  for n, k in zip(spatial, kernel):
    idx = np.arange(n)
    counts.append(np.minimum(idx + k // 2, n - 1) - np.maximum(idx - k // 2, 0) + 1)
  return np.outer(*counts).astype(np.float32)


def average_pool(x, window, padding):
  """window_sum(x) / window_sum(ones): one AVERAGE_POOL_2D after conversion."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  zero = np.array(0, x.dtype)
  count = lax.reduce_window(ones, zero, lax.add, window, (1,) * 4, padding)
  summed = lax.reduce_window(x, zero, lax.add, window, (1,) * 4, padding)
  return summed / count


def _in_average_form(eqn, ctx: base.Context) -> bool:
  """Whether `eqn`'s sum is a numerator or divisor of sum / sum already."""
  out = eqn.outvars[0]
  for user in ctx.consumers.get(out, ()):
    if user.primitive.name == "div":
      other = [v for v in user.invars if v is not out]
      if other and ctx.producer(other[0], "reduce_window_sum") is not None:
        return True
  return False


def _apply(eqn, invals, ctx: base.Context):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if not base.is_same_pool(eqn) or _in_average_form(eqn, ctx):
    return None
  x = invals[0]
  window = tuple(eqn.params["window_dimensions"])
  padding = tuple(tuple(p) for p in eqn.params["padding"])
  counts = window_counts(x.shape[1:3], window[1:3])[None, :, :, None]
  return average_pool(x, window, padding) * jnp.asarray(counts.astype(x.dtype))


PASS = base.Pass("window_sum_as_average_pool", frozenset({"reduce_window_sum"}),
                 _apply)
