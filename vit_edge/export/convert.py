"""Conversion to TFLite bytes: the only module of the export that imports TensorFlow.

jax2tf native serialisation for the CPU platform, static batch 1, then the
TFLite converter of TF 2.21 lowers the one XlaCallModule op to builtin ops.
(:mod:`.tf_private` wraps the private TensorFlow calls of the int8 path.)
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Optional

import numpy as np

from vit_edge.export import inference
from vit_edge.export import modes
from vit_edge.export import quantize as quantize_lib
from vit_edge.export import serving as serving_lib
from vit_edge.export import tf_private

# TensorFlow is only needed for conversion; keep its C++ logging quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _as_sample(item, spec: serving_lib.ServingSpec) -> list[np.ndarray]:
  """One representative item (an array, a list, or a dict by input name) as inputs."""
  if isinstance(item, dict):
    item = [item[t.name] for t in spec.inputs]
  elif len(spec.inputs) == 1:
    item = [item]
  return [np.asarray(x, t.dtype).reshape(t.shape) for x, t in zip(item, spec.inputs)]


def to_tflite(model, variables, image_size: int = 0, channels: int = 3, *,
              quantize: str = "none",
              representative_data: Optional[Callable[[], Iterable]] = None,
              integer_io: bool = False, gelu: str = "tanh",
              serving: Optional[serving_lib.ServingSpec] = None,
              int8_policy: quantize_lib.Int8Policy = quantize_lib.DEFAULT_POLICY
              ) -> bytes:
  """Converts a model to TFLite bytes (no metadata, no checks; see ``export``).

  Args:
    model: a linen module; ``apply(variables, x, train=False)`` gives (logits, aux).
    variables: its float32 variables.
    image_size: side of the square input of the default classification spec.
    channels: its input channels.
    quantize: one of :data:`vit_edge.export.QUANTIZE_MODES`.
    representative_data: for ``int8``: a callable returning an iterable of
      samples: float32 [1, S, S, C] images, or for several inputs a list (in
      the spec's order) or dict by input name.
    integer_io: for ``int8``: int8 input and outputs (quantisation parameters in
      the model) and integer-only kernels.
    gelu: "tanh" or "exact" (see :mod:`vit_edge.export.passes.gelu`).
    serving: what to serve (default: classification at `image_size`).
    int8_policy: which ops of an int8 export stay float, and whether its
      activations are static or dynamic (:class:`vit_edge.export.Int8Policy`).

  Returns:
    The flatbuffer bytes with the spec's signature (default ``serving_default``:
    input ``image``, outputs ``logits`` and ``probs``).

  Raises:
    ValueError: for an unknown mode, or int8 without representative data.

  Example::

      tflite_bytes = to_tflite(model, variables, 224, quantize="fp16")
  """
  modes.check_quantize(quantize)
  if quantize == "int8" and representative_data is None:
    raise ValueError("quantize='int8' needs representative_data, a callable that "
                     "yields float32 [1, S, S, C] preprocessed training images "
                     "(export_from_workdir and export_from_registry provide one).")
  if integer_io and quantize != "int8":
    raise ValueError(f"integer_io=True needs quantize='int8'; got {quantize!r}.")
  if serving is None and image_size < 1:
    raise ValueError(f"image_size={image_size}: the default serving spec "
                     "(classification) needs the input side, e.g. "
                     "to_tflite(model, variables, 224); or pass serving=.")
  spec = serving or serving_lib.classification(image_size, channels)
  if quantize == "int8" and quantize_lib.activation_scheme(
      model, int8_policy, integer_io) == "dynamic":
    # int8 weights, matmul inputs quantised per row at run time (quantize.py).
    return _convert(_converter(model, variables, spec, gelu, "dynamic"), spec)
  converter = _converter(model, variables, spec, gelu, quantize)
  if quantize != "int8":
    return _convert(converter, spec)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def representative():
    for item in representative_data():
      yield _as_sample(item, spec)

  converter.representative_dataset = representative
  if integer_io:
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return _convert(converter, spec)
  # Calibrate only; the int8 policy picks what stays float.
  tf_private.set_calibrate_only(converter)
  debug_samples = []
  for sample in representative():
    if len(debug_samples) >= int8_policy.num_debug_samples:
      break
    debug_samples.append(sample)
  return quantize_lib.quantize_for_xnnpack(_convert(converter, spec), debug_samples,
                                           int8_policy)


def _converter(model, variables, spec, gelu: str, quantize: str):
  """A TFLiteConverter of the rewritten serving function, with the mode's options."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TensorFlow already initialised its devices.
    pass
  fn = inference.inference_function(model, variables, gelu=gelu,
                                    split_projections=quantize == "int8",
                                    serving=spec)
  converted = jax2tf.convert(fn, native_serialization_platforms=("cpu",),
                             with_gradient=False)
  specs = [tf.TensorSpec(t.shape, getattr(tf, t.dtype), name=t.name)
           for t in spec.inputs]
  # A tf.Module as the trackable object makes the converter emit a SignatureDef
  # whose input/output names are the argument names and the output dict keys.
  module = tf.Module()
  module.serve = tf.function(lambda *inputs: converted(*inputs), input_signature=specs,
                             autograph=False)
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [module.serve.get_concrete_function()], module)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  if quantize != "none":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  if quantize == "fp16":
    converter.target_spec.supported_types = [tf.float16]
  return converter


def _convert(converter, spec: serving_lib.ServingSpec) -> bytes:
  """converter.convert() with the known converter failures explained."""
  try:
    return converter.convert()
  except Exception as e:  # The converter raises ConverterError/RuntimeError.
    if "op found invalid output rank" in str(e):
      raise ValueError(
          f"The TFLite converter of TF 2.21 cannot lower a matmul whose token or "
          f"patch dimension has size 1, which the input shapes "
          f"{[t.shape for t in spec.inputs]} produce for this model, and the "
          "export's unit-axis rewrite (passes/projection.py) did not cover this "
          "one. Export at a larger image_size (the model's reference resolution, "
          "or at least 4x its total stride).") from e
    raise
