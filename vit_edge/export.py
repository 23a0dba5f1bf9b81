r"""Export of a trained or registry model to a self-describing TFLite file.

Usage::

    # A trained run (config.json, dataset_info.json, checkpoints/ in the workdir):
    python -m vit_edge.export --workdir=/tmp/tformer_s --quantize=int8 \
        --out=tformer_s_int8.tflite
    # A randomly initialised registry model (no workdir), e.g. for benchmarks:
    python -m vit_edge.export --model=edgevit_xxs --image_size=224 \
        --num_classes=1000 --quantize=none --out=edgevit_xxs.tflite

What every export does:

* jax2tf native serialisation for the CPU platform, static batch 1, then the
  TFLite converter of TF 2.21 lowers it to builtin ops.
* One signature, ``serving_default``: input ``image`` (float32 [1, S, S, 3],
  normalised as in training) and outputs ``logits`` and ``probs`` (softmax).
* A JSON metadata entry named ``vit_edge`` in the model's flatbuffer (labels,
  input size, normalisation mean/std, eval crop, model name, quantisation): the
  runtime in :mod:`vit_edge.runtime` needs nothing but the .tflite file.
* Quantisation (``quantize``): ``none`` (float32), ``fp16`` (float16 weights,
  float32 compute), ``dynamic`` (int8 weights, activations quantised on the fly
  by the kernels) or ``int8`` (post-training quantisation calibrated on
  ``num_calibration_samples`` training images with eval-style preprocessing).
  ``int8`` keeps float input/output and quantises every op that XNNPACK runs in
  int8 (convolutions, matmuls with constant weights, elementwise ops); the few it
  cannot (batched matmul, rsqrt, softmax, GELU: :data:`INT8_FLOAT_OPS`, plus any
  op the installed XNNPACK rejects) stay float, because TFLite's own int8 kernels
  for them are many times slower and split XNNPACK's graph. ``integer_io=True``
  instead gives a full-integer model with int8 input/output for integer-only
  accelerators.
* A parity guard: the exported bytes run in ai_edge_litert on real sample images
  and are compared with the JAX model (always float32, whatever the training
  dtype). Float exports must satisfy, over the parity samples,

      max |logits_tflite - logits_jax| <= atol + rtol * max |logits_jax|

  with (atol, rtol) = (1e-3, 1e-3) for ``none`` and (1e-2, 1e-2) for ``fp16``
  (see :data:`FLOAT_TOLERANCES`), or the export raises :class:`ParityError` and
  writes nothing. Quantised exports report their top-1 agreement with JAX and,
  from a workdir, the top-1 accuracy of both on the eval split.

Export-time graph rewrites (the model code is untouched; see
:func:`inference_function`), each removing ops that XNNPACK, LiteRT's CPU
delegate, does not run or that the converter lowers badly:

* The exact GELU, which JAX lowers to a polynomial erfc with ``select`` ops (43
  XNNPACK partitions and 2.7x the latency for edgevit_xxs), becomes either the
  tanh form that the converter fuses into one TFLite ``GELU`` op
  (``gelu="tanh"``, the default: |error| <= 4.8e-4 per activation, covered by the
  tolerances above) or a clamped rational erf of XNNPACK-supported ops
  (``gelu="exact"``, |error| < 1e-6).
* Strided slices ``x[:, ::r, ::r]`` (EdgeViT's subsampling) become reshape + slice.
* Stride-1 'same' window sums (TFormer's average pooling) become
  ``sum / count``, which the converter turns into AVERAGE_POOL_2D instead of a
  reference STABLEHLO_REDUCE_WINDOW kernel (14x slower, and int8 rejects it);
  the model's multiplication by the inverse counts is folded away.
* Stride-1 'same' max pools of 5 x 5 and 7 x 7 become stacked 3 x 3 ones, shared
  between the branches of one input (exact; TFormer's max pools cost 3.8 ms of
  its 20 ms in float before).
* A softmax over a middle axis (MobileViTv2's context scores) is redone over the
  last axis, which the converter fuses into one SOFTMAX op.
* Broadcasts that feed a reshape (GroupNorm statistics) become a product with a
  ones matrix instead of BROADCAST_TO.
* For ``int8`` only: a projection whose output is sliced along its last axis
  (MobileViTv2's fused query/key/value) becomes one product per slice, so each
  part gets its own int8 scale.
* A projection of a map with a size-1 token or patch axis (EdgeViT at 32 px,
  MobileViTv2 at 64 px) becomes a 1x1 convolution: the converter folds it into a
  BATCH_MATMUL of the wrong rank and fails otherwise.

A model with an ``export_friendly`` field is traced with it set: the same
function and parameters in the form that converts best (TFormer: PCS-FFN's
channel shuffle folded into its group convs, no transpose; int8 tformer_s at 224
went from 9.2 to 7.9 ms).

Example::

    report = export_from_workdir("/tmp/tformer_s", "tformer_s_int8.tflite",
                                 quantize="int8")
    print(report.summary())
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from vit_edge.runtime import metadata as metadata_lib

# TensorFlow is only needed for conversion; keep its C++ logging quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

QUANTIZE_MODES = ("none", "fp16", "dynamic", "int8")
GELU_MODES = ("tanh", "exact")
SIGNATURE_KEY = "serving_default"
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "probs")
# (atol, rtol) of the parity guard for float exports, relative to max |logits|.
FLOAT_TOLERANCES = {"none": (1e-3, 1e-3), "fp16": (1e-2, 1e-2)}
DEFAULT_NUM_CALIBRATION_SAMPLES = 200
DEFAULT_NUM_PARITY_SAMPLES = 16
# int8 exports keep ops on tensors of at most this many elements in float, and
# ops whose int8 output is off by more than this many quantisation steps (RMS).
_SMALL_TENSOR = 4096
_MAX_INT8_ERROR = 5.0
# Op types that int8 exports keep in float (see _quantize_for_xnnpack).
INT8_FLOAT_OPS = ("BATCH_MATMUL", "RSQRT", "SOFTMAX", "GELU")


class ParityError(RuntimeError):
  """The TFLite model does not reproduce the JAX model within the tolerance."""


def _check_quantize(quantize: str) -> None:
  if quantize not in QUANTIZE_MODES:
    raise ValueError(f"quantize={quantize!r} is not supported; expected one of "
                     f"{QUANTIZE_MODES} (e.g. --quantize=int8).")


def _check_gelu(gelu: str) -> None:
  if gelu not in GELU_MODES:
    raise ValueError(f"gelu={gelu!r} is not supported; expected one of "
                     f"{GELU_MODES}.")


# ----------------------------------------------------------------------------------
# Export-time rewrites of the traced model (a jaxpr interpreter).

# Eigen's float erf: x clamped to [-4, 4], an odd rational polynomial; the error
# is below 2e-7 everywhere and only min/max/mul/add/div are needed.
_ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
              -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
              -1.60960333262415e-02)
_ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
             -7.37332916720468e-03, -1.42647390514189e-02)
# Higher-order primitives evaluated inline, so their bodies are rewritten too.
_INLINE_PARAMS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
                  "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
                  "custom_vjp_call": "call_jaxpr", "checkpoint": "jaxpr",
                  "remat": "jaxpr"}


def _erf_rational(x):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.clip(x, -4.0, 4.0)
  x2 = x * x
  p = x2 * _ERF_ALPHA[0] + _ERF_ALPHA[1]
  for a in _ERF_ALPHA[2:]:
    p = p * x2 + a
  q = x2 * _ERF_BETA[0] + _ERF_BETA[1]
  for b in _ERF_BETA[2:]:
    q = q * x2 + b
  return x * p / q


def _one_plus_tanh_gelu(x):
  """1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)), spelled as the converter fuses it.

  With the surrounding ``(0.5 * x) * (...)`` of jax.nn.gelu this is one of the
  tanh-GELU patterns of TFLite's optimizer (``x * x * x``, not ``integer_pow``
  or a coefficient-first product), which becomes a single ``GELU`` op.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return 1.0 + jnp.tanh(0.7978845608028654 * (x + 0.044715 * (x * x * x)))


def _literal_value(atom) -> Optional[float]:
  from jax.extend import core as jex_core  # pylint: disable=g-import-not-at-top
  if isinstance(atom, jex_core.Literal) and np.size(atom.val) == 1:
    return float(np.asarray(atom.val))
  return None


def _exact_gelu_input(var, producers):
  """x when `var` is ``neg(x) * sqrt(1/2)``, as jax.nn.gelu(approximate=False) has it."""
  mul = producers.get(var)
  if mul is None or mul.primitive.name != "mul":
    return None
  for i in (0, 1):
    value = _literal_value(mul.invars[1 - i])
    if value is not None and abs(value - math.sqrt(0.5)) < 1e-6:
      neg = producers.get(mul.invars[i])
      if neg is not None and neg.primitive.name == "neg":
        return neg.invars[0]
  return None


def _strided_slice(x, start, limit, strides):
  """``lax.slice`` with strides as pad + reshape + unit-stride slice (XNNPACK-able)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  x = lax.slice(x, start, limit)
  for axis, stride in enumerate(strides):
    if stride == 1:
      continue
    length = x.shape[axis]
    count = -(-length // stride)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, count * stride - length)
    if pad[axis][1]:
      x = jnp.pad(x, pad)
    shape = x.shape[:axis] + (count, stride) + x.shape[axis + 1:]
    x = lax.index_in_dim(x.reshape(shape), 0, axis + 1, keepdims=False)
  return x


def _is_same_pool(eqn) -> bool:
  """A stride-1 'same' k x k window sum over H, W of NHWC (tformer's average pool)."""
  p = eqn.params
  dims, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
  if len(dims) != 4 or dims[0] != 1 or dims[3] != 1 or any(s != 1 for s in strides):
    return False
  if any(d != 1 for d in p.get("base_dilation", (1,) * 4)) or any(
      d != 1 for d in p.get("window_dilation", (1,) * 4)):
    return False
  return all(k % 2 == 1 and tuple(pad) == (k // 2, k // 2)
             for k, pad in zip(dims[1:3], padding[1:3])) and tuple(padding[0]) == (
                 0, 0) and tuple(padding[3]) == (0, 0)


def _sum_pool_as_average_pool(x, params):
  """(avg_pool(x), count) with sum_window(x) = their product; avg_pool is one op.

  `window_sum(x) / window_sum(ones)` is the pattern TFLite lowers to one
  AVERAGE_POOL_2D (SAME padding excludes the padding from the divisor, like the
  count); otherwise reduce_window stays a slow STABLEHLO_REDUCE_WINDOW op that
  XNNPACK does not run and int8 quantisation rejects.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  window = tuple(params["window_dimensions"])
  padding = tuple(tuple(p) for p in params["padding"])
  count_np = np.asarray(_window_counts(x.shape[1:3], window[1:3]), x.dtype)
  count_np = count_np[None, :, :, None]
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = lax.reduce_window(ones, np.array(0, x.dtype), lax.add, window, (1,) * 4,
                            padding)
  summed = lax.reduce_window(x, np.array(0, x.dtype), lax.add, window, (1,) * 4,
                             padding)
  return summed / count, jnp.asarray(count_np)


def _sliced_projection(eqn, x, producers, read):
  """A last-axis slice of ``x @ W (+ b)`` as its own ``x @ W[:, a:b] (+ b[a:b])``.

  A fused projection whose output is sliced into parts of very different
  ranges (MobileViTv2's query/key/value: one score channel next to the keys and
  values) gets one int8 scale for all parts, which wipes out the small ones
  (its top-1 agreement with JAX fell to 29%). Separate products get separate
  scales. Returns None when `eqn` is not such a slice.
  """
  p = eqn.params
  if p.get("strides") and any(s != 1 for s in p["strides"]):
    return None
  last = x.ndim - 1
  if any(p["start_indices"][d] != 0 or p["limit_indices"][d] != x.shape[d]
         for d in range(last)):
    return None
  start, limit = p["start_indices"][last], p["limit_indices"][last]
  producer = producers.get(eqn.invars[0])
  bias = None
  if producer is not None and producer.primitive.name == "add":
    for i in (0, 1):
      value = _constant_value(producer.invars[1 - i], producers, read)
      dot = producers.get(producer.invars[i])
      if value is not None and dot is not None and dot.primitive.name == "dot_general":
        bias, producer = value, dot
        break
  if producer is None or producer.primitive.name != "dot_general":
    return None
  lhs, rhs = read(producer.invars[0]), read(producer.invars[1])
  if not _is_projection(producer, lhs, rhs):
    return None
  out = _projection(producer, lhs, np.asarray(rhs)[:, start:limit])
  if bias is not None:
    out = out + np.broadcast_to(bias, bias.shape[:-1] + (x.shape[-1],))[..., start:limit]
  return out.astype(x.dtype)


def _is_projection(eqn, lhs, rhs) -> bool:
  """Whether dot_general `eqn` is ``lhs @ W`` over lhs's last axis, W constant 2-D."""
  (lhs_contract, rhs_contract), (lhs_batch, _) = eqn.params["dimension_numbers"]
  return (not _is_traced(rhs) and rhs.ndim == 2 and not lhs_batch
          and tuple(rhs_contract) == (0,) and tuple(lhs_contract) == (lhs.ndim - 1,))


def _projection(eqn, lhs, rhs):
  """The projection `eqn` (see _is_projection) of `lhs` by `rhs`.

  When lhs has a middle axis of size 1 it is computed as a 1x1 convolution: TF
  2.21's converter folds such a product into a BATCH_MATMUL of the wrong rank and
  fails ("invalid output rank"): MobileViTv2 at 64 px (one patch per block),
  EdgeViT at 32 px (one token per window). A 1x1 CONV_2D is the same GEMM on
  XNNPACK. Otherwise the original product.
  """
  if lhs.ndim not in (3, 4) or 1 not in lhs.shape[1:-1]:
    return eqn.primitive.bind(lhs, rhs, **eqn.primitive.get_bind_params(eqn.params))
  import jax  # pylint: disable=g-import-not-at-top
  image = lhs if lhs.ndim == 4 else lhs[:, :, None, :]
  out = jax.lax.conv_general_dilated(
      image, np.asarray(rhs, lhs.dtype)[None, None], (1, 1), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=eqn.params.get("preferred_element_type"))
  return out.reshape(*lhs.shape[:-1], rhs.shape[-1])


def _constant_value(atom, producers, read) -> Optional[np.ndarray]:
  """The numpy value of `atom` if it is a constant (through reshapes), else None.

  Under jit every bound op yields a tracer, even of constants (a Dense bias
  reshaped for broadcasting), so constness is traced back to the variables.
  """
  from jax.extend import core as jex_core  # pylint: disable=g-import-not-at-top
  if isinstance(atom, jex_core.Literal):
    return np.asarray(atom.val)
  value = read(atom)
  if not _is_traced(value):
    return np.asarray(value)
  eqn = producers.get(atom)
  if eqn is None or eqn.primitive.name not in ("reshape", "broadcast_in_dim",
                                               "convert_element_type"):
    return None
  source = _constant_value(eqn.invars[0], producers, read)
  if source is None:
    return None
  if eqn.primitive.name == "reshape":
    return source.reshape(eqn.params["new_sizes"])
  if eqn.primitive.name == "convert_element_type":
    return source.astype(eqn.params["new_dtype"])
  shape = eqn.params["shape"]
  expanded = [1] * len(shape)
  for axis, dim in enumerate(eqn.params["broadcast_dimensions"]):
    expanded[dim] = source.shape[axis]
  return np.broadcast_to(source.reshape(expanded), shape)


def _softmax_to_last_axis(eqn, producers, read):
  """softmax over a middle axis (exp(x - max) / sum), redone over the last axis.

  The converter fuses only a last-axis softmax into one SOFTMAX op; over another
  axis (MobileViTv2's context scores, over the patches) it stays REDUCE_MAX, SUB,
  EXP, SUM and DIV ops, which int8 quantises badly and XNNPACK partly rejects.
  `eqn` is the final division; returns None unless the pattern matches.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.extend import core as jex_core  # pylint: disable=g-import-not-at-top
  numerator, denominator = eqn.invars
  if isinstance(numerator, jex_core.Literal) or isinstance(denominator,
                                                           jex_core.Literal):
    return None
  exp = producers.get(numerator)
  total = producers.get(denominator)
  if total is not None and total.primitive.name == "broadcast_in_dim":
    total = producers.get(total.invars[0])
  if (exp is None or exp.primitive.name != "exp" or total is None
      or total.primitive.name != "reduce_sum" or total.invars[0] is not numerator
      or len(total.params["axes"]) != 1):
    return None
  shifted = producers.get(exp.invars[0])
  if shifted is None or shifted.primitive.name != "sub":
    return None
  x = read(shifted.invars[0])
  axis = total.params["axes"][0]
  if axis == x.ndim - 1:
    return None
  moved = jax.nn.softmax(jnp.moveaxis(x, axis, -1), axis=-1)
  return jnp.moveaxis(moved, -1, axis)


def _cascaded_max_pool(var, x, kernel, cache):
  """'same' k x k max pooling as (k - 1) / 2 stacked 3 x 3 ones, shared across k.

  Exact (the -inf padding never wins a max), as YOLOv5's SPPF: TFormer's 3, 5
  and 7 max-pool branches of one input cost three 3 x 3 pools instead of
  9 + 25 + 49 comparisons per output.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  if kernel[0] != kernel[1]:
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *kernel, 1), (1,) * 4,
                             ((0, 0), (kernel[0] // 2,) * 2, (kernel[1] // 2,) * 2,
                              (0, 0)))
  k = kernel[0]
  if (var, k) not in cache:
    previous = x if k == 1 else _cascaded_max_pool(var, x, (k - 2, k - 2), cache)
    cache[(var, k)] = previous if k == 1 else lax.reduce_window(
        previous, -jnp.inf, lax.max, (1, 3, 3, 1), (1,) * 4,
        ((0, 0), (1, 1), (1, 1), (0, 0)))
  return cache[(var, k)]


def _divides_by_window_count(user, pool_eqn, read, x) -> bool:
  """Whether `user` is ``window_sum * (1 / count)`` with a constant count map."""
  if user.primitive.name != "mul" or len(pool_eqn.outvars) != 1:
    return False
  others = [v for v in user.invars if v is not pool_eqn.outvars[0]]
  if len(others) != 1:
    return False
  value = read(others[0])
  if _is_traced(value):
    return False
  window = pool_eqn.params["window_dimensions"]
  inverse = 1.0 / _window_counts(x.shape[1:3], window[1:3])[None, :, :, None]
  try:
    value = np.broadcast_to(np.asarray(value, np.float32), inverse.shape)
  except ValueError:  # Not a per-position map: some other multiply.
    return False
  return bool(np.allclose(value, inverse, rtol=1e-6, atol=0))


def _window_counts(spatial, kernel):
  counts = []
  for n, k in zip(spatial, kernel):
    idx = np.arange(n)
    counts.append(np.minimum(idx + k // 2, n - 1) - np.maximum(idx - k // 2, 0) + 1)
  return np.outer(*counts).astype(np.float32)


# Ops whose TFLite lowering broadcasts implicitly, so a broadcast feeding them folds.
_BROADCASTING_OPS = frozenset({"add", "sub", "mul", "div", "max", "min", "pow",
                               "select_n", "and", "or", "eq", "ne", "lt", "le", "gt",
                               "ge", "atan2", "rem"})


def _is_traced(x) -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return isinstance(x, jax.core.Tracer)


def _broadcast_as_matmul(x, shape, broadcast_dimensions):
  """broadcast_in_dim along trailing dims as x[M, 1] @ ones[1, N] (FULLY_CONNECTED).

  TFLite keeps a broadcast that feeds a reshape (GroupNorm's statistics) as a
  BROADCAST_TO op, which XNNPACK does not run, splitting its graph; the converter
  folds a multiply by ones back into that broadcast, but not a product with a
  ones matrix. Returns None when the new dims are not trailing (left as is).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  expanded = [1] * len(shape)
  for axis, dim in enumerate(broadcast_dimensions):
    expanded[dim] = x.shape[axis]
  grown = [d for d, (e, s) in enumerate(zip(expanded, shape)) if e == 1 and s > 1]
  if not grown or grown != list(range(grown[0], len(shape))):
    return None
  lead = math.prod(expanded[:grown[0]])
  cols = math.prod(shape[grown[0]:])
  out = x.reshape(lead, 1) @ jnp.ones((1, cols), x.dtype)
  return out.reshape(shape)


def _eval_rewritten(jaxpr, consts, args, gelu: str, split_projections: bool = False):
  from jax.extend import core as jex_core  # pylint: disable=g-import-not-at-top

  env, producers, replaced, max_pools = {}, {}, {}, {}

  def read(atom):
    return atom.val if isinstance(atom, jex_core.Literal) else env[atom]

  consumers = collections.defaultdict(list)
  for eqn in jaxpr.eqns:
    for v in eqn.invars:
      if not isinstance(v, jex_core.Literal):
        consumers[v].append(eqn)
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    invals = [read(v) for v in eqn.invars]
    inner = eqn.params.get(_INLINE_PARAMS.get(name, ""))
    if inner is not None:
      outs = _eval_rewritten(getattr(inner, "jaxpr", inner),
                             getattr(inner, "consts", ()), invals, gelu,
                             split_projections)
    elif name == "erfc":
      x = _exact_gelu_input(eqn.invars[0], producers)
      if gelu == "tanh" and x is not None:
        # erfc(-x / sqrt 2) = 1 + erf(x / sqrt 2) ~ 1 + tanh(...).
        outs = _one_plus_tanh_gelu(read(x))
      else:
        outs = 1.0 - _erf_rational(invals[0])
      outs = outs.astype(invals[0].dtype)
    elif name == "erf":
      outs = _erf_rational(invals[0]).astype(invals[0].dtype)
    elif name == "div" and (outs := _softmax_to_last_axis(eqn, producers, read)
                            ) is not None:
      pass
    elif eqn in replaced:
      outs = replaced.pop(eqn)
    elif (name == "reduce_window_max" and _is_same_pool(eqn)
          and max(eqn.params["window_dimensions"]) > 1):
      outs = _cascaded_max_pool(eqn.invars[0], invals[0],
                                eqn.params["window_dimensions"][1:3], max_pools)
    elif name == "reduce_window_sum" and _is_same_pool(eqn):
      outs = _sum_pool_as_average_pool(invals[0], eqn.params)
      # avg_pool_same multiplies the sum by the inverse counts: hand the average
      # to that multiply instead, saving two full-size MULs per pooling.
      users = consumers[eqn.outvars[0]]
      if len(users) == 1 and _divides_by_window_count(users[0], eqn, read, invals[0]):
        replaced[users[0]] = outs[0]
      outs = outs[0] * outs[1]
    elif (name == "broadcast_in_dim" and _is_traced(invals[0]) and any(
        c.primitive.name not in _BROADCASTING_OPS for c in consumers[eqn.outvars[0]])
          and (outs := _broadcast_as_matmul(invals[0], eqn.params["shape"],
                                            eqn.params["broadcast_dimensions"]))
          is not None):
      pass
    elif (name == "slice" and split_projections
          and (outs := _sliced_projection(eqn, invals[0], producers, read))
          is not None):
      pass
    elif name == "dot_general" and _is_projection(eqn, *invals):
      outs = _projection(eqn, *invals)
    elif name == "slice" and eqn.params.get("strides") and any(
        s != 1 for s in eqn.params["strides"]):
      outs = _strided_slice(invals[0], eqn.params["start_indices"],
                            eqn.params["limit_indices"], eqn.params["strides"])
    else:
      outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    if eqn.primitive.multiple_results:
      env.update(zip(eqn.outvars, outs))
    else:
      env[eqn.outvars[0]] = outs
    for v in eqn.outvars:
      producers[v] = eqn
  return [read(v) for v in jaxpr.outvars]


def inference_function(model, variables, image_size: int, channels: int = 3,
                       gelu: str = "tanh",
                       split_projections: bool = False
                       ) -> Callable[[Any], dict[str, Any]]:
  """The function that is exported: image -> {"logits", "probs"}, rewritten for TFLite.

  The model's forward pass is traced once to a jaxpr and re-evaluated with the
  GELU, strided slices, window sums and reshape-feeding broadcasts rewritten (see
  the module docstring); every other equation binds its original primitive, so
  the numerics stay those of the model.

  Args:
    model: a linen module whose ``apply(variables, x, train=False)`` returns
      ``(logits, aux)``.
    variables: its variables (float32).
    image_size: side of the square input.
    channels: input channels.
    gelu: "tanh" (fused TFLite GELU op) or "exact" (rational erf).
    split_projections: compute each last-axis slice of a projection as its own
      product (for int8: one scale per part; see _sliced_projection).

  Returns:
    A JAX-traceable function of one float32 [1, S, S, C] image batch.

  Example::

      fn = inference_function(model, variables, 224)
      out = jax.jit(fn)(images)  # {"logits": [1, K], "probs": [1, K]}
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  _check_gelu(gelu)
  if hasattr(model, "export_friendly"):  # Same function, TFLite-friendly form.
    model = model.clone(export_friendly=True)

  def forward(variables, image):
    logits, _ = model.apply(variables, image, train=False)
    return logits

  example = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  closed = jax.make_jaxpr(forward)(variables, example)
  leaves = jax.tree_util.tree_leaves(variables)

  def fn(image):
    (logits,) = _eval_rewritten(closed.jaxpr, closed.consts, [*leaves, image], gelu,
                                split_projections)
    logits = logits.astype(jnp.float32)
    return {"logits": logits, "probs": jax.nn.softmax(logits, axis=-1)}

  return fn


# ----------------------------------------------------------------------------------
# Conversion.


def to_tflite(model, variables, image_size: int, channels: int = 3, *,
              quantize: str = "none",
              representative_data: Optional[Callable[[], Iterable[np.ndarray]]] = None,
              integer_io: bool = False, gelu: str = "tanh") -> bytes:
  """Converts a model to TFLite bytes (no metadata, no checks; see :func:`export`).

  Args:
    model: a linen module; ``apply(variables, x, train=False)`` gives (logits, aux).
    variables: its float32 variables.
    image_size: side of the square input; the batch is fixed to 1.
    channels: input channels.
    quantize: one of :data:`QUANTIZE_MODES`.
    representative_data: for ``int8``: a callable returning an iterable of float32
      [1, S, S, C] preprocessed images (a few hundred training images).
    integer_io: for ``int8``: int8 input and outputs (quantisation parameters in
      the model) instead of float32 ones, and integer-only kernels.
    gelu: "tanh" or "exact", see the module docstring.

  Returns:
    The flatbuffer bytes with the ``serving_default`` signature (input
    ``image``, outputs ``logits`` and ``probs``).

  Raises:
    ValueError: for an unknown mode, or int8 without representative data.

  Example::

      tflite_bytes = to_tflite(model, variables, 224, quantize="fp16")
  """
  _check_quantize(quantize)
  if quantize == "int8" and representative_data is None:
    raise ValueError("quantize='int8' needs representative_data, a callable that "
                     "yields float32 [1, S, S, C] preprocessed training images "
                     "(export_from_workdir and export_from_registry provide one).")
  if integer_io and quantize != "int8":
    raise ValueError(f"integer_io=True needs quantize='int8'; got {quantize!r}.")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TensorFlow already initialised its devices.
    pass
  fn = inference_function(model, variables, image_size, channels, gelu,
                          split_projections=quantize == "int8")
  converted = jax2tf.convert(fn, native_serialization_platforms=("cpu",),
                             with_gradient=False)
  spec = tf.TensorSpec((1, image_size, image_size, channels), tf.float32,
                       name=INPUT_NAME)
  # A tf.Module as the trackable object makes the converter emit a SignatureDef
  # whose input/output names are the argument name and the output dict keys.
  module = tf.Module()
  module.serve = tf.function(lambda image: converted(image), input_signature=[spec],
                             autograph=False)
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [module.serve.get_concrete_function()], module)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  if quantize != "none":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  if quantize == "fp16":
    converter.target_spec.supported_types = [tf.float16]
  elif quantize == "int8":
    def representative():
      for image in representative_data():
        yield [np.asarray(image, np.float32).reshape(1, image_size, image_size,
                                                     channels)]
    converter.representative_dataset = representative
    if integer_io:
      converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
      converter.inference_input_type = tf.int8
      converter.inference_output_type = tf.int8
    else:
      # Calibrate only; _quantize_for_xnnpack picks what stays float.
      converter._experimental_calibrate_only = True  # pylint: disable=protected-access
      debug_images = []
      for image in representative():
        debug_images.append(image[0])
        if len(debug_images) == 8:
          break
      return _quantize_for_xnnpack(_convert(converter, image_size), debug_images)
  return _convert(converter, image_size)


def _quantize_for_xnnpack(calibrated: bytes, debug_images: Sequence[np.ndarray]
                          ) -> bytes:
  """int8 quantisation that keeps in float what int8 would slow down or break.

  XNNPACK (LiteRT's CPU delegate) runs int8 convolutions, matmuls with constant
  weights and most elementwise ops, but not int8 BATCH_MATMUL, RSQRT, SOFTMAX or
  GELU; TFLite's own int8 kernels for those are up to 100x slower than XNNPACK's
  float ones (edgevit_xxs at 224: 2.1 ms of int8 BATCH_MATMUL vs 0.17 ms float)
  and every op that falls off XNNPACK splits its graph. So:

  1. those op types stay float (:data:`INT8_FLOAT_OPS`);
  2. so does every other int8 op that the installed XNNPACK rejects (by name)
     and every op on statistics-sized tensors (see _int8_nodes_to_keep_float);
  3. TensorFlow's QuantizationDebugger then runs each remaining int8 op on
     `debug_images` next to its float version, and ops whose error exceeds
     :data:`_MAX_INT8_ERROR` quantisation steps stay float too (e.g. the fused
     query/key/value projection of MobileViTv2's linear attention, 94 steps).

  This uses the quantiser entry point of TensorFlow's QuantizationDebugger
  (``mlir_quantize`` with deny lists).
  """
  from tensorflow.lite.python import convert as tfl_convert  # pylint: disable=g-import-not-at-top

  def quantize(nodes, verify=False):
    return tfl_convert.mlir_quantize(calibrated, denylisted_ops=list(INT8_FLOAT_OPS),
                                     denylisted_nodes=list(nodes),
                                     enable_numeric_verify=verify)

  nodes: list[str] = []
  quantized = quantize(nodes)
  for step in range(4):
    new = [n for n in _int8_nodes_to_keep_float(quantized) if n not in nodes]
    if step == 1 and debug_images is not None:
      new += [n for n in _high_error_nodes(quantize(nodes, verify=True), debug_images)
              if n not in nodes and n not in new]
    if not new and step >= 1:
      break
    nodes += new
    quantized = quantize(nodes)
  return quantized


def _high_error_nodes(debug_model: bytes, images: Sequence[np.ndarray]) -> list[str]:
  """Ops whose int8 output is off by more than _MAX_INT8_ERROR steps (RMS)."""
  import csv  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice.
    debugger = tf.lite.experimental.QuantizationDebugger(
        quant_debug_model_content=debug_model,
        debug_dataset=lambda: ([np.asarray(x, np.float32)] for x in images))
    debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
  names = []
  for row in csv.DictReader(io.StringIO(dump.getvalue())):
    scale = float(row["scale"] or 0)
    if scale and math.sqrt(float(row["mean_squared_error"])) / scale > _MAX_INT8_ERROR:
      names.append(row["tensor_name"])
  return names


def _int8_nodes_to_keep_float(tflite_model: bytes) -> list[str]:
  """Names of the int8 ops to re-quantise as float.

  Two kinds: ops with integer tensors that run outside XNNPACK, and ops whose
  tensors are all statistics-sized (at most :data:`_SMALL_TENSOR` elements and
  1/64 of the largest tensor: norm means and variances, pooled features, the
  classifier head). The latter
  cost nothing in float, while one int8 scale per such tensor loses them (with
  them quantised, MobileViTv2's top-1 agreement with JAX fell to 29%).
  """
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  from vit_edge.runtime import latency  # pylint: disable=g-import-not-at-top
  interpreter = Interpreter(model_content=tflite_model, num_threads=1)
  interpreter.allocate_tensors()
  tensors = {t["index"]: t for t in interpreter.get_tensor_details()}

  def quantized(indices):
    return [tensors[i] for i in indices if i in tensors and np.issubdtype(
        tensors[i]["dtype"], np.integer) and tensors[i]["quantization"][0]]

  names = []
  for op in latency.undelegated_nodes(interpreter):
    if quantized(list(op["inputs"]) + list(op["outputs"])):
      names.append(tensors[op["outputs"][0]]["name"])
  # "Statistics-sized" is relative, so that a small-input model still gets its
  # feature maps quantised.
  largest = max(int(np.prod(t["shape"])) for t in tensors.values())
  small = min(_SMALL_TENSOR, largest // 64)
  for op in interpreter._get_ops_details():  # pylint: disable=protected-access
    if op["op_name"] in ("QUANTIZE", "DEQUANTIZE", "DELEGATE"):
      continue
    activations = quantized(list(op["inputs"]) + list(op["outputs"]))
    activations = [t for t in activations if t["name"] and "constant" not in t["name"]]
    if activations and all(np.prod(t["shape"]) <= small for t in activations):
      names.append(tensors[op["outputs"][0]]["name"])
  return list(dict.fromkeys(names))


def _convert(converter, image_size: int) -> bytes:
  """converter.convert() with the known converter failures explained."""
  try:
    return converter.convert()
  except Exception as e:  # The converter raises ConverterError/RuntimeError.
    if "op found invalid output rank" in str(e):
      raise ValueError(
          f"The TFLite converter of TF 2.21 cannot lower a matmul whose token or "
          f"patch dimension has size 1, which image_size={image_size} produces for "
          "this model, and the export's unit-axis rewrite (_projection) "
          "did not cover this one. Export at a larger image_size (the model's "
          "reference resolution, or at least 4x its total stride).") from e
    raise


def add_metadata(tflite_model: bytes, metadata: dict[str, Any],
                 name: str = metadata_lib.METADATA_NAME) -> bytes:
  """Embeds `metadata` as a JSON buffer in the model's named metadata table.

  An existing entry of the same name is replaced. TFLite interpreters ignore
  unknown metadata; :func:`vit_edge.runtime.metadata.read_metadata` reads it.

  Example::

      tflite_bytes = add_metadata(tflite_bytes, {"metadata_version": 1, ...})
  """
  from ai_edge_litert import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  from ai_edge_litert.tools import flatbuffer_utils  # pylint: disable=g-import-not-at-top

  model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_model))
  buffer = schema.BufferT()
  buffer.data = np.frombuffer(json.dumps(metadata, sort_keys=True).encode("utf-8"),
                              np.uint8)
  model.buffers.append(buffer)
  entry = schema.MetadataT()
  entry.name = name
  entry.buffer = len(model.buffers) - 1
  kept = [m for m in (model.metadata or []) if _decode(m.name) != name]
  model.metadata = kept + [entry]
  return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _decode(name) -> str:
  return name.decode("utf-8") if isinstance(name, bytes) else str(name)


def tflite_predict(tflite_model: bytes, images: np.ndarray,
                   num_threads: Optional[int] = None) -> np.ndarray:
  """Float logits of a vit_edge TFLite model, one image at a time.

  Handles float and full-integer models (quantising the input and
  dequantising the output with the model's parameters).

  Raises:
    ValueError: if `images` is not [N, H, W, C] of the model's input size.

  Example::

      logits = tflite_predict(tflite_bytes, images)  # [N, num_classes]
  """
  from vit_edge.runtime import classifier  # pylint: disable=g-import-not-at-top
  runner = classifier.TFLiteModel(tflite_model, num_threads=num_threads)
  return runner.predict(images)["logits"]


# ----------------------------------------------------------------------------------
# The parity guard, evaluation and the export itself.


@dataclasses.dataclass
class ExportReport:
  """What an export measured (printed by the CLI, returned by the functions).

  Attributes:
    path: the written file.
    model: registry name.
    quantize: the quantisation mode.
    size_bytes: file size.
    num_parity_samples: images of the parity check.
    max_abs_logit_diff: max |logits_tflite - logits_jax| over them.
    max_abs_logit: max |logits_jax| over them.
    tolerance: the allowed max difference (float exports), else None.
    parity_top1_agreement: fraction of parity images with the same top-1.
    num_eval_examples: images of the agreement/accuracy pass (0: skipped).
    eval_top1_agreement: fraction with the same top-1 in TFLite and JAX.
    eval_top1_tflite: TFLite accuracy (None without labels, i.e. --model).
    eval_top1_jax: JAX accuracy on the same images.
    seconds: wall time of the export.
  """

  path: str
  model: str
  quantize: str
  size_bytes: int
  num_parity_samples: int
  max_abs_logit_diff: float
  max_abs_logit: float
  tolerance: Optional[float]
  parity_top1_agreement: float
  num_eval_examples: int = 0
  eval_top1_agreement: Optional[float] = None
  eval_top1_tflite: Optional[float] = None
  eval_top1_jax: Optional[float] = None
  seconds: float = 0.0

  def summary(self) -> str:
    """A few human-readable lines."""
    lines = [f"Wrote {self.path} ({self.size_bytes / 1e6:.2f} MB, {self.model}, "
             f"quantize={self.quantize}) in {self.seconds:.1f} s.",
             f"Parity on {self.num_parity_samples} images: max |dlogit| = "
             f"{self.max_abs_logit_diff:.3g} (max |logit| {self.max_abs_logit:.3g}"
             + (f", tolerance {self.tolerance:.3g}" if self.tolerance is not None
                else ", quantised: no tolerance") +
             f"), top-1 agreement {self.parity_top1_agreement:.1%}."]
    if self.num_eval_examples:
      line = (f"Eval set ({self.num_eval_examples} images): top-1 agreement with "
              f"JAX {self.eval_top1_agreement:.2%}")
      if self.eval_top1_tflite is not None:
        line += (f", top-1 accuracy TFLite {self.eval_top1_tflite:.2%} vs JAX "
                 f"{self.eval_top1_jax:.2%}")
      lines.append(line + ".")
    return "\n".join(lines)


def _jax_logits_fn(model, variables):
  import jax  # pylint: disable=g-import-not-at-top

  @jax.jit
  def logits_fn(images):
    logits, _ = model.apply(variables, images, train=False)
    return logits

  return lambda images: np.asarray(logits_fn(images), np.float32)


def check_parity(tflite_model: bytes, jax_logits: np.ndarray, images: np.ndarray,
                 quantize: str) -> dict[str, float]:
  """Runs the TFLite bytes on `images` and compares with the JAX logits.

  Float modes must satisfy ``max|d| <= atol + rtol * max|logits_jax|`` with
  ``(atol, rtol) = FLOAT_TOLERANCES[quantize]``; quantised modes only report.

  Raises:
    ParityError: a float export outside the tolerance, or non-finite outputs.

  Example::

      stats = check_parity(tflite_bytes, jax_logits, images, "none")
  """
  got = tflite_predict(tflite_model, images)
  diff = np.abs(got - jax_logits)
  scale = float(np.max(np.abs(jax_logits)))
  stats = {"max_abs_logit_diff": float(np.max(diff)) if np.all(np.isfinite(got))
           else float("inf"),
           "max_abs_logit": scale,
           "top1_agreement": float(np.mean(got.argmax(-1) == jax_logits.argmax(-1))),
           "tolerance": None}
  if quantize in FLOAT_TOLERANCES:
    atol, rtol = FLOAT_TOLERANCES[quantize]
    stats["tolerance"] = atol + rtol * scale
  if not np.all(np.isfinite(got)) or (
      stats["tolerance"] is not None and stats["max_abs_logit_diff"] > stats["tolerance"]):
    worst = np.unravel_index(np.argmax(np.where(np.isfinite(diff), diff, np.inf)),
                             diff.shape)
    raise ParityError(
        f"The {quantize!r} TFLite export does not match JAX: max |logits_tflite - "
        f"logits_jax| = {stats['max_abs_logit_diff']:.3g} (image {worst[0]}, class "
        f"{worst[1]}: {got[worst]:.5g} vs {jax_logits[worst]:.5g}), expected at most "
        f"{stats['tolerance']} = atol + rtol * max|logits| with (atol, rtol) = "
        f"{FLOAT_TOLERANCES.get(quantize)}. Nothing was written. Re-export with "
        "--gelu=exact; if it persists, the converter mis-lowers an op of this model: "
        "report it with the model name and resolution.")
  return stats


def _batches(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
  for i in range(0, len(images), size):
    yield images[i:i + size]


def _evaluate(tflite_model: bytes, jax_logits_fn, eval_batches: Iterable[dict],
              max_examples: Optional[int], has_labels: bool) -> dict[str, Any]:
  """Top-1 agreement (and accuracy with labels) of TFLite vs JAX on eval batches."""
  from vit_edge.runtime import classifier  # pylint: disable=g-import-not-at-top
  runner = classifier.TFLiteModel(tflite_model)
  agree = correct_tflite = correct_jax = count = 0
  for batch in eval_batches:
    keep = np.asarray(batch.get("mask", np.ones(len(batch["image"])))) > 0
    images, labels = batch["image"][keep], np.asarray(batch["label"])[keep]
    if max_examples is not None:
      images, labels = images[:max_examples - count], labels[:max_examples - count]
    if not len(images):
      break
    top_jax = jax_logits_fn(images).argmax(-1)
    top_tflite = runner.predict(images)["logits"].argmax(-1)
    agree += int(np.sum(top_jax == top_tflite))
    correct_tflite += int(np.sum(top_tflite == labels))
    correct_jax += int(np.sum(top_jax == labels))
    count += len(images)
    if max_examples is not None and count >= max_examples:
      break
  if not count:
    return {"num_eval_examples": 0}
  result = {"num_eval_examples": count, "eval_top1_agreement": agree / count}
  if has_labels:
    result.update(eval_top1_tflite=correct_tflite / count,
                  eval_top1_jax=correct_jax / count)
  return result


def _write_atomically(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-export-", suffix=".tflite", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def export(model, variables, out: str, *, metadata: dict[str, Any],
           quantize: str = "none", parity_images: np.ndarray,
           representative_data: Optional[Callable[[], Iterable[np.ndarray]]] = None,
           eval_batches: Optional[Iterable[dict]] = None,
           max_eval_examples: Optional[int] = None, has_labels: bool = False,
           integer_io: bool = False, gelu: str = "tanh") -> ExportReport:
  """Converts, embeds metadata, checks parity, evaluates, then writes `out`.

  Nothing is written unless every check passes (the file appears atomically).

  Args:
    model: linen module (float32 compute).
    variables: its variables.
    out: destination .tflite path.
    metadata: the dict to embed; needs the keys of
      :data:`vit_edge.runtime.metadata.REQUIRED_KEYS`.
    quantize: one of :data:`QUANTIZE_MODES`.
    parity_images: float32 [N, S, S, C] preprocessed images for the guard.
    representative_data: calibration images for ``int8`` (see :func:`to_tflite`).
    eval_batches: optional ``{"image", "label"[, "mask"]}`` batches for the
      agreement / accuracy pass.
    max_eval_examples: cap on eval images (None: all).
    has_labels: whether eval labels index the model's classes (accuracy).
    integer_io: int8 input/outputs (``int8`` only).
    gelu: "tanh" or "exact".

  Returns:
    An :class:`ExportReport`.

  Raises:
    ParityError: float export outside the tolerance (nothing written).
    ValueError: bad mode, shapes or metadata.

  Example::

      report = export(model, variables, "m.tflite", metadata=meta,
                      parity_images=images[:16])
  """
  _check_quantize(quantize)
  _check_gelu(gelu)
  start = time.time()
  missing = [k for k in metadata_lib.REQUIRED_KEYS if k not in metadata]
  if missing:
    raise ValueError(f"metadata lacks {missing}; expected at least "
                     f"{metadata_lib.REQUIRED_KEYS}.")
  parity_images = np.asarray(parity_images, np.float32)
  size = int(metadata["image_size"])
  if parity_images.ndim != 4 or parity_images.shape[1:3] != (size, size) or not len(
      parity_images):
    raise ValueError(f"parity_images has shape {parity_images.shape}; expected "
                     f"[N >= 1, {size}, {size}, C] preprocessed images.")
  channels = parity_images.shape[-1]
  tflite_model = to_tflite(model, variables, size, channels, quantize=quantize,
                           representative_data=representative_data,
                           integer_io=integer_io, gelu=gelu)
  meta = dict(metadata, metadata_version=metadata_lib.METADATA_VERSION,
              quantize=quantize, integer_io=bool(integer_io), gelu=gelu,
              signature=SIGNATURE_KEY, input=INPUT_NAME, outputs=list(OUTPUT_NAMES),
              input_shape=[1, size, size, channels], layout="NHWC")
  tflite_model = add_metadata(tflite_model, meta)
  jax_logits_fn = _jax_logits_fn(model, variables)
  jax_logits = np.concatenate([jax_logits_fn(b) for b in _batches(parity_images, 64)])
  stats = check_parity(tflite_model, jax_logits, parity_images, quantize)
  evaluation = {"num_eval_examples": 0}
  if eval_batches is not None and max_eval_examples != 0:
    evaluation = _evaluate(tflite_model, jax_logits_fn, eval_batches,
                           max_eval_examples, has_labels)
  _write_atomically(out, tflite_model)
  return ExportReport(
      path=out, model=str(metadata["model"]), quantize=quantize,
      size_bytes=len(tflite_model), num_parity_samples=len(parity_images),
      max_abs_logit_diff=stats["max_abs_logit_diff"],
      max_abs_logit=stats["max_abs_logit"], tolerance=stats["tolerance"],
      parity_top1_agreement=stats["top1_agreement"], seconds=time.time() - start,
      **evaluation)


# ----------------------------------------------------------------------------------
# Data for calibration and checks.


def _calibration_config(config, num_samples: int):
  """A copy of `config` whose train iterator yields eval-style images.

  The training iterator shuffles (so a small sample covers the classes, unlike
  the class-sorted order of an image folder); the augmentation is switched off so
  the activation ranges are those of deployment inputs.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  calib = ml_collections.ConfigDict(config.to_dict())
  with calib.unlocked():
    if "aug" not in calib or calib.aug is None:
      calib.aug = ml_collections.ConfigDict()
    calib.aug.random_resized_crop = False
    calib.aug.hflip = False
    calib.aug.randaugment = ""
    calib.aug.random_erasing = 0.0
    calib.shuffle_buffer = max(int(calib.get("shuffle_buffer", 0) or 0), num_samples)
    calib.cache = False
  return calib


def _representative_from_config(config, mean, std, num_samples: int):
  from vit_edge import input_pipeline  # pylint: disable=g-import-not-at-top
  calib = _calibration_config(config, num_samples)
  batch = min(num_samples, 32)

  def images():
    iterator = input_pipeline.create_train_iterator(
        calib, mean=mean, std=std, local_batch_size=batch)
    produced = 0
    for b in iterator:
      for image in b["image"]:
        if produced >= num_samples:
          return
        produced += 1
        yield image[None]

  return images


def _first_images(eval_iterable, count: int) -> np.ndarray:
  images = []
  for batch in eval_iterable:
    keep = np.asarray(batch["mask"]) > 0
    images.extend(batch["image"][keep])
    if len(images) >= count:
      break
  if not images:
    raise ValueError("The eval split yielded no images for the parity check.")
  return np.stack(images[:count]).astype(np.float32)


def _digits_config(image_size: int, crop_pct: float, interpolation: str):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(
      dataset="digits", data_dir=None, train_split="train", eval_split="test",
      image_size=image_size, batch_size=32, eval_batch_size=64, shuffle_buffer=1437,
      seed=0, cache=False,
      aug=dict(random_resized_crop=False, hflip=False, randaugment="",
               random_erasing=0.0, crop_pct=crop_pct, interpolation=interpolation)))


def _check_count(name: str, value: Optional[int], minimum: int) -> None:
  if value is not None and value < minimum:
    raise ValueError(f"{name}={value} must be >= {minimum}.")


def _resized_config(config, image_size: int):
  """`config` at another input resolution, for models that allow one."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vit_edge import models  # pylint: disable=g-import-not-at-top
  info = models.get_model_info(config.model)
  if info.fixed_resolution:
    raise ValueError(
        f"image_size={image_size}: {config.model} was trained at "
        f"{config.image_size} and its position embedding fixes that resolution. "
        f"Export at {config.image_size} (omit --image_size).")
  if image_size < 1 or image_size % info.stride:
    raise ValueError(f"image_size={image_size} is not a positive multiple of the "
                     f"total stride {info.stride} of {config.model}.")
  resized = ml_collections.ConfigDict(config.to_dict())
  with resized.unlocked():
    resized.image_size = image_size
  return resized


def _checkpoint_step(workdir: str, step: Optional[int]) -> Optional[int]:
  """The step that load_trained_model restored (it does not return it)."""
  if step is not None:
    return step
  directory = os.path.join(workdir, "checkpoints")
  steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(
      directory) else []
  return max(steps) if steps else None


def _float32_config(config):
  """The training config with float32 compute: the export reference is float32."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  copy = ml_collections.ConfigDict(config.to_dict())
  with copy.unlocked():
    copy.dtype = "float32"
  return copy


def export_from_workdir(workdir: str, out: str, *, step: Optional[int] = None,
                        quantize: str = "none", image_size: Optional[int] = None,
                        num_calibration_samples: int = DEFAULT_NUM_CALIBRATION_SAMPLES,
                        num_parity_samples: int = DEFAULT_NUM_PARITY_SAMPLES,
                        max_eval_examples: Optional[int] = None,
                        integer_io: bool = False, gelu: str = "tanh",
                        use_ema: bool = True) -> ExportReport:
  """Exports the checkpoint of a training run (see the module docstring).

  Calibration images come from the run's training split (eval-style
  preprocessing, shuffled); parity images and the agreement/accuracy pass use its
  eval split.

  Args:
    workdir: training directory with config.json, dataset_info.json and
      checkpoints/.
    out: destination .tflite path.
    step: checkpoint step (None: the newest).
    quantize: one of :data:`QUANTIZE_MODES`.
    image_size: export resolution (default: the training one). Convolutional
      and hybrid models run at any multiple of their stride; ViTs (fixed
      position embeddings) only at their training size. Calibration, parity and
      eval images are preprocessed at this size.
    num_calibration_samples: training images for ``int8`` calibration.
    num_parity_samples: eval images for the parity guard.
    max_eval_examples: cap on the eval pass (None: the whole split, 0: skip).
    integer_io: int8 input/outputs (``int8`` only).
    gelu: "tanh" or "exact".
    use_ema: export the EMA parameters when the checkpoint has them.

  Returns:
    An :class:`ExportReport`.

  Raises:
    FileNotFoundError: `workdir` is not a training run or has no checkpoint.
    ParityError: float export outside the tolerance (nothing written).

  Example::

      report = export_from_workdir("/tmp/tformer_s", "tformer_s.tflite")
  """
  _check_quantize(quantize)
  _check_gelu(gelu)
  _check_count("num_calibration_samples", num_calibration_samples, 1)
  _check_count("num_parity_samples", num_parity_samples, 1)
  _check_count("max_eval_examples", max_eval_examples, 0)
  from vit_edge import input_pipeline  # pylint: disable=g-import-not-at-top
  from vit_edge import train  # pylint: disable=g-import-not-at-top

  _, variables, config, info = train.load_trained_model(workdir, step=step,
                                                        use_ema=use_ema)
  trained_size = int(config.image_size)
  if image_size is not None and image_size != trained_size:
    config = _resized_config(config, image_size)
  model = train.build_model(_float32_config(config), info["num_classes"])
  mean, std = info["mean"], info["std"]
  eval_batches = input_pipeline.create_eval_iterator(
      config, mean=mean, std=std, local_batch_size=min(64, config.eval_batch_size))
  aug = config.get("aug") or {}
  metadata = {
      "model": config.model, "num_classes": int(info["num_classes"]),
      "label_names": [str(n) for n in info.get("label_names") or
                      range(info["num_classes"])],
      "image_size": int(config.image_size), "mean": list(mean), "std": list(std),
      "crop_pct": float(aug.get("crop_pct", input_pipeline.DEFAULT_CROP_PCT)),
      "interpolation": str(aug.get("interpolation", "bilinear")),
      "dataset": info.get("name"),
      "source": {"workdir": os.path.abspath(workdir),
                 "step": _checkpoint_step(workdir, step), "use_ema": use_ema,
                 "trained_image_size": trained_size},
  }
  representative = None
  if quantize == "int8":
    representative = _representative_from_config(config, mean, std,
                                                  num_calibration_samples)
  return export(model, variables, out, metadata=metadata, quantize=quantize,
                parity_images=_first_images(eval_batches, num_parity_samples),
                representative_data=representative, eval_batches=eval_batches,
                max_eval_examples=max_eval_examples, has_labels=True,
                integer_io=integer_io, gelu=gelu)


def export_from_registry(name: str, out: str, *, image_size: Optional[int] = None,
                         num_classes: int = 1000, quantize: str = "none",
                         calibration: str = "digits",
                         num_calibration_samples: int = DEFAULT_NUM_CALIBRATION_SAMPLES,
                         num_parity_samples: int = DEFAULT_NUM_PARITY_SAMPLES,
                         max_eval_examples: Optional[int] = None,
                         integer_io: bool = False, gelu: str = "tanh", seed: int = 0,
                         overrides: Optional[dict[str, Any]] = None) -> ExportReport:
  """Exports a randomly initialised registry model (benchmarks, smoke tests).

  Calibration and parity images are the embedded digits data set resized to
  `image_size` with the eval transform (``calibration="digits"``), or Gaussian
  noise (``"random"``, with a warning: int8 ranges then fit no real image). The
  agreement pass runs on the digits test split (360 images; no accuracy, the
  model is not trained on digits).

  Args:
    name: registry name, e.g. "edgevit_xxs".
    out: destination .tflite path.
    image_size: input side (default: the model's reference resolution); must be
      a multiple of the model's stride.
    num_classes: classifier width.
    quantize: one of :data:`QUANTIZE_MODES`.
    calibration: "digits" or "random".
    num_calibration_samples: images for ``int8`` calibration.
    num_parity_samples: images for the parity guard.
    max_eval_examples: cap on the agreement pass (None: 360, 0: skip).
    integer_io: int8 input/outputs (``int8`` only).
    gelu: "tanh" or "exact".
    seed: initialisation seed.
    overrides: model field overrides for create_model (e.g. narrow test models).

  Returns:
    An :class:`ExportReport`.

  Example::

      export_from_registry("edgevit_xxs", "edgevit_xxs.tflite", image_size=224)
  """
  _check_quantize(quantize)
  _check_gelu(gelu)
  if calibration not in ("digits", "random"):
    raise ValueError(f"calibration={calibration!r}; expected 'digits' or 'random'.")
  _check_count("num_calibration_samples", num_calibration_samples, 1)
  _check_count("num_parity_samples", num_parity_samples, 1)
  _check_count("max_eval_examples", max_eval_examples, 0)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_edge import input_pipeline  # pylint: disable=g-import-not-at-top
  from vit_edge import models  # pylint: disable=g-import-not-at-top

  info = models.get_model_info(name)
  size = int(image_size or info.image_size)
  if size < 1 or size % info.stride:
    raise ValueError(f"image_size={size} is not a positive multiple of the total "
                     f"stride {info.stride} of {name}; use e.g. "
                     f"{max(info.stride, round(size / info.stride) * info.stride)}.")
  overrides = dict(overrides or {})
  if info.fixed_resolution:
    overrides.setdefault("image_size", size)
  model = models.create_model(name, num_classes=num_classes, **overrides)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))
  crop_pct, interpolation = input_pipeline.DEFAULT_CROP_PCT, "bilinear"
  eval_batches, representative = None, None
  if calibration == "digits":
    config = _digits_config(size, crop_pct, interpolation)
    eval_batches = input_pipeline.create_eval_iterator(
        config, mean=info.mean, std=info.std, local_batch_size=64)
    parity = _first_images(eval_batches, num_parity_samples)
    if quantize == "int8":
      representative = _representative_from_config(config, info.mean, info.std,
                                                    num_calibration_samples)
  else:
    warnings.warn(
        "calibration='random': int8 ranges and parity images come from Gaussian "
        "noise, not images; quantised accuracy will be poor. Use "
        "calibration='digits' or export from a trained workdir.", stacklevel=2)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((max(num_calibration_samples, num_parity_samples),
                                 size, size, 3)).astype(np.float32)
    parity = noise[:num_parity_samples]
    representative = lambda: (image[None] for image in noise[:num_calibration_samples])
  metadata = {
      "model": name, "num_classes": num_classes,
      "label_names": [str(i) for i in range(num_classes)],
      "image_size": size, "mean": list(info.mean), "std": list(info.std),
      "crop_pct": crop_pct, "interpolation": interpolation, "dataset": None,
      "source": {"random_init_seed": seed, "overrides": {
          k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}},
  }
  return export(model, variables, out, metadata=metadata, quantize=quantize,
                parity_images=parity, representative_data=representative,
                eval_batches=eval_batches,
                max_eval_examples=max_eval_examples, has_labels=False,
                integer_io=integer_io, gelu=gelu)


# ----------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m vit_edge.export",
      description="Export a trained run (--workdir) or a registry model (--model) "
                  "to a self-describing TFLite file, with a parity check.")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="training run directory")
  source.add_argument("--model", help="registry name (random initialisation)")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step of --workdir (default: newest)")
  parser.add_argument("--quantize", default="none", choices=QUANTIZE_MODES)
  parser.add_argument("--out", default=None,
                      help="output .tflite (default: <model>_<quantize>.tflite in "
                           "<workdir>/export or the current directory)")
  parser.add_argument("--image_size", type=int, default=None,
                      help="input side (default: the training resolution, or the "
                           "model's reference one with --model)")
  parser.add_argument("--num_classes", type=int, default=1000,
                      help="with --model: classifier width")
  parser.add_argument("--calibration", default="digits", choices=("digits", "random"),
                      help="with --model: calibration/parity images")
  parser.add_argument("--num_calibration_samples", type=int,
                      default=DEFAULT_NUM_CALIBRATION_SAMPLES)
  parser.add_argument("--num_parity_samples", type=int,
                      default=DEFAULT_NUM_PARITY_SAMPLES)
  parser.add_argument("--max_eval_examples", type=int, default=None,
                      help="cap on the agreement/accuracy pass (0 skips it)")
  parser.add_argument("--integer_io", action="store_true",
                      help="with --quantize=int8: int8 input and outputs")
  parser.add_argument("--gelu", default="tanh", choices=GELU_MODES,
                      help="GELU in the exported graph: tanh (one fused TFLite op) "
                           "or exact (rational erf)")
  parser.add_argument("--no_ema", action="store_true",
                      help="with --workdir: export the raw, not the EMA, parameters")
  parser.add_argument("--seed", type=int, default=0,
                      help="with --model: initialisation seed")
  return parser


def _default_out(workdir: str, quantize: str) -> str:
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      name = json.load(f).get("model", "model")
  except (OSError, ValueError):
    name = "model"  # export_from_workdir reports the missing run clearly.
  return os.path.join(workdir, "export", f"{name}_{quantize}.tflite")


def main(argv: Optional[Sequence[str]] = None) -> ExportReport:
  """Command-line entry point; returns the report (see the module docstring).

  Example::

      main(["--model=tformer_s", "--image_size=64", "--out=/tmp/t.tflite"])
  """
  args = _parser().parse_args(argv)
  common = dict(quantize=args.quantize,
                num_calibration_samples=args.num_calibration_samples,
                num_parity_samples=args.num_parity_samples,
                max_eval_examples=args.max_eval_examples,
                integer_io=args.integer_io, gelu=args.gelu)
  if args.workdir:
    out = args.out or _default_out(args.workdir, args.quantize)
    report = export_from_workdir(args.workdir, out, step=args.step,
                                 image_size=args.image_size,
                                 use_ema=not args.no_ema, **common)
  else:
    out = args.out or f"{args.model}_{args.quantize}.tflite"
    report = export_from_registry(args.model, out, image_size=args.image_size,
                                  num_classes=args.num_classes,
                                  calibration=args.calibration, seed=args.seed,
                                  **common)
  print(report.summary())
  return report


if __name__ == "__main__":
  try:
    main()
  except (FileNotFoundError, ValueError, ParityError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
