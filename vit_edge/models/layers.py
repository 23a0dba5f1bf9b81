"""Blocks shared by several model families, written once.

Parameter names follow the PyTorch reference code (fc1/fc2, qkv/proj, ...) so that
weights port one tensor to one Flax parameter: Dense kernels are the transposed
torch Linear weights, Conv kernels are torch's OIHW weights as HWIO.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# timm/DeiT/EdgeViT initialise Linear weights with trunc_normal(std=.02), bias 0.
trunc_normal = nn.initializers.truncated_normal(stddev=0.02)
# timm's conv init for MobileNet-style nets (kaiming_normal, fan_out).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default Conv2d / ConvTranspose2d weight init, kaiming_uniform(a=sqrt(5)):
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)). For references that never re-initialise convs.
torch_conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_conv_bias_init(fan_in: int):
  """PyTorch's default conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  Example: ``nn.Conv(8, (3, 3), bias_init=torch_conv_bias_init(27))``.
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init

# PyTorch nn.GELU() is the exact erf form; Flax defaults to the tanh approximation.
_exact_gelu = functools.partial(nn.gelu, approximate=False)


@jax.custom_jvp
def gelu(x: jax.Array) -> jax.Array:
  """The exact GELU, x * Phi(x), with a training pass XLA:CPU computes once.

  The primal is ``jax.nn.gelu(approximate=False)``, so inference and export
  (whose rewrites match its erfc) are unchanged. Under differentiation, XLA put
  autodiff's erfc into two fused loops (the value and the derivative both read
  it); this rule computes Phi once, with erf (PyTorch's own form, within 3e-7 of
  the erfc one), and the density with one exp. In a profiled DeiT-Ti step the
  GELU work fell from 0.28 to 0.22 CPU s (README "Performance notes").
  """
  return _exact_gelu(x)


@gelu.defjvp
def _gelu_jvp(primals, tangents):
  (x,), (tangent,) = primals, tangents
  cdf = 0.5 * (1.0 + lax.erf(x * np.asarray(1.0 / math.sqrt(2.0), x.dtype)))
  pdf = jnp.exp(-0.5 * x * x) * np.asarray(1.0 / math.sqrt(2.0 * math.pi), x.dtype)
  return x * cdf, tangent * (cdf + x * pdf)


def make_divisible(value: float, divisor: int = 8,
                   min_value: Optional[int] = None) -> int:
  """Rounds channels to a multiple of `divisor` as in MobileNet / ml-cvnets.

  Never rounds down by more than 10%. Example: ``make_divisible(100) == 104``.
  """
  min_value = min_value or divisor
  new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if new_value < 0.9 * value:
    new_value += divisor
  return new_value


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
  """Per-block stochastic-depth rates rising linearly from 0 to `rate`, per stage."""
  total = sum(depths)
  flat = [rate * i / max(total - 1, 1) for i in range(total)]
  out, start = [], 0
  for d in depths:
    out.append(flat[start:start + d])
    start += d
  return out


def check_divisible_resolution(x: jax.Array, stride: int, model_name: str) -> None:
  """Raises a ValueError naming the resolution when it is not a multiple of stride."""
  if x.ndim != 4:
    raise ValueError(
        f"{model_name} expects an NHWC batch of rank 4, got shape {x.shape}. "
        "Add a batch axis, e.g. x[None].")
  h, w = x.shape[1], x.shape[2]
  if h % stride or w % stride:
    raise ValueError(
        f"{model_name} needs an input resolution divisible by its total stride "
        f"{stride}; got {h}x{w}. Resize to e.g. {max(stride, h // stride * stride)}"
        f"x{max(stride, w // stride * stride)}.")


class DropPath(nn.Module):
  """Stochastic depth per sample (timm DropPath); identity in eval or at rate 0.

  Draws from the 'dropout' RNG stream. `x` may be a tuple of arrays with the same
  leading (batch) axis, e.g. one residual branch computed in parts of its rows:
  each sample then keeps or drops all of its parts together.
  """

  rate: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    batch = jax.tree.leaves(x)[0].shape[0]
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (batch,))

    def drop(part: jax.Array) -> jax.Array:
      per_sample = mask.reshape((batch,) + (1,) * (part.ndim - 1))
      return jnp.where(per_sample, part / keep, jnp.zeros_like(part))

    return jax.tree.map(drop, x)


class Mlp(nn.Module):
  """Linear -> act -> dropout -> Linear -> dropout, on the last axis (timm Mlp)."""

  hidden_features: int
  out_features: Optional[int] = None
  act: Callable[[jax.Array], jax.Array] = gelu
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    out_features = self.out_features or x.shape[-1]
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=trunc_normal,
                              bias_init=nn.initializers.zeros,
                              dot_general=dense_dot_general)
    x = dense(self.hidden_features, name="fc1")(x)
    x = self.act(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = dense(out_features, name="fc2")(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class BatchNorm(nn.Module):
  """BatchNorm over the last axis with PyTorch's semantics (``nn.BatchNorm2d``).

  The variables are Flax's (params ``scale``/``bias``, batch_stats ``mean``/``var``),
  so parameter trees, checkpoints and the torch converters are unchanged. Training
  normalises with the biased batch variance, as both frameworks do, but the running
  variance is updated with the unbiased one, ``var * n / (n - 1)`` over the ``n``
  values per channel, as PyTorch does (Flax uses the biased one). A fine-tune from
  ported reference weights therefore continues the reference's statistics.
  ``momentum`` is Flax's: ``running = momentum * running + (1 - momentum) * batch``
  (PyTorch's momentum 0.1 is 0.9 here). Statistics are reduced in float32.

  Example::

    y, updates = BatchNorm(use_running_average=False).apply(
        variables, x, mutable=["batch_stats"])
  """

  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,),
                                 jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,),
                                jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      mean, var = _batch_moments(x)
      # Flax leaves the statistics at their init values during init; so do we.
      if not self.is_initializing():
        n = x.size // features
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        running_mean.value = m * running_mean.value + (1 - m) * mean
        running_var.value = m * running_var.value + (1 - m) * unbiased
    multiplier = jax.lax.rsqrt(var + self.epsilon) * scale
    y = (x.astype(jnp.float32) - mean) * multiplier + bias
    return y.astype(self.dtype)


def _batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and biased variance, two-pass (stable) in float32."""
  x = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  return mean, jnp.mean(jnp.square(x - mean), axes)


def batch_norm(train: bool, dtype: Dtype, name: Optional[str] = None) -> BatchNorm:
  """PyTorch-style `BatchNorm` with PyTorch's defaults (momentum 0.1, eps 1e-5).

  Running statistics live in the mutable 'batch_stats' collection and are updated
  only when ``train`` is True. Example: ``batch_norm(train, jnp.float32, "bn")(x)``.
  """
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   dtype=dtype, name=name)


def classifier_head(x: jax.Array, num_classes: int, dtype: Dtype,
                    name: str = "head") -> jax.Array:
  """The final Linear; with ``num_classes=0`` returns the features unchanged."""
  if num_classes <= 0:
    return x
  return nn.Dense(num_classes, dtype=dtype, kernel_init=trunc_normal,
                  bias_init=nn.initializers.zeros, name=name)(x)


# ---------------------------------------------------------------------------
# Depthwise convolution with a gradient XLA:CPU computes well.
#
# XLA:CPU lowers the gradients of a depthwise (feature_group_count == C) conv
# badly: the kernel gradient becomes a full C x C convolution of which only the
# diagonal is kept, and the input gradient of a strided one becomes an
# lhs-dilated grouped convolution, the slowest single instructions of a
# MobileViTv2 train step (README "Performance notes"). Both gradients of a
# k x k depthwise conv are k*k shifted multiply-adds, which XLA fuses into a few
# memory-bound loops. The training forward (the custom_vjp's fwd rule) is the
# same k*k shifted multiply-adds; inference and export (jax2tf sees only the
# primal) keep one lax convolution, and the parameter tree is unchanged.
# ---------------------------------------------------------------------------

def _accumulation_dtype(dtype):
  """float32 for bfloat16/float16/float32 inputs, float64 for float64 (tests)."""
  return jnp.promote_types(dtype, jnp.float32)


def undilated_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers) -> bool:
  """True for a conv without dilation on NHWC input with an HWIO kernel."""
  if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
    return False
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  return (dimension_numbers == nhwc
          or dimension_numbers == ("NHWC", "HWIO", "NHWC"))


def _is_plain_depthwise(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers,
                        feature_group_count, batch_group_count) -> bool:
  """True for an undilated 2-D NHWC/HWIO conv with one filter per input channel."""
  if lhs.ndim != 4 or feature_group_count == 1 or batch_group_count != 1:
    return False
  channels = lhs.shape[-1]
  if rhs.shape[2:] != (1, channels) or feature_group_count != channels:
    return False
  return undilated_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers)


def _depthwise_forward(x, w, strides, pads):
  return lax.conv_general_dilated(
      x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_conv(x, w, strides, pads):
  return _depthwise_forward(x, w, strides, pads)


def _tap_windows(x, kernel_hw, strides, pads):
  """The k*k strided windows of zero-padded `x` that a conv's taps read, row-major
  (tap (i, j) at index i * kw + j), each of the output's shape."""
  (sh, sw), ((top, bottom), (left, right)) = strides, pads
  kh, kw = kernel_hw
  xp = lax.pad(x, jnp.zeros((), x.dtype),
               ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
  batch, padded_h, padded_w, channels = xp.shape
  out_h, out_w = (padded_h - kh) // sh + 1, (padded_w - kw) // sw + 1
  span_h, span_w = sh * (out_h - 1) + 1, sw * (out_w - 1) + 1
  return [lax.slice(xp, (0, i, j, 0), (batch, i + span_h, j + span_w, channels),
                    (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]


def _depthwise_taps(x, w, strides, pads):
  """The depthwise conv as k*k shifted multiply-adds (one fused loop in XLA).

  The same sums as the convolution in another order. XLA:CPU's depthwise
  convolution (YNNPACK) ran at ~0.5 GFLOP/s here (0.62 s for a 3x3 on
  [32, 128, 128, 32]); this form took 0.06 s.
  """
  acc = _accumulation_dtype(x.dtype)
  taps = w.astype(acc).reshape(-1, w.shape[-1])  # [k*k, C], row-major like the windows
  y = None
  for window, tap in zip(_tap_windows(x, w.shape[:2], strides, pads), taps):
    term = window.astype(acc) * tap
    y = term if y is None else y + term
  return y.astype(x.dtype)


def _depthwise_conv_fwd(x, w, strides, pads):
  # Only under differentiation (training): inference and export trace the
  # primal above, which stays one lax convolution (TFLite's DEPTHWISE_CONV_2D).
  return _depthwise_taps(x, w, strides, pads), (x, w)


def _depthwise_conv_bwd(strides, pads, residuals, g):
  x, w = residuals
  (sh, sw), ((top, bottom), (left, right)) = strides, pads
  kh, kw = w.shape[:2]
  _, out_h, out_w, channels = g.shape
  padded_h, padded_w = x.shape[1] + top + bottom, x.shape[2] + left + right
  span_h, span_w = sh * (out_h - 1) + 1, sw * (out_w - 1) + 1
  # Accumulated in float32 (bf16 sums of k*k taps lose ~2 bits); a no-op in float32.
  acc = _accumulation_dtype(x.dtype)
  g32 = g.astype(acc)
  # Kernel gradient: tap (i, j) correlates the input window it saw with g.
  products = tuple(window.astype(acc) * g32
                   for window in _tap_windows(x, (kh, kw), strides, pads))
  # One variadic reduce over the width for all k*k taps, then a small sum over
  # batch x height. XLA fuses the windows into the variadic reduce's single loop;
  # k*k separate jnp.sum calls went to YNNPACK's reduction, which cannot fuse a
  # slice, so each window was written out first (4-9x slower on EdgeViT and
  # MobileViTv2 shapes). Keeping [batch, height] in that loop was 2.3-2.8x
  # faster than reducing them there too, and keeps the float32 sums short
  # (error ~1e-7, not ~1e-5).
  row_sums = lax.reduce(products, tuple(jnp.zeros((), acc) for _ in products),
                        lambda a, b: tuple(u + v for u, v in zip(a, b)), (2,))
  dw = jnp.sum(jnp.stack(row_sums), axis=(1, 2)).reshape(kh, kw, 1, channels)
  dw = dw.astype(w.dtype)
  # Input gradient: the correlation of g, spread over the stride (interior
  # padding) and padded by k - 1, with the flipped kernel, cropped to x. Written
  # as taps that each read g (like the forward), it is one fused loop; the
  # scattering form (k*k padded copies of g * w[i, j], summed) was split by XLA
  # into several loops per conv in a train step (EdgeViT's 5x5 convs: 27).
  spread = lax.pad(g, jnp.zeros((), g.dtype),
                   ((0, 0, 0), (kh - 1, padded_h - span_h, sh - 1),
                    (kw - 1, padded_w - span_w, sw - 1), (0, 0, 0)))
  dxp = _depthwise_taps(spread, w[::-1, ::-1], (1, 1), ((0, 0), (0, 0)))
  dx = lax.pad(dxp, jnp.zeros((), dxp.dtype),
               ((0, 0, 0), (-top, -bottom, 0), (-left, -right, 0), (0, 0, 0)))
  return dx.astype(x.dtype), dw


_depthwise_conv.defvjp(_depthwise_conv_fwd, _depthwise_conv_bwd)


# A 1x1 conv is a matmul (G matmuls with G groups), but XLA:CPU differentiates
# it as convolutions. Its kernel gradient then contracts over batch x height x
# width inside a convolution, which YNNPACK runs at a few GFLOP/s (0.8 s for one
# 32x64 kernel of MobileViTv2-0.5 at 256, batch 32). Here both gradients are
# (batched) matmuls over the groups, and so is the training forward; the primal
# (inference, export) stays lax's convolution, as for the depthwise conv above.

def _is_pointwise(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                  dimension_numbers, feature_group_count, batch_group_count) -> bool:
  """True for an undilated, unpadded, stride-1 1x1 NHWC/HWIO conv (any groups)."""
  if lhs.ndim != 4 or batch_group_count != 1:
    return False
  if rhs.shape[:2] != (1, 1) or rhs.shape[2] * feature_group_count != lhs.shape[-1]:
    return False
  if tuple(window_strides) != (1, 1):
    return False
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID"):
      return False
  elif any(int(p) != 0 for pair in padding for p in pair):
    return False
  return undilated_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers)


def _kernel_by_group(w, groups):
  """A grouped 1x1 kernel [1, 1, C/G, O] as [G, C/G, O/G]: group k maps input
  block k to output block k."""
  per_group_in, out = w.shape[2:]
  return jnp.transpose(w.reshape(per_group_in, groups, out // groups), (1, 0, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pointwise_conv(x, w, groups):
  return lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=groups)


def _pointwise_conv_fwd(x, w, groups):
  # Only under differentiation (training); inference and export trace the primal
  # above (TFLite's CONV_2D). The training forward is one 2-D matmul (G batched
  # ones with groups): XLA:CPU's convolution (YNNPACK) ran these 1x1 convs at
  # 3-18 GMAC/s, the matmul 1.6-1.9x faster on MobileViTv2-0.5's shapes and the
  # batched one 1.2-2.9x on TFormer-S's 2-group PCS-FFN (batch 32).
  rows, (per_group_in, out) = x.shape[0] * x.shape[1] * x.shape[2], w.shape[2:]
  if groups == 1:
    y = lax.dot_general(x.reshape(rows, per_group_in), w.reshape(per_group_in, out),
                        (((1,), (0,)), ((), ())))
  else:
    y = jnp.einsum("mgc,gco->mgo", x.reshape(rows, groups, per_group_in),
                   _kernel_by_group(w, groups))
  return y.reshape(x.shape[:3] + (out,)), (x, w)


def _pointwise_conv_bwd(groups, residuals, g):
  x, w = residuals
  per_group_in, out = w.shape[2], w.shape[3]
  rows = x.shape[0] * x.shape[1] * x.shape[2]
  if groups == 1:
    # Plain 2-D matmuls: the kernel gradient's operands contract over their
    # leading axis, which XLA:CPU folds into the matmul. The batched einsum
    # below (group axis in the middle) makes XLA transpose the activation first.
    dx, dw = _matmul_gradients(x.reshape(rows, per_group_in), w.reshape(per_group_in, out),
                               g.reshape(rows, out))
    return dx.reshape(x.shape), dw.reshape(w.shape)
  wg = _kernel_by_group(w, groups)
  xg = x.reshape(rows, groups, per_group_in)
  gg = g.reshape(rows, groups, out // groups)
  acc = _accumulation_dtype(x.dtype)
  dx = jnp.einsum("mgo,gco->mgc", gg, wg, preferred_element_type=acc)
  dwg = jnp.einsum("mgc,mgo->gco", xg, gg, preferred_element_type=acc)
  dw = jnp.transpose(dwg, (1, 0, 2)).reshape(w.shape)
  return dx.reshape(x.shape).astype(x.dtype), dw.astype(w.dtype)


_pointwise_conv.defvjp(_pointwise_conv_fwd, _pointwise_conv_bwd)


def _matmul_gradients(x2, w, g2):
  """Gradients of ``x2 @ w`` for 2-D ``x2`` [M, C], ``w`` [C, O], cotangent [M, O].

  The kernel gradient is one dot contracting the leading axis of both operands;
  XLA:CPU hands that to its matmul with a transposed operand instead of
  materialising ``x2.T`` (which it does when the contraction spans several
  leading axes, e.g. batch x tokens).
  """
  acc = _accumulation_dtype(x2.dtype)
  dx = lax.dot_general(g2, w, (((1,), (1,)), ((), ())), preferred_element_type=acc)
  dw = lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), preferred_element_type=acc)
  return dx.astype(x2.dtype), dw.astype(w.dtype)


# nn.Dense on [B, N, C] tokens contracts the kernel gradient over batch x tokens.
# Autodiff's dot for it has two contracting axes, and XLA:CPU canonicalises that
# by transposing the activation into [C, B*N] (fused into whatever produced it,
# e.g. a LayerNorm, which then writes with a stride). Flattening the leading axes
# first leaves one contracting axis that the matmul takes transposed: 116 -> 84 ms
# for a LayerNorm + [32, 197, 192] x [192, 768] Dense gradient on one core.

@jax.custom_vjp
def _dense(x, w):
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_fwd(x, w):
  return _dense(x, w), (x, w)


def _dense_bwd(residuals, g):
  x, w = residuals
  dx, dw = _matmul_gradients(x.reshape(-1, x.shape[-1]), w, g.reshape(-1, g.shape[-1]))
  return dx.reshape(x.shape), dw


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None, **kwargs):
  """`lax.dot_general` for ``nn.Dense(dot_general=...)`` with a faster gradient.

  For a Dense layer's contraction (last axis of an input of rank 3 or more with
  a [C, O] kernel, same dtypes, default precision) the forward is lax's own dot
  (inference and export trace that) and the gradients are 2-D matmuls over the
  flattened leading axes (see `_matmul_gradients`). Everything else goes to lax
  unchanged, as does everything while `use_fast_gradients(False)`.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (_FAST_GRADIENTS["enabled"] and not kwargs
      and precision is None and preferred_element_type is None
      and lhs.ndim >= 3 and rhs.ndim == 2 and lhs.dtype == rhs.dtype
      and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
      and not tuple(lhs_batch) and not tuple(rhs_batch)):
    return _dense(lhs, rhs)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)


# Qwix's QAT interception (vit_edge/compress/qat.py) cannot see a kernel that
# reaches lax through a custom_vjp (it stops with "expected to be an activation"),
# so QAT turns the custom gradients off for the process: the values are the same,
# only the backward pass is XLA's slower default.
_FAST_GRADIENTS = {"enabled": True}


def use_fast_gradients(enabled: bool) -> None:
  """Turns the custom gradients (depthwise and 1x1 convs, Dense, max pooling) on or off.

  Applies to convs traced from now on.
  """
  _FAST_GRADIENTS["enabled"] = bool(enabled)


# cuDNN's fused (flash) attention is used only on a GPU and in 16-bit compute: there
# it avoids writing the [B, heads, N, N] logits and float32 probabilities to memory,
# forward and backward. On a CPU, in float32, and so in everything exported to
# TFLite (the exporter builds float32 models) each model keeps its own einsum +
# float32 softmax, so the fidelity tests and the exporter's rewrites see the graph
# they always saw.
_FUSED_ATTENTION = {"enabled": True}


def use_fused_attention(enabled: bool) -> None:
  """Turns cuDNN fused attention on or off for models traced from now on."""
  _FUSED_ATTENTION["enabled"] = bool(enabled)


def fused_attention_applies(dtype: Dtype) -> bool:
  """Whether `fused_attention` is the one to use for attention computed in `dtype`."""
  return (_FUSED_ATTENTION["enabled"] and jax.default_backend() == "gpu"
          and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))


def fused_attention(qkv: jax.Array, scale: float,
                    implementation: Optional[str] = "cudnn") -> jax.Array:
  """softmax(q k^T * scale) v through cuDNN, from the packed qkv projection.

  Args:
    qkv: [B, N, 3, heads, head_dim], the fused qkv Dense output reshaped as timm
      does before its permute (so q, k, v are already in cuDNN's [B, N, heads, hd]
      layout and no transpose is needed).
    scale: the logit scale, head_dim ** -0.5.
    implementation: `jax.nn.dot_product_attention`'s; the tests pass "xla" to
      check this wiring on a CPU.

  Returns:
    [B, N, heads * head_dim], the heads concatenated as timm's transpose+reshape does.
  """
  b, n, _, heads, head_dim = qkv.shape
  # cuDNN's training kernels take only even sequence lengths (DeiT's 197 tokens,
  # EdgeViT's 7x7 = 49 are refused), so odd ones get one zero token that the
  # sequence lengths mask out as a key; its query row is sliced off.
  padded = qkv if n % 2 == 0 else jnp.pad(qkv, ((0, 0), (0, 1), (0, 0), (0, 0), (0, 0)))
  lengths = jnp.full((b,), n, jnp.int32) if n % 2 else None
  try:
    out = jax.nn.dot_product_attention(
        padded[:, :, 0], padded[:, :, 1], padded[:, :, 2], scale=scale,
        query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        implementation=implementation)
  # jax checks cuDNN's support while tracing: NotImplementedError for a shape it
  # refuses, RuntimeError for no cuDNN (a ROCm GPU) or a GPU older than Ampere.
  # Either way XLA computes the same function.
  except (NotImplementedError, RuntimeError):
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                       scale=scale, implementation="xla")
  return out[:, :n].reshape(b, n, heads * head_dim)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
  """`lax.conv_general_dilated` with fast gradients for depthwise and 1x1 convs.

  A drop-in for ``nn.Conv(..., conv_general_dilated=layers.conv_general_dilated)``:
  plain depthwise convs (one k x k filter per channel, no dilation, NHWC) get the
  shifted multiply-add gradient above, 1x1 convs (stride 1, unpadded, any groups)
  the matmul one; every other conv goes to lax unchanged. Forward values are
  lax's own.
  """
  if (_FAST_GRADIENTS["enabled"]
      and precision is None and preferred_element_type is None
      and _is_plain_depthwise(lhs, rhs, lhs_dilation, rhs_dilation,
                              dimension_numbers, feature_group_count,
                              batch_group_count)):
    pads = padding
    if isinstance(padding, str):
      pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides,
                                 padding)
    pads = tuple(tuple(int(p) for p in pair) for pair in pads)
    return _depthwise_conv(lhs, rhs, tuple(int(s) for s in window_strides), pads)
  if (_FAST_GRADIENTS["enabled"]
      and precision is None and preferred_element_type is None
      and _is_pointwise(lhs, rhs, window_strides, padding, lhs_dilation,
                                rhs_dilation, dimension_numbers, feature_group_count,
                                batch_group_count)):
    return _pointwise_conv(lhs, rhs, int(feature_group_count))
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)


# ---------------------------------------------------------------------------
# Max pooling with a gradient XLA:CPU computes well.
#
# The gradient of a max pool is a select-and-scatter, which XLA:CPU expands into
# a reduce-window that carries four int32 index arrays (built by iotas as large
# as the input) and then a scatter: in TFormer's train step (three stride-1 max
# pools per block) these were the largest share of the step's CPU time
# (README "Performance notes"). Here the backward pass finds, per output, the
# first window position (row-major) that holds the maximum, as XLA's
# select-and-scatter (select `ge`) and PyTorch's max_pool2d backward do, and
# sends the output gradient there with k*k shifted adds. The forward pass stays
# lax's reduce_window, so inference and export see the same primitive.
# ---------------------------------------------------------------------------

def _max_pool_forward(x, window, strides, pads):
  return lax.reduce_window(x, np.array(-np.inf, x.dtype), lax.max,
                           (1, *window, 1), (1, *strides, 1),
                           ((0, 0), *pads, (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, pads):
  return _max_pool_forward(x, window, strides, pads)


def _max_pool_fwd(x, window, strides, pads):
  y = _max_pool_forward(x, window, strides, pads)
  return y, (x, y)


def _max_pool_bwd(window, strides, pads, residuals, g):
  x, y = residuals
  (kh, kw), (sh, sw), ((top, bottom), (left, right)) = window, strides, pads
  batch, out_h, out_w, channels = y.shape
  xp = lax.pad(x, jnp.array(-jnp.inf, x.dtype),
               ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
  padded_h, padded_w = xp.shape[1:3]
  span_h, span_w = sh * (out_h - 1) + 1, sw * (out_w - 1) + 1
  offsets = [(i, j) for i in range(kh) for j in range(kw)]

  def window_at(i, j):
    return lax.slice(xp, (0, i, j, 0), (batch, i + span_h, j + span_w, channels),
                     (1, sh, sw, 1))

  # Visiting the taps last to first leaves the FIRST one that equals the max.
  choice = jnp.full(y.shape, len(offsets), jnp.int32)
  for tap in reversed(range(len(offsets))):
    choice = jnp.where(window_at(*offsets[tap]) == y, tap, choice)
  # Materialised once: the adds below read it k*k times at shifted positions.
  choice = lax.optimization_barrier(choice)
  acc = _accumulation_dtype(x.dtype)
  g32, zero = g.astype(acc), jnp.zeros((), acc)
  dxp = None
  for tap, (i, j) in enumerate(offsets):
    part = lax.pad(jnp.where(choice == tap, g32, zero), zero,
                   ((0, 0, 0), (i, padded_h - i - span_h, sh - 1),
                    (j, padded_w - j - span_w, sw - 1), (0, 0, 0)))
    dxp = part if dxp is None else dxp + part
  dx = lax.pad(dxp, zero, ((0, 0, 0), (-top, -bottom, 0), (-left, -right, 0), (0, 0, 0)))
  return (dx.astype(x.dtype),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int] = (1, 1),
             padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0))) -> jax.Array:
  """2-D max pooling of an NHWC map, padded with -inf, with a fast gradient.

  The values of ``nn.max_pool(x, window, strides, padding)`` (PyTorch's
  ``MaxPool2d`` with the same window, stride and padding); the gradient goes to
  the first maximum of each window, as in both. Example:
  ``max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))`` keeps the shape of ``x``.
  """
  if x.ndim != 4:
    raise ValueError(f"max_pool expects an NHWC map (4 dims), got shape {x.shape}.")
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if not _FAST_GRADIENTS["enabled"]:
    return _max_pool_forward(x, tuple(window), tuple(strides), pads)
  return _max_pool(x, tuple(int(k) for k in window), tuple(int(s) for s in strides),
                   pads)
