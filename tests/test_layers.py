"""Shared layers: the hand-written gradients of depthwise and grouped 1x1 convs, Dense, max pooling."""

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_edge import models
from vit_edge.models import layers


def _grads(conv, x, w, strides, padding):
  def loss(x, w):
    dims = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    y = conv(x, w, strides, padding, dimension_numbers=dims,
             feature_group_count=x.shape[-1])
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)


@pytest.mark.parametrize("size,kernel,stride,padding", [
    (9, 3, 1, ((1, 1), (1, 1))),
    (9, 3, 1, ((0, 2), (2, 1))),    # stride 1, asymmetric
    (10, 5, 1, "SAME"),
    (8, 3, 1, "VALID"),
    (10, 3, 2, ((1, 1), (1, 1))),   # MobileViTv2 / EdgeViT downsampling
    (11, 5, 2, "SAME"),
    (8, 3, 2, "VALID"),
    (9, 3, 2, ((0, 1), (2, 0))),    # asymmetric
    (12, 7, 3, ((3, 3), (3, 3))),
])
def test_depthwise_gradient_equals_lax(size, kernel, stride, padding):
  rng = np.random.default_rng(size + kernel + stride)
  x = jnp.asarray(rng.normal(size=(2, size, size + 1, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 4)), jnp.float32)
  (y_ref, (dx_ref, dw_ref)) = _grads(lax.conv_general_dilated, x, w, (stride, stride),
                                     padding)
  (y, (dx, dw)) = _grads(layers.conv_general_dilated, x, w, (stride, stride), padding)
  # The training forward (shifted multiply-adds) sums in another order than lax.
  np.testing.assert_allclose(y, y_ref, rtol=1e-5)
  dims = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  conv = lambda f: (lambda x, w: f(x, w, (stride, stride), padding, dimension_numbers=dims,
                                   feature_group_count=x.shape[-1]))
  trained, _ = jax.vjp(conv(layers.conv_general_dilated), x, w)  # the fwd rule's output
  np.testing.assert_allclose(trained, conv(lax.conv_general_dilated)(x, w),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-4)


def test_depthwise_gradient_bf16_as_close_as_lax():
  """In bfloat16 the gradient is at least as close to float32 as lax's own."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 1, 8)), jnp.float32)
  _, exact = _grads(lax.conv_general_dilated, x, w, (2, 2), "SAME")
  low = lambda conv: _grads(conv, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                            (2, 2), "SAME")[1]
  ours, theirs = low(layers.conv_general_dilated), low(lax.conv_general_dilated)
  for a, b, e in zip(ours, theirs, exact):
    assert a.dtype == jnp.bfloat16
    ours_err = np.abs(np.float32(a) - e).max()
    lax_err = np.abs(np.float32(b) - e).max()
    assert ours_err <= 1.5 * lax_err + 1e-3, (ours_err, lax_err)


@pytest.mark.parametrize("groups,padding", [(1, "SAME"), (2, "VALID"), (4, "SAME"),
                                            (2, ((0, 0), (0, 0)))])
def test_pointwise_gradient_equals_lax(groups, padding):
  rng = np.random.default_rng(groups)
  x = jnp.asarray(rng.normal(size=(2, 5, 6, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(1, 1, 8 // groups, 12)), jnp.float32)

  conv = lambda f: (lambda x, w: f(x, w, (1, 1), padding, feature_group_count=groups,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")))
  ours, theirs = conv(layers.conv_general_dilated), conv(lax.conv_general_dilated)

  def grads(apply):
    loss = lambda x, w: jnp.sum(jnp.sin(apply(x, w)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)

  assert "custom_vjp" in str(jax.make_jaxpr(ours)(x, w))
  (y_ref, (dx_ref, dw_ref)), (y, (dx, dw)) = grads(theirs), grads(ours)
  # The training forward is a (batched) matmul, summing in another order;
  # inference traces the primal, lax's own convolution, exactly.
  np.testing.assert_allclose(y, y_ref, rtol=1e-5)
  trained, _ = jax.vjp(ours, x, w)  # the fwd rule's output
  np.testing.assert_allclose(trained, theirs(x, w), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(jax.jit(ours)(x, w), jax.jit(theirs)(x, w))
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)


def test_other_convolutions_go_to_lax_unchanged():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 6, 6, 4)), jnp.float32)
  dims = ("NHWC", "HWIO", "NHWC")
  for w, groups in ((rng.normal(size=(3, 3, 4, 8)), 1),     # dense
                    (rng.normal(size=(3, 3, 2, 4)), 2),     # grouped 3x3
                    (rng.normal(size=(3, 3, 1, 8)), 4)):    # channel multiplier 2
    w = jnp.asarray(w, jnp.float32)
    jaxpr = jax.make_jaxpr(lambda x, w: layers.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=dims, feature_group_count=groups))(x, w)
    assert "custom_vjp" not in str(jaxpr)
    np.testing.assert_array_equal(
        layers.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims,
                                    feature_group_count=groups),
        lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims,
                                 feature_group_count=groups))


def _float64_model_grads(name, **overrides):
  """Parameter gradients of a small model's log-softmax loss, all in float64."""
  with jax.enable_x64(True):
    images = jnp.asarray(np.random.default_rng(2).uniform(size=(2, 32, 32, 3)),
                         jnp.float64)
    model = models.create_model(name, num_classes=5, dtype=jnp.float64, **overrides)
    variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64),
                             model.init(jax.random.key(0), images))

    def loss(params):
      logits, _ = model.apply({**variables, "params": params}, images, train=False)
      return jnp.sum(jax.nn.log_softmax(logits)[:, 0])
    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert all(g.dtype == jnp.float64 for g in jax.tree.leaves(grads))
    return jax.tree.map(np.asarray, grads)


def _assert_same_gradients(ours, reference, rtol=1e-9, atol=None):
  """Leaf by leaf; `atol` defaults to 1e-10 of max(1, the leaf's largest value)."""
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours),
                          jax.tree_util.tree_leaves(reference)):
    largest = float(np.max(np.abs(b)))
    np.testing.assert_allclose(
        a, b, rtol=rtol, atol=1e-10 * max(1.0, largest) if atol is None else atol(largest),
        err_msg=jax.tree_util.keystr(path))


def test_model_gradients_unchanged(monkeypatch):
  """A whole (small) model's parameter gradient equals the one lax's autodiff gives.

  MobileViTv2 has stride-1 and stride-2 depthwise convs and 1x1 convs; EdgeViT's
  convs go through the same function (the per-conv tests above cover its kernel
  sizes). In float64, so that the comparison is about the function and not about
  float32 rounding: the custom training forward sums the depthwise taps in another
  order than lax's convolution, and ten layers amplify that to ~1e-4 in float32.
  """
  overrides = {"width_multiplier": 0.25}
  ours = _float64_model_grads("mobilevitv2_050", **overrides)
  monkeypatch.setattr(layers, "conv_general_dilated", lax.conv_general_dilated)
  monkeypatch.setattr(layers, "dense_dot_general", lax.dot_general)
  _assert_same_gradients(ours, _float64_model_grads("mobilevitv2_050", **overrides))


@pytest.mark.parametrize("name,overrides", [
    ("deit_tiny_patch16", {"depth": 2, "image_size": 32}),
    ("edgevit_xxs", {"depths": (1, 1, 1, 1)}),
])
def test_dense_model_gradients_unchanged(monkeypatch, name, overrides):
  """DeiT's and EdgeViT's parameter gradients (Dense layers, 1x1 convs) equal autodiff's."""
  ours = _float64_model_grads(name, **overrides)
  monkeypatch.setitem(layers._FAST_GRADIENTS, "enabled", False)
  _assert_same_gradients(ours, _float64_model_grads(name, **overrides))


@pytest.mark.parametrize("shape", [(2, 7, 12), (2, 3, 5, 12)])
def test_dense_gradient_equals_lax(shape):
  """nn.Dense's contraction: lax's forward, gradients as 2-D matmuls, same values."""
  rng = np.random.default_rng(len(shape))
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(12, 9)), jnp.float32)
  dims = (((len(shape) - 1,), (0,)), ((), ()))

  def grads(dot_general, x, w):
    loss = lambda x, w: jnp.sum(jnp.sin(dot_general(x, w, dims).astype(jnp.float32)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)

  assert "custom_vjp" in str(jax.make_jaxpr(
      lambda x, w: layers.dense_dot_general(x, w, dims))(x, w))
  (y_ref, (dx_ref, dw_ref)), (y, (dx, dw)) = (grads(lax.dot_general, x, w),
                                              grads(layers.dense_dot_general, x, w))
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)
  # bfloat16 (a bf16 Dense): gradients keep the operand dtypes, same values as lax's
  # up to bf16 rounding of the float32-accumulated products.
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  (_, (dxb_ref, dwb_ref)), (_, (dxb, dwb)) = (grads(lax.dot_general, xb, wb),
                                              grads(layers.dense_dot_general, xb, wb))
  assert dxb.dtype == dwb.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(dxb), np.float32(dxb_ref), rtol=2e-2, atol=5e-2)
  np.testing.assert_allclose(np.float32(dwb), np.float32(dwb_ref), rtol=2e-2, atol=5e-2)


def test_other_dots_go_to_lax_unchanged(monkeypatch):
  """2-D inputs, batch dimensions, other contractions, precision, mixed dtypes and
  the switched-off state are lax's dot_general itself (no custom_vjp)."""
  rng = np.random.default_rng(3)
  x3 = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  plain = (((2,), (0,)), ((), ()))
  cases = [
      (x3[0], w, (((1,), (0,)), ((), ())), {}),                  # 2-D: already a matmul
      (x3, jnp.ones((2, 6, 5)), (((2,), (1,)), ((0,), (0,))), {}),  # batched
      (x3, w.T, (((2,), (1,)), ((), ())), {}),                   # kernel [O, C]
      (x3, w, plain, {"precision": lax.Precision.HIGHEST}),
      (x3, w.astype(jnp.bfloat16), plain, {}),
  ]
  for lhs, rhs, dims, kwargs in cases:
    jaxpr = str(jax.make_jaxpr(
        lambda a, b, dims=dims, kwargs=kwargs: layers.dense_dot_general(a, b, dims, **kwargs))(lhs, rhs))
    assert "custom_vjp" not in jaxpr, (lhs.shape, rhs.shape, dims, kwargs)
  monkeypatch.setitem(layers._FAST_GRADIENTS, "enabled", False)
  assert "custom_vjp" not in str(jax.make_jaxpr(
      lambda a, b: layers.dense_dot_general(a, b, plain))(x3, w))


def _pool_grads(pool, x, window, strides, padding):
  def loss(x):
    return jnp.sum(jnp.sin(3.0 * pool(x, window, strides, padding).astype(jnp.float32)))
  return jax.jit(jax.value_and_grad(loss))(x)


def _flax_max_pool(x, window, strides, padding):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return nn.max_pool(x, window, strides=strides, padding=padding)


@pytest.mark.parametrize("window,strides,padding", [
    ((3, 3), (1, 1), ((1, 1), (1, 1))),   # TFormer's mixer, k = 3, 5, 7
    ((5, 5), (1, 1), ((2, 2), (2, 2))),
    ((7, 7), (1, 1), ((3, 3), (3, 3))),
    ((3, 3), (2, 2), ((1, 1), (1, 1))),   # ResNet-style stem pool
    ((2, 2), (2, 2), ((0, 0), (0, 0))),
    ((3, 2), (1, 2), ((0, 2), (1, 0))),   # asymmetric everything
])
def test_max_pool_gradient_equals_lax(window, strides, padding):
  rng = np.random.default_rng(sum(window) + sum(strides))
  x = jnp.asarray(rng.normal(size=(2, 9, 10, 3)), jnp.float32)
  y_ref, dx_ref = _pool_grads(_flax_max_pool, x, window, strides, padding)
  y, dx = _pool_grads(layers.max_pool, x, window, strides, padding)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-6)


def test_max_pool_gradient_goes_to_the_first_of_tied_maxima():
  """Ties (a ReLU map, quantised values) pick the first maximum, as lax and PyTorch."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.integers(0, 3, size=(2, 8, 8, 4)), jnp.float32)
  for window, strides, padding in (((3, 3), (1, 1), ((1, 1), (1, 1))),
                                   ((3, 3), (2, 2), ((1, 1), (1, 1)))):
    _, dx_ref = _pool_grads(_flax_max_pool, x, window, strides, padding)
    _, dx = _pool_grads(layers.max_pool, x, window, strides, padding)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-6)


def test_max_pool_bf16_and_shape_error():
  x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 6, 6, 2)), jnp.bfloat16)
  args = ((3, 3), (1, 1), ((1, 1), (1, 1)))
  (_, dx_ref), (_, dx) = (_pool_grads(_flax_max_pool, x, *args),
                          _pool_grads(layers.max_pool, x, *args))
  assert dx.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(dx), np.float32(dx_ref), rtol=1e-2, atol=1e-2)
  with pytest.raises(ValueError, match=r"NHWC map \(4 dims\), got shape \(6, 6\)"):
    layers.max_pool(jnp.zeros((6, 6)), (3, 3))


def test_tformer_gradients_unchanged(monkeypatch):
  """TFormer's parameter gradient equals lax's autodiff (max pools, 1x1 convs)."""
  ours = _float64_model_grads("tformer_s", depths=(1, 1, 1, 1))
  monkeypatch.setattr(layers, "max_pool", lambda x, w, s, p: _flax_max_pool(x, w, s, p))
  monkeypatch.setitem(layers._FAST_GRADIENTS, "enabled", False)  # PCS-FFN's convs
  _assert_same_gradients(ours, _float64_model_grads("tformer_s", depths=(1, 1, 1, 1)))


def test_switched_off_max_pool_is_lax_and_differentiable(monkeypatch):
  """QAT turns the custom gradients off: the pool must still train (lax's gradient)."""
  monkeypatch.setitem(layers._FAST_GRADIENTS, "enabled", False)
  x = jnp.asarray(np.random.default_rng(6).normal(size=(1, 7, 7, 2)), jnp.float32)
  args = ((3, 3), (1, 1), ((1, 1), (1, 1)))
  jaxpr = jax.make_jaxpr(lambda x: layers.max_pool(x, *args))(x)
  assert "custom_vjp" not in str(jaxpr)
  (_, dx_ref), (_, dx) = (_pool_grads(_flax_max_pool, x, *args),
                          _pool_grads(layers.max_pool, x, *args))
  np.testing.assert_array_equal(dx, dx_ref)


def test_gelu_is_jax_exact_gelu_with_its_gradient():
  """layers.gelu: the primal is jax's exact GELU (what export rewrites match); the
  training rule (erf form, one exp) gives the same values and gradients."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 4001, dtype=jnp.float32),
                       jnp.asarray([0.0, -0.0, 1e-30, -1e-30], jnp.float32)])
  reference = lambda t: nn.gelu(t, approximate=False)  # pylint: disable=unnecessary-lambda-assignment
  np.testing.assert_array_equal(layers.gelu(x), reference(x))
  assert "erfc" in str(jax.make_jaxpr(layers.gelu)(x))
  value, tangent = jax.jvp(layers.gelu, (x,), (jnp.ones_like(x),))
  ref_value, ref_tangent = jax.jvp(reference, (x,), (jnp.ones_like(x),))
  np.testing.assert_allclose(value, ref_value, rtol=2e-6, atol=2e-6)
  np.testing.assert_allclose(tangent, ref_tangent, rtol=2e-6, atol=2e-6)
  # Through jit, vmap and a second derivative, in bfloat16 and float64 too.
  second = jax.jit(jax.vmap(jax.grad(jax.grad(layers.gelu))))(x)
  np.testing.assert_allclose(second, jax.vmap(jax.grad(jax.grad(reference)))(x),
                             rtol=1e-5, atol=1e-5)
  xb = x.astype(jnp.bfloat16)
  assert jax.grad(lambda t: layers.gelu(t).sum())(xb).dtype == jnp.bfloat16
  with jax.enable_x64(True):
    x64 = x.astype(jnp.float64)
    np.testing.assert_allclose(jax.vmap(jax.grad(layers.gelu))(x64),
                               jax.vmap(jax.grad(reference))(x64), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name,overrides", [
    ("deit_tiny_patch16", {"depth": 2, "image_size": 32}),
    ("edgevit_xxs", {"depths": (1, 1, 1, 1)}),
])
def test_fused_attention_wiring_computes_the_same_function(monkeypatch, name, overrides):
  """The GPU path (packed qkv -> dot_product_attention -> heads concatenated) is the
  einsum path: same logits, aux and parameter gradients. cuDNN needs a GPU, so the
  same call runs here with jax's "xla" implementation. That one always takes its
  softmax in float32, hence a float32 tolerance although the rest is float64 (a
  wrong head order, scale or reshape is off by far more)."""
  ours = _float64_model_grads(name, **overrides)
  monkeypatch.setattr(layers, "fused_attention_applies", lambda dtype: True)
  monkeypatch.setattr(layers, "fused_attention",
                      functools.partial(layers.fused_attention, implementation="xla"))
  _assert_same_gradients(_float64_model_grads(name, **overrides), ours, rtol=1e-5,
                         atol=lambda largest: 1e-6 * largest)


def test_fused_attention_applies_only_to_16_bit_on_a_gpu(monkeypatch):
  assert not layers.fused_attention_applies(jnp.bfloat16)  # this machine is a CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert layers.fused_attention_applies(jnp.bfloat16)
  assert layers.fused_attention_applies(jnp.float16)
  assert not layers.fused_attention_applies(jnp.float32)
  monkeypatch.setitem(layers._FUSED_ATTENTION, "enabled", False)
  assert not layers.fused_attention_applies(jnp.bfloat16)


def test_fused_attention_without_cudnn_falls_back_to_xla():
  """This CPU has no cuDNN: the cuDNN call is refused while tracing, and XLA's
  attention (softmax(q k^T * scale) v, heads concatenated) is computed instead."""
  rng = np.random.default_rng(0)
  qkv = jnp.asarray(rng.normal(size=(2, 5, 3, 2, 8)), jnp.float32)
  out = np.asarray(layers.fused_attention(qkv, 8 ** -0.5))
  q, k, v = (np.asarray(qkv[:, :, i], np.float64).transpose(0, 2, 1, 3) for i in range(3))
  logits = q @ k.swapaxes(-1, -2) * 8 ** -0.5
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  expected = (probs @ v).transpose(0, 2, 1, 3).reshape(2, 5, 16)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
