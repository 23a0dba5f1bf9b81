"""Each export rewrite pass on a small function: the op is gone, the values stay.

Also: rewrites reach every sub-graph (pjit, custom_jvp, cond/switch, scan, while).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from vit_edge.export import passes
from vit_edge.export import rewrite
from vit_edge.export.passes import base


def _primitives(jaxpr) -> set:
  """Every primitive name in `jaxpr`, sub-graphs included."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for value in eqn.params.values():
      for v in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(v, "jaxpr", v)
        if hasattr(inner, "eqns"):
          names |= _primitives(inner)
  return names


def _check(fn, args, gone, options=base.Options(gelu="exact"), atol=1e-6,
           present=()):
  """`fn` rewritten: no `gone` primitive left, `present` ones there, same values."""
  new = rewrite.rewritten(fn, *args, options=options)
  before = _primitives(jax.make_jaxpr(fn)(*args).jaxpr)
  after = _primitives(jax.make_jaxpr(new)(*args).jaxpr)
  assert set(gone) <= before, (gone, before)  # The pattern was there ...
  assert not set(gone) & after, after  # ... and is gone.
  assert set(present) <= after, after
  np.testing.assert_allclose(np.asarray(jax.jit(new)(*args)),
                             np.asarray(fn(*args)), atol=atol, rtol=atol)
  return after


X = jnp.asarray(np.random.RandomState(0).randn(1, 6, 6, 4), jnp.float32)


def test_passes_are_ordered_and_named():
  names = [p.name for p in passes.PASSES]
  assert len(set(names)) == len(names)
  # The int8 slice split must see a slice before the strided-slice rewrite.
  assert names.index("sliced_projection") < names.index("strided_slice")


@pytest.mark.parametrize("gelu,atol", [("exact", 1e-6), ("tanh", 5e-4)])
def test_gelu(gelu, atol):
  _check(lambda x: jax.nn.gelu(x, approximate=False), (X * 3,), {"erfc"},
         base.Options(gelu=gelu), atol=atol)


def test_erf():
  _check(lax.erf, (X,), {"erf"})


def test_softmax_over_a_middle_axis_moves_to_the_last():
  after = _check(lambda x: jax.nn.softmax(x, axis=1), (X,), set())
  assert "transpose" in after  # Redone over the last axis between two moves.


def test_max_pool_cascade():
  def pools(x):
    return sum(lax.reduce_window(x, -jnp.inf, lax.max, (1, k, k, 1), (1,) * 4,
                                 ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
               for k in (3, 5, 7))

  new = rewrite.rewritten(pools, X)
  eqns = jax.make_jaxpr(new)(X).jaxpr.eqns
  windows = [e.params["window_dimensions"] for e in eqns
             if e.primitive.name == "reduce_window_max"]
  assert windows == [(1, 3, 3, 1)] * 3  # Shared cascade: 3, 3+3, 3+3+3.
  np.testing.assert_array_equal(jax.jit(new)(X), pools(X))


def test_window_sum_becomes_average_pool_pattern():
  def window_sum(x):
    return lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1,) * 4,
                             ((0, 0), (1, 1), (1, 1), (0, 0)))

  after = _check(window_sum, (X,), set(), atol=1e-5, present={"div"})
  assert "reduce_window_sum" in after  # Now sum / sum(ones): AVERAGE_POOL_2D.


def test_broadcast_into_reshape_becomes_matmul():
  def stats(x):
    mean = x.mean(axis=(1, 2, 3))
    return jnp.broadcast_to(mean[:, None, None, None], x.shape).reshape(1, -1)

  _check(stats, (X,), set(), present={"dot_general"}, atol=1e-6)
  new = rewrite.rewritten(stats, X)
  # What is left only adds unit axes or fills the ones matrix from a scalar.
  for eqn in jax.make_jaxpr(new)(X).jaxpr.eqns:
    if eqn.primitive.name == "broadcast_in_dim":
      source, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
      assert source == () or np.prod(source) == np.prod(out), eqn


def test_unit_axis_projection_becomes_conv():
  w = np.random.RandomState(1).randn(4, 8).astype(np.float32)
  tokens = X[:, :1, :, :]  # [1, 1, 6, 4]: a size-1 token axis.
  _check(lambda x: x @ w, (tokens,), {"dot_general"},
         present={"conv_general_dilated"}, atol=1e-5)


@pytest.mark.parametrize("size,patch", [(8, 4), (6, 2), (7, 2)])
def test_patch_conv_becomes_one_matmul(size, patch):
  rng = np.random.RandomState(4)
  w = rng.randn(patch, patch, 3, 5).astype(np.float32)
  image = jnp.asarray(rng.randn(2, size, size, 3), jnp.float32)
  conv = lambda x: lax.conv_general_dilated(x, w, (patch, patch), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
  after = _check(conv, (image,), {"conv_general_dilated"}, present={"dot_general"},
                 atol=1e-5)
  assert "transpose" in after  # The patches gathered, not a strided conv.
  # Left alone: overlapping windows (stride < kernel), padding, a traced kernel.
  for fn, args in [
      (lambda x: lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=(
          "NHWC", "HWIO", "NHWC")), (image,)),
      (lambda x: lax.conv_general_dilated(x, w, (patch, patch), "SAME",
                                          dimension_numbers=("NHWC", "HWIO", "NHWC")),
       (image[:, :patch * 2 - 1],)),  # Rows padded by SAME.
      (lambda x, k: lax.conv_general_dilated(x, k, (patch, patch), "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC")),
       (image, jnp.asarray(w)))]:
    new = rewrite.rewritten(fn, *args)
    assert "conv_general_dilated" in _primitives(jax.make_jaxpr(new)(*args).jaxpr)


def test_context_folds_constants_through_ops_and_deep_chains():
  gamma, var = np.float32([2.0, 3.0]), np.float32([4.0, 16.0])

  def fn(x):
    for _ in range(2000):  # A chain deeper than Python's recursion limit.
      x = x + 1.0
    return x * (lax.rsqrt(var) * gamma)  # BatchNorm's scale: ops on constants.

  seen = []
  record = lambda eqn, invals, ctx: seen.append([ctx.constant(v) for v in eqn.invars])
  closed = jax.make_jaxpr(fn)(jnp.zeros(2))
  jax.make_jaxpr(lambda x: rewrite.eval_jaxpr(  # Traced, as in an export.
      closed.jaxpr, closed.consts, [x], base.Options(),
      passes=(base.Pass("record", frozenset({"mul"}), record),)))(jnp.zeros(2))
  traced, scale = seen[-1]
  assert traced is None
  np.testing.assert_allclose(scale, [1.0, 0.75])


def _live(fn, *args) -> list:
  """Primitives that `fn`'s outputs depend on (the converter drops the rest)."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  needed, names = {v for v in jaxpr.outvars if not base.is_literal(v)}, []
  for eqn in reversed(jaxpr.eqns):
    if any(v in needed for v in eqn.outvars):
      names.append(eqn.primitive.name)
      needed |= {v for v in eqn.invars if not base.is_literal(v)}
  return names


def _pointwise_conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def _wrapped_pointwise_conv(x, w):  # As the models wrap theirs (custom gradient).
  return _pointwise_conv(x, w)


_wrapped_pointwise_conv.defvjp(lambda x, w: (_pointwise_conv(x, w), None),
                               lambda _, g: (g, None))


def test_linear_pair_becomes_one_product():
  rng = np.random.RandomState(5)
  w1, w2 = rng.randn(1, 1, 4, 6).astype(np.float32), rng.randn(1, 1, 6, 8).astype(np.float32)
  b1, mean, var, gamma, beta = rng.randn(5, 6).astype(np.float32)
  image = jnp.asarray(rng.randn(2, 5, 5, 4), jnp.float32)

  def batch_norm(y):
    return (y - mean) * (lax.rsqrt(jnp.abs(var) + 1e-5) * gamma) + beta

  def pair(x):  # 1x1 conv + bias, BatchNorm, 1x1 conv: 4 -> 6 -> 8.
    return _wrapped_pointwise_conv(batch_norm(_wrapped_pointwise_conv(x, w1) + b1), w2)

  new = rewrite.rewritten(pair, image)
  assert _live(new, image).count("conv_general_dilated") == 1
  np.testing.assert_allclose(jax.jit(new)(image), pair(image), atol=1e-5, rtol=1e-5)
  dense = lambda x: (1.0 - (x @ w1[0, 0] + b1) * gamma) @ w2[0, 0]  # Projections.
  new = rewrite.rewritten(dense, image)
  assert _live(new, image).count("dot_general") == 1
  np.testing.assert_allclose(jax.jit(new)(image), dense(image), atol=1e-5, rtol=1e-5)
  # Left alone: an activation between, a second reader of the middle, and a
  # bottleneck whose merged product would cost more (4 -> 2 -> 8).
  squeeze = rng.randn(1, 1, 4, 2).astype(np.float32)
  expand = rng.randn(1, 1, 2, 8).astype(np.float32)
  for fn in (lambda x: _pointwise_conv(jax.nn.relu(_pointwise_conv(x, w1)), w2),
             lambda x: (_pointwise_conv(_pointwise_conv(x, w1) * gamma, w2),
                        _pointwise_conv(x, w1)),
             lambda x: _pointwise_conv(_pointwise_conv(x, squeeze), expand)):
    assert _live(rewrite.rewritten(fn, image), image).count("conv_general_dilated") >= 2


def _live_products(fn, *args) -> list:
  """Output shapes of the dot_generals that `fn`'s outputs depend on."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  needed, shapes = {v for v in jaxpr.outvars if not base.is_literal(v)}, []
  for eqn in reversed(jaxpr.eqns):
    if any(v in needed for v in eqn.outvars):
      if eqn.primitive.name == "dot_general":
        shapes.append(eqn.outvars[0].aval.shape)
      needed |= {v for v in eqn.invars if not base.is_literal(v)}
  return sorted(shapes)


@pytest.mark.parametrize("split", [False, True])
def test_weighted_sum_of_keys_projects_one_vector(split):
  """MobileViTv2's context vector: sum_n s_n (x_n Wk + bk) = (sum_n s_n x_n) Wk + bk sum s."""
  rng = np.random.RandomState(6)
  w = rng.randn(8, 17).astype(np.float32)  # One query, 8 key and 8 value channels.
  b = rng.randn(17).astype(np.float32)
  tokens = jnp.asarray(rng.randn(2, 4, 16, 8), jnp.float32)
  options = base.Options(split_projections=split)

  def attention(x):
    qkv = x @ w + b
    query, key, value = qkv[..., :1], qkv[..., 1:9], qkv[..., 9:]
    scores = jax.nn.softmax(query, axis=2)
    context = jnp.sum(key * scores, axis=2, keepdims=True)
    return jax.nn.relu(value) * context

  new = rewrite.rewritten(attention, tokens, options=options)
  np.testing.assert_allclose(jax.jit(new)(tokens), attention(tokens), atol=1e-5,
                             rtol=1e-5)
  # No product over all tokens for the keys: one [8 x 8] per pixel position.
  tokenwise = [(2, 4, 16, 1), (2, 4, 16, 8)] if split else [(2, 4, 16, 9)]
  assert _live_products(new, tokens) == sorted([(8, 8)] + tokenwise)
  # A projection summed directly (no slice), without a bias.
  weights = jnp.asarray(rng.rand(2, 4, 16, 1), jnp.float32)
  direct = lambda x, s: jnp.sum((x @ w[:, :8]) * s, axis=(1, 2))
  new = rewrite.rewritten(direct, tokens, weights)
  np.testing.assert_allclose(jax.jit(new)(tokens, weights), direct(tokens, weights),
                             atol=1e-4, rtol=1e-5)
  assert _live_products(new, tokens, weights) == [(2, 8)]
  # Left alone: the keys read twice, weights per channel, a sum over channels.
  def read_twice(x, s):
    key = (x @ w + b)[..., 1:9]
    return jnp.sum(key * s, axis=2), key

  for fn in (read_twice,
             lambda x, s: jnp.sum((x @ w + b)[..., 1:9] * (s * w[0, :8]), axis=2),
             lambda x, s: jnp.sum((x @ w + b)[..., 1:9] * s, axis=3)):
    assert _live_products(rewrite.rewritten(fn, tokens, weights), tokens,
                          weights) == [(2, 4, 16, 17)]


def test_sliced_projection_splits_with_int8_option_only():
  w = np.random.RandomState(1).randn(4, 9).astype(np.float32)
  b = np.random.RandomState(2).randn(9).astype(np.float32)
  fn = lambda x: (x @ w + b)[..., 1:5]
  split = rewrite.rewritten(fn, X, options=base.Options(split_projections=True))
  after = _primitives(jax.make_jaxpr(split)(X).jaxpr)
  assert "slice" not in after, after  # Its own product W[:, 1:5] instead.
  np.testing.assert_allclose(jax.jit(split)(X), fn(X), atol=1e-5)
  kept = rewrite.rewritten(fn, X)
  assert "slice" in _primitives(jax.make_jaxpr(kept)(X).jaxpr)


def test_single_head_scores_keep_a_batch_axis():
  rng = np.random.RandomState(3)
  q, k = (jnp.asarray(rng.randn(1, 1, 5, 4), jnp.float32) for _ in range(2))
  v = jnp.asarray(rng.randn(1, 1, 4, 5), jnp.float32)

  def batch_dims(fn, *args):
    eqns = jax.make_jaxpr(rewrite.rewritten(fn, *args))(*args).jaxpr.eqns
    return [e.params["dimension_numbers"][1][0] for e in eqns
            if e.primitive.name == "dot_general"]

  scores = lambda q, k: q @ k.swapaxes(-2, -1)  # jnp.matmul squeezes the 1s.
  assert batch_dims(scores, q, k) == [(0,)]
  np.testing.assert_allclose(jax.jit(rewrite.rewritten(scores, q, k))(q, k),
                             scores(q, k), atol=1e-6)
  # Left alone: a product with an untransposed operand, and a projection.
  assert batch_dims(lambda a, b: a @ b, q, v) == [()]
  w = np.asarray(rng.randn(4, 3), np.float32)
  assert batch_dims(lambda a: a[0, 0] @ w, q) == [()]


def test_strided_slice_becomes_reshape_and_unit_slice():
  fn = lambda x: x[:, ::2, ::3]
  new = rewrite.rewritten(fn, X)
  for eqn in jax.make_jaxpr(new)(X).jaxpr.eqns:
    if eqn.primitive.name == "slice":
      assert not eqn.params["strides"] or set(eqn.params["strides"]) == {1}
  np.testing.assert_array_equal(jax.jit(new)(X), fn(X))


def _gelu(x):
  return jax.nn.gelu(x, approximate=False)


@pytest.mark.parametrize("wrap", ["jit", "custom_jvp", "cond", "switch", "scan",
                                  "while"])
def test_gelu_rewritten_inside_every_subgraph(wrap):
  def inner(x):
    return _gelu(x) * 2.0

  if wrap == "jit":
    fn = jax.jit(inner)
  elif wrap == "custom_jvp":
    fn = jax.custom_jvp(inner)
    fn.defjvp(lambda primals, tangents: (inner(*primals), tangents[0]))
  elif wrap == "cond":
    fn = lambda x: lax.cond(x.sum() > 0, inner, lambda y: y, x)
  elif wrap == "switch":
    fn = lambda x: lax.switch(1, [lambda y: y, inner, lambda y: -y], x)
  elif wrap == "scan":
    fn = lambda x: lax.scan(lambda c, _: (inner(c), None), x, None, length=3)[0]
  else:
    fn = lambda x: lax.while_loop(lambda c: c[0] < 2,
                                  lambda c: (c[0] + 1, inner(c[1])), (0, x))[1]
  _check(fn, (X,), {"erfc"}, base.Options(gelu="exact"), atol=1e-5)
