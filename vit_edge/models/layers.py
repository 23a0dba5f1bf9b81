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
import jax.numpy as jnp

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
gelu = functools.partial(nn.gelu, approximate=False)


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

  Draws from the 'dropout' RNG stream.
  """

  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


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
                              bias_init=nn.initializers.zeros)
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
