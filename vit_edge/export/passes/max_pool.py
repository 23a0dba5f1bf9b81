"""Stride-1 'same' max pools of k x k as stacked 3 x 3 ones, shared across k.

Exact (the -inf padding never wins a max), as YOLOv5's SPPF: TFormer's 3, 5 and
7 max-pool branches of one input cost three 3 x 3 pools instead of 9 + 25 + 49
comparisons per output (3.8 ms of its 20 ms in float before).
"""

from __future__ import annotations

from vit_edge.export.passes import base


def _cascade(var, x, kernel, cache):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  if kernel[0] != kernel[1]:
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *kernel, 1), (1,) * 4,
                             ((0, 0), (kernel[0] // 2,) * 2, (kernel[1] // 2,) * 2,
                              (0, 0)))
  k = kernel[0]
  if (var, k) not in cache:
    previous = x if k == 1 else _cascade(var, x, (k - 2, k - 2), cache)
    cache[(var, k)] = previous if k == 1 else lax.reduce_window(
        previous, -jnp.inf, lax.max, (1, 3, 3, 1), (1,) * 4,
        ((0, 0), (1, 1), (1, 1), (0, 0)))
  return cache[(var, k)]


def _apply(eqn, invals, ctx: base.Context):
  if not base.is_same_pool(eqn) or max(eqn.params["window_dimensions"]) <= 1:
    return None
  cache = ctx.cache.setdefault("max_pool", {})
  return _cascade(eqn.invars[0], invals[0], eqn.params["window_dimensions"][1:3],
                  cache)


PASS = base.Pass("cascaded_max_pool", frozenset({"reduce_window_max"}), _apply)
