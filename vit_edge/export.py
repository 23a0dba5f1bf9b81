"""Export of a Flax model to TFLite through jax2tf.

The graph is serialised natively for the CPU platform (one XlaCallModule op) with a
static batch of 1; TF 2.21's TFLite converter lowers it to builtin ops. Models in
the zoo avoid sort / argsort / top_k, which that converter cannot lower.

Example::

    model = create_model("edgevit_xxs", num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    tflite_bytes = to_tflite(model, variables, image_size=224)
    logits = tflite_predict(tflite_bytes, images)
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import numpy as np

# TensorFlow must not grab a GPU that JAX uses; it is only needed for conversion.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def to_tflite(model: nn.Module, variables: Any, image_size: int,
              channels: int = 3) -> bytes:
  """Converts `model.apply(variables, x, train=False)[0]` to a float TFLite model.

  The TFLite model takes one float32 image batch of shape
  (1, image_size, image_size, channels), NHWC, preprocessed as for the JAX model, and
  returns the logits.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], "GPU")

  def logits_fn(images):
    logits, _ = model.apply(variables, images, train=False)
    return logits

  converted = jax2tf.convert(logits_fn, native_serialization_platforms=("cpu",),
                             with_gradient=False)
  spec = tf.TensorSpec((1, image_size, image_size, channels), tf.float32, name="image")
  tf_fn = tf.function(converted, input_signature=[spec], autograph=False)
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [tf_fn.get_concrete_function()], tf_fn)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  return converter.convert()


def tflite_predict(tflite_model: bytes, images: np.ndarray,
                   num_threads: int | None = None) -> np.ndarray:
  """Runs a single-input TFLite model one image at a time; returns stacked outputs."""
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top

  interpreter = Interpreter(model_content=tflite_model, num_threads=num_threads)
  interpreter.allocate_tensors()
  (inp,) = interpreter.get_input_details()
  out = interpreter.get_output_details()[0]
  expected = tuple(inp["shape"][1:])
  if tuple(images.shape[1:]) != expected:
    raise ValueError(f"The TFLite model takes images of shape {expected} (HWC); got "
                     f"{tuple(images.shape[1:])}. Resize the images to match.")
  results = []
  for image in images:
    interpreter.set_tensor(inp["index"], image[None].astype(inp["dtype"]))
    interpreter.invoke()
    results.append(interpreter.get_tensor(out["index"])[0])
  return np.stack(results)
