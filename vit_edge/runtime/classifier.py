"""Image classification with an exported vit_edge .tflite file (numpy, Pillow, LiteRT).

Example::

    clf = Classifier("tformer_s_int8.tflite", num_threads=2)
    for p in clf.classify("cat.jpg", top_k=3):
      print(p.label, p.probability)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence, Union

import numpy as np

from vit_edge.runtime import metadata as metadata_lib
from vit_edge.runtime import transforms

SIGNATURE_KEY = "serving_default"


def _interpreter_class():
  # Imported lazily so that `--help` and metadata reading work without LiteRT.
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  return Interpreter


class TFLiteModel:
  """A single-signature TFLite model with float (de)quantised I/O.

  Runs the ``serving_default`` signature one example at a time (the export has
  a static batch of 1). Full-integer models get their float inputs quantised and
  outputs dequantised with the scales stored in the model, so callers always
  pass and receive float32 (integer inputs such as indices pass through).
  XNNPACK is applied by LiteRT's default delegate. :meth:`predict` serves
  image models (one input); :meth:`run` any number of named inputs.

  Attributes:
    input_names: the signature's inputs, sorted.
    input_name, input_shape, input_dtype: those of the first input (the image of
      an image model).

  Example::

      runner = TFLiteModel("model.tflite", num_threads=1)
      out = runner.predict(images)  # {"logits": [N, K], "probs": [N, K]}
      out = TFLiteModel("tokens.tflite").run({"tokens": t, "mask": m})
  """

  def __init__(self, model: Union[str, os.PathLike, bytes],
               num_threads: Optional[int] = None):
    if num_threads is not None and num_threads < 1:
      raise ValueError(f"num_threads={num_threads} must be >= 1 (or None for "
                       "LiteRT's default).")
    interpreter_cls = _interpreter_class()
    if isinstance(model, (bytes, bytearray)):
      self._interpreter = interpreter_cls(model_content=bytes(model),
                                          num_threads=num_threads)
    else:
      path = os.fspath(model)
      if not os.path.exists(path):
        raise FileNotFoundError(f"Model file {path!r} does not exist; export one "
                                "with `python -m vit_edge.export`.")
      self._interpreter = interpreter_cls(model_path=path, num_threads=num_threads)
    signatures = self._interpreter.get_signature_list()
    if SIGNATURE_KEY not in signatures:
      raise ValueError(f"The model has signatures {sorted(signatures)}, not "
                       f"{SIGNATURE_KEY!r}; export it with `python -m vit_edge.export`.")
    self._runner = self._interpreter.get_signature_runner(SIGNATURE_KEY)
    self._inputs = self._runner.get_input_details()
    self.input_names = sorted(self._inputs)
    self.input_name = self.input_names[0]
    self._input = self._inputs[self.input_name]
    self._outputs = self._runner.get_output_details()
    self.input_shape = tuple(int(d) for d in self._input["shape"])
    self.input_dtype = np.dtype(self._input["dtype"])

  @property
  def output_names(self) -> list[str]:
    return sorted(self._outputs)

  def _quantize(self, value: np.ndarray, name: Optional[str] = None) -> np.ndarray:
    details = self._inputs[name or self.input_name]
    dtype = np.dtype(details["dtype"])
    scale, zero_point = details["quantization"]
    if dtype == np.float32 or not scale:  # Float, or a plain integer input.
      return np.asarray(value).astype(dtype)
    info = np.iinfo(dtype)
    q = np.round(np.asarray(value, np.float32) / scale + zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)

  def _dequantize(self, name: str, value: np.ndarray) -> np.ndarray:
    scale, _ = self._outputs[name]["quantization"]
    if value.dtype == np.float32 or not scale:  # Float, or integer indices.
      return value
    scale, zero_point = self._outputs[name]["quantization"]
    return ((value.astype(np.float32) - zero_point) * scale).astype(np.float32)

  def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """Runs preprocessed float32 images [N, H, W, C] (or one [H, W, C]).

    Raises:
      ValueError: if the image shape is not the model's input shape, or the
        model has several inputs (use :meth:`run`).
    """
    if len(self.input_names) != 1:
      raise ValueError(f"The model has inputs {self.input_names}, not one image; "
                       "call run({name: batch, ...}) instead of predict.")
    images = np.asarray(images, np.float32)
    if images.ndim == len(self.input_shape) - 1:
      images = images[None]
    if images.shape[1:] != self.input_shape[1:]:
      raise ValueError(
          f"The model takes images of shape {self.input_shape[1:]} (HWC, batch "
          f"{self.input_shape[0]}); got {tuple(images.shape[1:])}. Preprocess "
          "with vit_edge.runtime.preprocess (it resizes to the model's size) or "
          "use Classifier.classify on the raw image.")
    return self.run({self.input_name: images})

  def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output for batched named inputs ``{name: [N, ...]}``, example by example.

    Raises:
      ValueError: for missing or extra names, or shapes other than the model's.

    Example::

        out = runner.run({"tokens": tokens, "mask": mask})  # {name: [N, ...]}
    """
    if sorted(inputs) != self.input_names:
      raise ValueError(f"The model takes inputs {self.input_names}; got "
                       f"{sorted(inputs)}.")
    count = None
    for name, value in inputs.items():
      shape = tuple(int(d) for d in self._inputs[name]["shape"])
      if np.ndim(value) != len(shape) or np.shape(value)[1:] != shape[1:]:
        raise ValueError(f"Input {name!r} has shape {np.shape(value)}; the model "
                         f"takes [N, *{shape[1:]}].")
      count = len(value) if count is None else count
      if len(value) != count:
        raise ValueError(f"Inputs have different batch sizes: {name!r} has "
                         f"{len(value)}, expected {count}.")
    results: dict[str, list[np.ndarray]] = {name: [] for name in self._outputs}
    for i in range(count):
      out = self._runner(**{name: self._quantize(value[i:i + 1], name)
                            for name, value in inputs.items()})
      for name, value in out.items():
        results[name].append(self._dequantize(name, value)[0])
    return {name: np.stack(values) for name, values in results.items()}


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One of the top-k classes of an image."""
  index: int
  label: str
  probability: float


class Classifier:
  """Classifies images with a vit_edge .tflite file and its embedded metadata.

  The metadata gives the input size, the eval crop, the normalisation and the
  labels, so the file is all a device needs.

  Attributes:
    metadata: the dict written by the exporter (see
      :func:`vit_edge.runtime.metadata.read_metadata`).
    labels: class names, indexed by class id.

  Example::

      clf = Classifier("tformer_s.tflite")
      top = clf.classify("cat.jpg", top_k=5)  # [Prediction(index, label, p), ...]
  """

  def __init__(self, model_path: Union[str, os.PathLike],
               num_threads: Optional[int] = None):
    path = os.fspath(model_path)
    if not os.path.exists(path):
      raise FileNotFoundError(f"Model file {path!r} does not exist; export one with "
                              "`python -m vit_edge.export`.")
    self.metadata: dict[str, Any] = metadata_lib.read_metadata(path)
    kinds = metadata_lib.output_kinds(self.metadata)
    if "logits" not in kinds.values() and "probs" not in kinds.values():
      raise metadata_lib.MetadataError(
          f"{path!r} serves {kinds}, not class logits or probabilities; it is not "
          "a classification export. Run it with TFLiteModel(path).run(...) or "
          "export with the default serving spec (classification).")
    self.model = TFLiteModel(path, num_threads=num_threads)
    size = int(self.metadata["image_size"])
    if self.model.input_shape[1:3] != (size, size):
      raise metadata_lib.MetadataError(
          f"The metadata says image_size={size} but the model input is "
          f"{self.model.input_shape}; the file was modified after export. "
          "Re-export it.")
    self.labels: list[str] = [str(n) for n in self.metadata["label_names"]]

  @property
  def image_size(self) -> int:
    return int(self.metadata["image_size"])

  def preprocess(self, image: transforms.ImageLike) -> np.ndarray:
    """The model input for one image: float32 [S, S, 3]."""
    m = self.metadata
    return transforms.preprocess(image, self.image_size, m["mean"], m["std"],
                                     crop_pct=float(m["crop_pct"]),
                                     interpolation=str(m["interpolation"]))

  def predict(self, images: np.ndarray) -> np.ndarray:
    """Class probabilities [N, K] of preprocessed images [N, S, S, 3]."""
    out = self.model.predict(images)
    if "probs" in out:
      return out["probs"]
    logits = out["logits"]
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  def classify(self, image: transforms.ImageLike,
               top_k: int = 5) -> list[Prediction]:
    """The `top_k` most probable classes of one image, best first.

    Args:
      image: a path, PIL image or uint8 array (any size; it is resized).
      top_k: how many classes to return (at most the number of classes).

    Raises:
      FileNotFoundError / ImageReadError: for a missing or unreadable image.
      ValueError: for top_k < 1.
    """
    if top_k < 1:
      raise ValueError(f"top_k={top_k} must be >= 1.")
    probs = self.predict(self.preprocess(image)[None])[0]
    order = np.argsort(-probs, kind="stable")[:min(top_k, len(probs))]
    return [Prediction(int(i), self._label(int(i)), float(probs[i])) for i in order]

  def classify_many(self, images: Sequence[transforms.ImageLike],
                    top_k: int = 5) -> list[list[Prediction]]:
    """:meth:`classify` for several images."""
    return [self.classify(image, top_k) for image in images]

  def _label(self, index: int) -> str:
    return self.labels[index] if index < len(self.labels) else str(index)
