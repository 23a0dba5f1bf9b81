"""A projection of a map with a size-1 token or patch axis as a 1x1 convolution.

TF 2.21's converter folds such a product into a BATCH_MATMUL of the wrong rank
and fails ("invalid output rank"): MobileViTv2 at 64 px (one patch per block),
EdgeViT at 32 px (one token per window). A 1x1 CONV_2D is the same GEMM on
XNNPACK. Other projections keep their product.
"""

from __future__ import annotations

import numpy as np

from vit_edge.export.passes import base


def is_projection(eqn, lhs, rhs) -> bool:
  """Whether dot_general `eqn` is ``lhs @ W`` over lhs's last axis, W constant 2-D."""
  (lhs_contract, rhs_contract), (lhs_batch, _) = eqn.params["dimension_numbers"]
  return (not base.is_traced(rhs) and np.ndim(rhs) == 2 and not lhs_batch
          and tuple(rhs_contract) == (0,) and tuple(lhs_contract) == (lhs.ndim - 1,))


def product_and_bias(atom, ctx: base.Context):
  """(dot_general eqn, bias or None) when `atom` is ``x @ W`` or ``x @ W + b``."""
  add = ctx.producer(atom, "add")
  if add is not None:
    for i in (0, 1):
      bias = ctx.constant(add.invars[1 - i])
      dot = ctx.producer(add.invars[i], "dot_general")
      if bias is not None and dot is not None:
        return dot, bias
  return ctx.producer(atom, "dot_general"), None


def project(eqn, lhs, rhs):
  """The projection `eqn` (see is_projection) of `lhs` by `rhs`, convertible."""
  if lhs.ndim not in (3, 4) or 1 not in lhs.shape[1:-1]:
    return base.bind(eqn, lhs, rhs)
  import jax  # pylint: disable=g-import-not-at-top
  image = lhs if lhs.ndim == 4 else lhs[:, :, None, :]
  out = jax.lax.conv_general_dilated(
      image, np.asarray(rhs, lhs.dtype)[None, None], (1, 1), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=eqn.params.get("preferred_element_type"))
  return out.reshape(*lhs.shape[:-1], rhs.shape[-1])


def _apply(eqn, invals, ctx: base.Context):
  del ctx
  lhs, rhs = invals
  if not is_projection(eqn, lhs, rhs) or lhs.ndim not in (3, 4) or (
      1 not in lhs.shape[1:-1]):
    return None
  return project(eqn, lhs, rhs)


PASS = base.Pass("unit_axis_projection", frozenset({"dot_general"}), _apply)
