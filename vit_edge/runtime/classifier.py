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
  """A single-signature TFLite image model with float (de)quantised I/O.

  Runs the ``serving_default`` signature one image at a time (the export has a
  static batch of 1). Full-integer models get their input quantised and outputs
  dequantised with the scales stored in the model, so callers always pass and
  receive float32. XNNPACK is applied by LiteRT's default delegate.

  Example::

      runner = TFLiteModel("model.tflite", num_threads=1)
      out = runner.predict(images)  # {"logits": [N, K], "probs": [N, K]}
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
    inputs = self._runner.get_input_details()
    if len(inputs) != 1:
      raise ValueError(f"Expected one image input, got {sorted(inputs)}.")
    (self.input_name, self._input), = inputs.items()
    self._outputs = self._runner.get_output_details()
    self.input_shape = tuple(int(d) for d in self._input["shape"])
    self.input_dtype = np.dtype(self._input["dtype"])

  @property
  def output_names(self) -> list[str]:
    return sorted(self._outputs)

  def _quantize(self, image: np.ndarray) -> np.ndarray:
    if self.input_dtype == np.float32:
      return image.astype(np.float32)
    scale, zero_point = self._input["quantization"]
    info = np.iinfo(self.input_dtype)
    q = np.round(image / scale + zero_point)
    return np.clip(q, info.min, info.max).astype(self.input_dtype)

  def _dequantize(self, name: str, value: np.ndarray) -> np.ndarray:
    if value.dtype == np.float32:
      return value
    scale, zero_point = self._outputs[name]["quantization"]
    return ((value.astype(np.float32) - zero_point) * scale).astype(np.float32)

  def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """Runs preprocessed float32 images [N, H, W, C] (or one [H, W, C]).

    Raises:
      ValueError: if the image shape is not the model's input shape.
    """
    images = np.asarray(images, np.float32)
    if images.ndim == len(self.input_shape) - 1:
      images = images[None]
    if images.shape[1:] != self.input_shape[1:]:
      raise ValueError(
          f"The model takes images of shape {self.input_shape[1:]} (HWC, batch "
          f"{self.input_shape[0]}); got {tuple(images.shape[1:])}. Preprocess "
          "with vit_edge.runtime.preprocess (it resizes to the model's size) or "
          "use Classifier.classify on the raw image.")
    results: dict[str, list[np.ndarray]] = {name: [] for name in self._outputs}
    for image in images:
      out = self._runner(**{self.input_name: self._quantize(image[None])})
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
