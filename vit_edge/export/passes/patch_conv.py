"""A patchifying convolution (kernel = stride, no padding) as a gather and one GEMM.

A ViT's patch embedding (16 x 16, stride 16, 3 -> 192 channels for DeiT-Ti) and
EdgeViT's stem (4 x 4, stride 4, 3 -> 36) reach XNNPACK's CONV_2D with 3 input
channels, so its indirect GEMM gathers 3 floats per pointer: 4.9 ms for DeiT-Ti's
patch embedding at one thread on this machine, against 2.0 ms for the same
products as a RESHAPE, TRANSPOSE, RESHAPE and one FULLY_CONNECTED (the im2col that
ONNX Runtime's convolution does, here a mere reordering because patches do not
overlap). EdgeViT's 2 x 2 downsampling convs gain 3-6% the same way. Only the
order of the sums changes (|difference| ~2e-6 on unit-scale inputs).
"""

from __future__ import annotations

from vit_edge.export.passes import base


def _patch_grid(eqn):
  """(rows, cols) of patches if `eqn` is a patchifying NHWC conv, else None."""
  if not base.is_plain_conv(eqn):
    return None
  lhs, kernel = (v.aval for v in eqn.invars)
  kh, kw = kernel.shape[:2]
  if tuple(eqn.params["window_strides"]) != (kh, kw) or kh * kw == 1:
    return None
  grid = lhs.shape[1] // kh, lhs.shape[2] // kw
  return None if 0 in grid else grid


def _apply(eqn, invals, ctx: base.Context):
  from jax import lax  # pylint: disable=g-import-not-at-top
  grid = _patch_grid(eqn)
  kernel = None if grid is None else ctx.constant(eqn.invars[1])
  if kernel is None:
    return None
  (rows, cols), (kh, kw, channels, features) = grid, kernel.shape
  lhs = invals[0]
  batch = lhs.shape[0]
  # 'VALID' drops the right and bottom rest of a size that the patch does not divide.
  x = lhs if lhs.shape[1:3] == (rows * kh, cols * kw) else lhs[:, :rows * kh, :cols * kw]
  patches = x.reshape(batch * rows, kh, cols, kw, channels).transpose(0, 2, 1, 3, 4)
  out = lax.dot_general(patches.reshape(batch * rows * cols, kh * kw * channels),
                        kernel.reshape(kh * kw * channels, features),
                        (((1,), (0,)), ((), ())), precision=eqn.params["precision"],
                        preferred_element_type=eqn.params["preferred_element_type"])
  return out.reshape(batch, rows, cols, features)


PASS = base.Pass("patch_conv_as_matmul", frozenset({"conv_general_dilated"}), _apply)
