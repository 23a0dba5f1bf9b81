"""What an export serves: its inputs, its named outputs and what each output means.

A :class:`ServingSpec` states the exported signature instead of fixing it:

* :func:`classification` (the default, unchanged for existing users): input
  ``image`` float32 [1, S, S, C], outputs ``logits`` and ``probs``;
* :func:`features`: one ``aux`` entry of the model (``pre_logits``, final
  tokens, a stage map) as the output, e.g. for retrieval or a downstream head;
* :func:`dense`: per-pixel logits upsampled to the input resolution and the
  argmax class map (segmentation-style heads);
* any spec of your own, e.g. several inputs (N token vectors and a presence
  mask; see tests/export/test_serving.py).

The spec is recorded in the metadata (``serving``), so the runtime knows what
each output is, and the parity guard compares every declared output.

Example::

    spec = features(224, aux_key="pre_logits")
    report = export_from_registry("tformer_s", "f.tflite", serving=spec)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

# What an output means. Float kinds are compared by the parity guard with the
# float tolerances; "class_map" (argmax indices) by agreement.
OUTPUT_KINDS = ("logits", "probs", "features", "dense_logits", "class_map", "tensor")
FLOAT_KINDS = ("logits", "probs", "features", "dense_logits", "tensor")
DTYPES = ("float32", "int32")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One input of the exported signature (static shape, batch 1 first).

  Example::

      TensorSpec("mask", (1, 16))  # float32 [1, 16]
  """

  name: str
  shape: tuple[int, ...]
  dtype: str = "float32"

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"TensorSpec {self.name!r}: dtype={self.dtype!r}; expected "
                       f"one of {DTYPES}.")
    if not self.shape or self.shape[0] != 1:
      raise ValueError(f"TensorSpec {self.name!r}: shape={self.shape}; exports have "
                       "a static batch of 1, so the shape must start with 1.")


@dataclasses.dataclass(frozen=True)
class OutputSpec:
  """One output of the exported signature and what it means (:data:`OUTPUT_KINDS`).

  Example::

      OutputSpec("pre_logits", "features")
  """

  name: str
  kind: str

  def __post_init__(self):
    if self.kind not in OUTPUT_KINDS:
      raise ValueError(f"OutputSpec {self.name!r}: kind={self.kind!r}; expected one "
                       f"of {OUTPUT_KINDS}.")


@dataclasses.dataclass(frozen=True)
class ServingSpec:
  """The exported signature: ``fn(model, variables, *inputs) -> {output name: array}``.

  Attributes:
    inputs: the inputs, in the order `fn` takes them.
    outputs: the outputs; `fn` must return exactly these names.
    fn: the served computation, traced with the export rewrites; it must work for
      any leading batch size (the parity guard runs it on batches).
    signature: the TFLite signature key.

  Example::

      spec = ServingSpec(
          inputs=[TensorSpec("tokens", (1, 16, 64)), TensorSpec("mask", (1, 16))],
          outputs=[OutputSpec("logits", "logits")],
          fn=lambda model, variables, tokens, mask: {
              "logits": model.apply(variables, tokens, mask)[0]})
  """

  inputs: tuple[TensorSpec, ...]
  outputs: tuple[OutputSpec, ...]
  fn: Callable[..., dict[str, Any]]
  signature: str = "serving_default"

  def __post_init__(self):
    object.__setattr__(self, "inputs", tuple(self.inputs))
    object.__setattr__(self, "outputs", tuple(self.outputs))
    names = [t.name for t in self.inputs] + [o.name for o in self.outputs]
    if not self.inputs or not self.outputs or len(set(names)) != len(names):
      raise ValueError(f"ServingSpec needs >= 1 input and output with distinct "
                       f"names; got inputs {[t.name for t in self.inputs]} and "
                       f"outputs {[o.name for o in self.outputs]}.")

  @property
  def output_names(self) -> list[str]:
    return [o.name for o in self.outputs]

  def to_metadata(self) -> dict[str, Any]:
    """The JSON-able record stored as metadata ``serving``."""
    return {"signature": self.signature,
            "inputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype}
                       for t in self.inputs],
            "outputs": [{"name": o.name, "kind": o.kind} for o in self.outputs]}

  def check_outputs(self, outputs: dict[str, Any]) -> None:
    """Raises unless `outputs` has exactly the declared names."""
    if sorted(outputs) != sorted(self.output_names):
      raise ValueError(f"The serving fn returned outputs {sorted(outputs)}; the spec "
                       f"declares {sorted(self.output_names)}. Make them agree.")


def _image(image_size: int, channels: int) -> TensorSpec:
  return TensorSpec("image", (1, image_size, image_size, channels))


def _classify(model, variables, image):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  logits, _ = model.apply(variables, image, train=False)
  logits = logits.astype(jnp.float32)
  return {"logits": logits, "probs": jax.nn.softmax(logits, axis=-1)}


def classification(image_size: int, channels: int = 3) -> ServingSpec:
  """Input ``image`` [1, S, S, C]; outputs ``logits`` and ``probs`` (softmax).

  Example::

      spec = classification(224)
  """
  return ServingSpec((_image(image_size, channels),),
                     (OutputSpec("logits", "logits"), OutputSpec("probs", "probs")),
                     _classify)


def features(image_size: int, aux_key: str = "pre_logits", channels: int = 3,
             name: str = "") -> ServingSpec:
  """Input ``image``; output the model's ``aux[aux_key]`` (named `name` or aux_key).

  Example::

      spec = features(224, "pre_logits")  # output "pre_logits": [1, D]
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  out_name = name or aux_key

  def serve(model, variables, image):
    _, aux = model.apply(variables, image, train=False)
    if aux_key not in aux:
      raise KeyError(f"aux_key={aux_key!r} is not an aux output of "
                     f"{type(model).__name__}; it has {sorted(aux)}.")
    return {out_name: aux[aux_key].astype(jnp.float32)}

  return ServingSpec((_image(image_size, channels),),
                     (OutputSpec(out_name, "features"),), serve)


def _bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
  """[out, in] half-pixel bilinear interpolation weights (edge-clamped)."""
  position = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
  position = np.clip(position, 0, in_size - 1)
  low = np.floor(position).astype(int)
  high = np.minimum(low + 1, in_size - 1)
  frac = position - low
  matrix = np.zeros((out_size, in_size), np.float32)
  matrix[np.arange(out_size), low] += 1 - frac
  matrix[np.arange(out_size), high] += frac
  return matrix


def resize_bilinear(x, height: int, width: int):
  """[N, h, w, K] -> [N, height, width, K] as two products with constant matrices.

  Half-pixel centres, edge-clamped (PyTorch ``align_corners=False``). Matrix
  products convert to FULLY_CONNECTED/BATCH_MATMUL ops that XNNPACK runs, unlike
  the gather-based resize ops; segmentation heads use it in training too, so the
  exported resize is the trained one.

  Example::

      resize_bilinear(jnp.ones((1, 4, 4, 2)), 16, 8).shape  # (1, 16, 8, 2)
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if (x.shape[1], x.shape[2]) == (height, width):
    return x
  rows = jnp.asarray(_bilinear_matrix(height, x.shape[1]), x.dtype)
  cols = jnp.asarray(_bilinear_matrix(width, x.shape[2]), x.dtype)
  x = jnp.einsum("hi,nijk->nhjk", rows, x)
  return jnp.einsum("wj,nhjk->nhwk", cols, x)


def upsample_bilinear(x, size: int):
  """[N, h, w, K] -> [N, size, size, K]; see :func:`resize_bilinear`.

  Example::

      upsample_bilinear(jnp.ones((1, 4, 4, 2)), 16).shape  # (1, 16, 16, 2)
  """
  return resize_bilinear(x, size, size)


def dense(image_size: int, source: str = "logits", channels: int = 3
          ) -> ServingSpec:
  """Per-pixel outputs: ``dense_logits`` [1, S, S, K] and ``class_map`` [1, S, S].

  `source` is the dense map: "logits" (the model's first output, [N, h, w, K]
  for a segmentation head) or an aux key (e.g. a stage map); it is upsampled
  bilinearly to the input resolution and its argmax is the class map.

  Example::

      spec = dense(64, source="stage1")
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def serve(model, variables, image):
    logits, aux = model.apply(variables, image, train=False)
    dense_map = logits if source == "logits" else aux[source]
    if dense_map.ndim != 4:
      raise ValueError(f"dense(source={source!r}): the map has shape "
                       f"{dense_map.shape}; expected [N, h, w, K]. Pick a 4-D aux "
                       "entry or a model with a dense head.")
    up = upsample_bilinear(dense_map.astype(jnp.float32), image_size)
    return {"dense_logits": up,
            "class_map": jnp.argmax(up, axis=-1).astype(jnp.int32)}

  return ServingSpec((_image(image_size, channels),),
                     (OutputSpec("dense_logits", "dense_logits"),
                      OutputSpec("class_map", "class_map")), serve)


def is_classification(spec: ServingSpec) -> bool:
  """Whether `spec` serves today's image -> logits/probs signature."""
  return ([t.name for t in spec.inputs] == ["image"]
          and spec.output_names == ["logits", "probs"])
