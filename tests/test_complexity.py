"""MAC counts: sub-graphs count as often as they run (scan, cond/switch, calls)."""

import jax
import jax.numpy as jnp
from jax import lax

from vit_edge import complexity

# One [1, 8] @ [8, 16] product: 128 multiply-accumulates.
X, W = jnp.ones((1, 8)), jnp.ones((8, 16))
ONE_PRODUCT = 8 * 16


def _macs(fn, *args):
  return complexity.jaxpr_macs(jax.make_jaxpr(fn)(*args).jaxpr)


def test_plain_product_and_jit_body():
  assert _macs(lambda x, w: x @ w, X, W) == ONE_PRODUCT
  assert _macs(jax.jit(lambda x, w: x @ w), X, W) == ONE_PRODUCT


def test_scan_counts_trip_count_times_body():
  def fn(x, w):
    def body(carry, _):
      return carry @ w[:, :8], None
    out, _ = lax.scan(body, x, None, length=4)
    return out

  assert _macs(fn, X, W) == 4 * 8 * 8


def test_switch_counts_its_largest_branch():
  def fn(i, x, w):
    branches = [lambda x: x @ w,                      # 128
                lambda x: (x @ w) @ jnp.ones((16, 4)),  # 128 + 64
                lambda x: x[:, :4]]                   # 0
    return lax.switch(i, [lambda x, b=b: b(x)[:, :4] for b in branches], x)

  assert _macs(fn, 0, X, W) == ONE_PRODUCT + 16 * 4


def test_custom_vjp_body_counts_once():
  @jax.custom_vjp
  def project(x, w):
    return x @ w

  project.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T,
                                                                res[0].T @ g))
  assert _macs(project, X, W) == ONE_PRODUCT
