"""Two pointwise linear maps in a row, with only a per-channel affine between, as one.

MobileViTv2 ends each MobileViT block with a 1x1 conv and BatchNorm (no
activation) and the next stage begins with a MobileNetV2 block's 1x1 expansion,
so a 64 -> 128 -> 256 pair of products (MobileViTv2-0.5, at 32 x 32) runs where
one 64 -> 256 product gives the same map:

    ((x W1 + b1) * s + t) W2 = x (W1 diag(s) W2) + ((b1 * s + t) W2)

Layer 4 into layer 5 is a second such pair, and layer 1's last 1x1 projection
with layer 2's first expansion a third; merging the three saves 12% of the MACs
of MobileViTv2-0.5 and -1.0 at 256.
The pair is merged only where the merged product has fewer MACs (Cin * Cout <
Cmid * (Cin + Cout)); a bottleneck (256 -> 64 -> 256) stays two products. The
maps in between may be adds, subtractions and multiplications by per-channel
constants (BatchNorm at inference, biases), each read once. Only the rounding
changes (the merged kernel is computed in float64).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from vit_edge.export.passes import base
from vit_edge.export.passes import projection

_AFFINE = ("add", "sub", "mul")


def _pointwise_kernel(eqn, ctx: base.Context) -> Optional[np.ndarray]:
  """[Cin, Cout] of a 1x1 NHWC conv or a projection with a constant kernel, else None."""
  if eqn.primitive.name == "dot_general":
    lhs = eqn.invars[0].aval
    kernel = ctx.constant(eqn.invars[1])
    ok = kernel is not None and projection.is_projection(eqn, lhs, kernel)
    return kernel if ok else None
  if (eqn.primitive.name != "conv_general_dilated" or not base.is_plain_conv(eqn)
      or eqn.invars[1].aval.shape[:2] != (1, 1)
      or tuple(eqn.params["window_strides"]) != (1, 1)):
    return None
  kernel = ctx.constant(eqn.invars[1])
  return None if kernel is None else kernel[0, 0]


def _affine_step(eqn, ctx: base.Context) -> Optional[tuple[Any, str, np.ndarray, bool]]:
  """(traced input, op, per-channel constant, constant-first) of an affine step."""
  if eqn.primitive.name not in _AFFINE:
    return None
  out = eqn.outvars[0].aval
  for i in (0, 1):
    traced, const = eqn.invars[i], eqn.invars[1 - i]
    if base.is_literal(traced) or traced.aval.shape != out.shape:
      continue
    value = ctx.constant(const)
    if value is not None:
      vector = base.channel_vector(value, out.shape, out.shape[-1])
      return None if vector is None else (traced, eqn.primitive.name, vector, i == 1)
  return None


def _compose(steps, channels: int) -> tuple[np.ndarray, np.ndarray]:
  """(scale, shift) per channel of the steps applied in order: z -> z * scale + shift."""
  scale, shift = np.ones(channels), np.zeros(channels)
  for op, vector, const_first in steps:
    vector = vector.astype(np.float64)
    if op == "add":
      shift = shift + vector
    elif op == "mul":
      scale, shift = scale * vector, shift * vector
    elif const_first:  # c - z
      scale, shift = -scale, vector - shift
    else:  # z - c
      shift = shift - vector
  return scale, shift


def _apply(eqn, invals, ctx: base.Context):
  from jax import lax  # pylint: disable=g-import-not-at-top
  second = _pointwise_kernel(eqn, ctx)
  if second is None:
    return None
  atom, steps = eqn.invars[0], []
  while True:  # Back from the second product's input to the first product.
    producer = None if base.is_literal(atom) else ctx.producers.get(atom)
    if producer is None or not ctx.used_once(atom):
      return None
    first = _pointwise_kernel(producer, ctx)
    if first is not None:
      break
    step = _affine_step(producer, ctx)
    if step is None:
      return None
    atom, op, vector, const_first = step
    steps.append((op, vector, const_first))
  (cin, cmid), cout = first.shape, second.shape[1]
  if cin * cout >= cmid * (cin + cout):
    return None
  scale, shift = _compose(reversed(steps), cmid)
  x = ctx.read(producer.invars[0])
  kernel = ((first.astype(np.float64) * scale) @ second).astype(x.dtype)
  offset = (shift @ second).astype(x.dtype)
  if eqn.primitive.name == "dot_general":
    out = projection.project(eqn, x, kernel)
  else:
    p = eqn.params
    out = lax.conv_general_dilated(
        x, kernel[None, None], (1, 1), "VALID", dimension_numbers=p["dimension_numbers"],
        precision=p["precision"], preferred_element_type=p["preferred_element_type"])
  return out + offset if np.any(offset) else out


PASS = base.Pass("linear_pair", frozenset({"conv_general_dilated", "dot_general"}),
                 _apply)
