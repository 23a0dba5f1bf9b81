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
  (see :data:`FLOAT_TOLERANCES`; every declared output), or the export raises :class:`ParityError` and
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
* A patchifying convolution (kernel = stride, no padding: DeiT's patch
  embedding, EdgeViT's stem and downsamplings) becomes a reshape, a transpose and
  one product (XNNPACK's CONV_2D is slow on 3 input channels).
* Two pointwise linear maps in a row with only per-channel adds and multiplies
  between (a 1x1 conv + BatchNorm, then the next block's 1x1 expansion in
  MobileViTv2) become one product with the merged kernel, where that has fewer
  MACs: 12% of MobileViTv2-0.5's and -1.0's.
* A token-weighted sum of a projection (MobileViTv2's context vector, the keys
  weighted by the context scores and summed over the patches) becomes the
  projection of the weighted sum of its input; the key columns leave the fused
  query/key/value product: 5% of MobileViTv2-0.5's and -1.0's MACs.
* A product of an activation and a transposed activation without batch axes
  (single-head attention scores at batch 1: EdgeViT's first stage) keeps a size-1
  batch axis; the converter would otherwise make it a FULLY_CONNECTED with
  activation weights, which XNNPACK leaves out (a second partition).

A model that implements :class:`HasExportForm` (a method ``export_form()``) is
traced in that form: the same function and parameters written the way that
converts best (TFormer: PCS-FFN's channel shuffle folded into its group convs,
no transpose, int8 tformer_s at 224 went from 9.2 to 7.9 ms; and its average
pools as ``window_sum / window_count``).

What an export serves is a :class:`ServingSpec` (:mod:`.serving`): by default
:func:`classification`, as above; also :func:`features` (an ``aux`` entry),
:func:`dense` (per-pixel logits and class map) or a spec of your own with
several inputs. The spec is recorded in the metadata (``serving``) and the
parity guard compares every declared output.

Layout (one concern per module)::

    passes/        the rewrites above, one module each, in PASSES order
    rewrite.py     the jaxpr interpreter applying them, sub-graphs included
    serving.py     ServingSpec and its constructors
    inference.py   inference_function, the HasExportForm protocol
    convert.py     to_tflite (the only module importing TensorFlow's public API)
    tf_private.py  TensorFlow's private TFLite APIs behind a version check
    quantize.py    the int8 policy (Int8Policy)
    validate.py    parity guard, agreement pass, ExportReport
    metadata.py    the embedded metadata
    data.py        calibration / parity images
    pipeline.py    export, export_from_workdir, export_from_registry
    __main__.py    the command line

Example::

    report = export_from_workdir("/tmp/tformer_s", "tformer_s_int8.tflite",
                                 quantize="int8")
    print(report.summary())
"""

from vit_edge.export.cli import main
from vit_edge.export.convert import to_tflite
from vit_edge.export.inference import HasExportForm, inference_function
from vit_edge.export.metadata import add_metadata
from vit_edge.export.modes import (DEFAULT_NUM_CALIBRATION_SAMPLES,
                                   DEFAULT_NUM_PARITY_SAMPLES, GELU_MODES,
                                   QUANTIZE_MODES, check_gelu, check_quantize)
from vit_edge.export.pipeline import export, export_from_registry, export_from_workdir
from vit_edge.export.quantize import INT8_ACTIVATIONS, INT8_FLOAT_OPS, Int8Policy
from vit_edge.export.serving import (OutputSpec, ServingSpec, TensorSpec,
                                     classification, dense, features)
from vit_edge.export.validate import (FLOAT_TOLERANCES, ExportReport, ParityError,
                                      check_parity, tflite_outputs, tflite_predict)

SIGNATURE_KEY = "serving_default"
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "probs")

__all__ = [
    "DEFAULT_NUM_CALIBRATION_SAMPLES", "DEFAULT_NUM_PARITY_SAMPLES",
    "ExportReport", "FLOAT_TOLERANCES", "GELU_MODES", "HasExportForm",
    "INPUT_NAME", "INT8_ACTIVATIONS", "INT8_FLOAT_OPS", "Int8Policy", "OUTPUT_NAMES",
    "OutputSpec",
    "ParityError", "QUANTIZE_MODES", "SIGNATURE_KEY", "ServingSpec", "TensorSpec",
    "add_metadata", "check_gelu", "check_parity", "check_quantize",
    "classification", "dense", "export", "export_from_registry",
    "export_from_workdir", "features", "inference_function", "main", "tflite_outputs",
    "tflite_predict", "to_tflite",
]
