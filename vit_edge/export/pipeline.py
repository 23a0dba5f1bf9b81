"""The export itself: convert, embed metadata, check parity, evaluate, write.

:func:`export` works on any model and :class:`~vit_edge.export.serving.ServingSpec`;
:func:`export_from_workdir` and :func:`export_from_registry` supply the model,
metadata, calibration and parity images for a training run or a registry model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
import warnings
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np

from vit_edge.compress import qat
from vit_edge.export import convert
from vit_edge.export import data
from vit_edge.export import metadata as export_metadata_lib
from vit_edge.export import modes
from vit_edge.export import quantize as quantize_lib
from vit_edge.export import serving as serving_lib
from vit_edge.export import validate

# Exported files are meant to be copied to devices and read by other users and
# services, like any build artefact: rw-r--r-- before the umask.
FILE_MODE = 0o644


def write_atomically(path: str, data_bytes: bytes) -> None:
  """Writes `path` via a temporary file and a rename, with mode 0644 minus the umask.

  mkstemp creates its file 0600 (private); the rename would keep that.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-export-", suffix=".tflite", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data_bytes)
    os.chmod(tmp, FILE_MODE & ~_current_umask())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def _current_umask() -> int:
  # os.umask can only be read by setting it; restore it at once.
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _jax_logits_fn(model, variables):
  import jax  # pylint: disable=g-import-not-at-top

  @jax.jit
  def logits_fn(images):
    logits, _ = model.apply(variables, images, train=False)
    return logits

  return lambda images: np.asarray(logits_fn(images), np.float32)


def _jax_outputs(model, variables, spec, inputs: dict[str, np.ndarray]
                 ) -> dict[str, np.ndarray]:
  """The spec's outputs computed by JAX on the original model, in batches of 64."""
  import jax  # pylint: disable=g-import-not-at-top
  fn = jax.jit(lambda *xs: spec.fn(model, variables, *xs))
  names = [t.name for t in spec.inputs]
  parts = [fn(*[inputs[n][i:i + 64] for n in names])
           for i in range(0, len(inputs[names[0]]), 64)]
  return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}


def _parity_inputs(parity_images, spec, image_size: int) -> dict[str, np.ndarray]:
  """`parity_images` as ``{input name: [N, ...]}``, shapes checked against the spec."""
  if not isinstance(parity_images, dict):
    images = np.asarray(parity_images, np.float32)
    if images.ndim != 4 or images.shape[1:3] != (image_size, image_size) or not len(
        images):
      raise ValueError(f"parity_images has shape {images.shape}; expected "
                       f"[N >= 1, {image_size}, {image_size}, C] preprocessed "
                       "images.")
    parity_images = {spec.inputs[0].name: images}
  inputs = {}
  for t in spec.inputs:
    value = np.asarray(parity_images.get(t.name), t.dtype)
    if value.ndim != len(t.shape) or value.shape[1:] != tuple(t.shape[1:]) or not len(
        value):
      raise ValueError(f"Parity input {t.name!r} has shape {value.shape}; the "
                       f"serving spec expects [N >= 1, *{tuple(t.shape[1:])}].")
    inputs[t.name] = value
  return inputs


def _spec_for(serving, metadata, parity_images) -> serving_lib.ServingSpec:
  if serving is not None:
    return serving
  if "image_size" not in metadata:
    raise ValueError("metadata lacks 'image_size', which the default serving spec "
                     "(classification) needs; add it or pass serving=ServingSpec(...).")
  channels = np.shape(parity_images)[-1] if not isinstance(parity_images, dict) else 3
  return serving_lib.classification(int(metadata["image_size"]), channels)


def export(model, variables, out: str, *, metadata: dict[str, Any],
           quantize: str = "none",
           parity_images: Union[np.ndarray, dict[str, np.ndarray]],
           representative_data: Optional[Callable[[], Iterable]] = None,
           eval_batches: Optional[Iterable[dict]] = None,
           max_eval_examples: Optional[int] = None, has_labels: bool = False,
           integer_io: bool = False, gelu: str = "tanh",
           serving: Optional[serving_lib.ServingSpec] = None,
           int8_policy: quantize_lib.Int8Policy = quantize_lib.DEFAULT_POLICY,
           converter: Optional[Callable[..., bytes]] = None
           ) -> validate.ExportReport:
  """Converts, embeds metadata, checks parity, evaluates, then writes `out`.

  Nothing is written unless every check passes (the file appears atomically,
  mode 0644 minus the umask).

  Args:
    model: linen module (float32 compute).
    variables: its variables.
    out: destination .tflite path.
    metadata: the dict to embed; needs the keys of
      :data:`vit_edge.runtime.metadata.REQUIRED_KEYS`.
    quantize: one of :data:`vit_edge.export.QUANTIZE_MODES`.
    parity_images: float32 [N, S, S, C] preprocessed images for the guard, or
      for a multi-input spec ``{input name: [N, ...]}``.
    representative_data: calibration samples for ``int8`` (see ``to_tflite``).
    eval_batches: optional ``{"image", "label"[, "mask"]}`` batches for the
      agreement / accuracy pass (classification specs).
    max_eval_examples: cap on eval images (None: all).
    has_labels: whether eval labels index the model's classes (accuracy).
    integer_io: int8 input/outputs (``int8`` only).
    gelu: "tanh" or "exact".
    serving: what the file serves (default: classification at the metadata's
      image_size); recorded in the metadata, every output checked.
    int8_policy: which ops of an int8 export stay float.
    converter: ``converter(model, variables, spec) -> bytes`` in place of the
      TensorFlow converter (the QAT route, :func:`vit_edge.compress.qat.to_tflite`);
      `model` is then the model the file must reproduce.

  Returns:
    An :class:`~vit_edge.export.validate.ExportReport`.

  Raises:
    ParityError: float export outside the tolerance (nothing written).
    ValueError: bad mode, shapes or metadata.

  Example::

      report = export(model, variables, "m.tflite", metadata=meta,
                      parity_images=images[:16])
  """
  modes.check_quantize(quantize)
  modes.check_gelu(gelu)
  start = time.time()
  spec = _spec_for(serving, metadata, parity_images)
  export_metadata_lib.check_required(metadata, spec)
  inputs = _parity_inputs(parity_images, spec, int(metadata.get("image_size", 0)))
  activations = None
  if quantize == "int8" and converter is not None:
    activations = "static"  # The QAT converter carries learned static ranges.
  elif quantize == "int8":  # Decided once here; the converter follows the policy.
    activations = quantize_lib.activation_scheme(model, int8_policy, integer_io)
    int8_policy = dataclasses.replace(int8_policy, activations=activations)
  if converter is not None:
    tflite_model = converter(model, variables, spec)
  else:
    tflite_model = convert.to_tflite(model, variables, quantize=quantize,
                                     representative_data=representative_data,
                                     integer_io=integer_io, gelu=gelu, serving=spec,
                                     int8_policy=int8_policy)
  meta = export_metadata_lib.export_metadata(metadata, spec, quantize=quantize,
                                             integer_io=integer_io, gelu=gelu,
                                             int8_activations=activations)
  tflite_model = export_metadata_lib.add_metadata(tflite_model, meta)
  expected = _jax_outputs(model, variables, spec, inputs)
  stats = validate.check_parity(tflite_model, expected, inputs, quantize, spec)
  evaluation = {"num_eval_examples": 0}
  if (eval_batches is not None and max_eval_examples != 0
      and serving_lib.is_classification(spec)):
    evaluation = validate.evaluate(tflite_model, _jax_logits_fn(model, variables),
                                   eval_batches, max_eval_examples, has_labels)
  write_atomically(out, tflite_model)
  return validate.ExportReport(
      path=out, model=str(metadata["model"]), quantize=quantize,
      int8_activations=activations, size_bytes=len(tflite_model),
      num_parity_samples=len(next(iter(inputs.values()))),
      max_abs_logit_diff=stats["max_abs_logit_diff"],
      max_abs_logit=stats["max_abs_logit"], tolerance=stats["tolerance"],
      relative_logit_error=stats["relative_logit_error"],
      parity_top1_agreement=stats["top1_agreement"], seconds=time.time() - start,
      outputs=stats["outputs"], **evaluation)


def _check_common(quantize, gelu, num_calibration_samples, num_parity_samples,
                  max_eval_examples) -> None:
  modes.check_quantize(quantize)
  modes.check_gelu(gelu)
  data.check_count("num_calibration_samples", num_calibration_samples, 1)
  data.check_count("num_parity_samples", num_parity_samples, 1)
  data.check_count("max_eval_examples", max_eval_examples, 0)


def export_from_workdir(workdir: str, out: str, *, step: Optional[int] = None,
                        quantize: str = "none", image_size: Optional[int] = None,
                        num_calibration_samples: int = (
                            modes.DEFAULT_NUM_CALIBRATION_SAMPLES),
                        num_parity_samples: int = modes.DEFAULT_NUM_PARITY_SAMPLES,
                        max_eval_examples: Optional[int] = None,
                        integer_io: bool = False, gelu: str = "tanh",
                        use_ema: bool = True,
                        serving: Optional[serving_lib.ServingSpec] = None,
                        int8_policy: quantize_lib.Int8Policy = (
                            quantize_lib.DEFAULT_POLICY)
                        ) -> validate.ExportReport:
  """Exports the checkpoint of a training run.

  Calibration images come from the run's training split (eval-style
  preprocessing, shuffled); parity images and the agreement/accuracy pass use its
  eval split.

  Args:
    workdir: training directory with config.json, dataset_info.json and
      checkpoints/.
    out: destination .tflite path.
    step: checkpoint step (None: the newest).
    quantize: one of :data:`vit_edge.export.QUANTIZE_MODES`.
    image_size: export resolution (default: the training one). Convolutional
      and hybrid models run at any multiple of their stride; ViTs (fixed
      position embeddings) only at their training size.
    num_calibration_samples: training images for ``int8`` calibration.
    num_parity_samples: eval images for the parity guard.
    max_eval_examples: cap on the eval pass (None: the whole split, 0: skip).
    integer_io: int8 input/outputs (``int8`` only).
    gelu: "tanh" or "exact".
    use_ema: export the EMA parameters when the checkpoint has them.
    serving: an image-input spec (default: classification); e.g.
      ``serving.features(size, "pre_logits")``.
    int8_policy: which ops of an int8 export stay float.

  Returns:
    An :class:`~vit_edge.export.validate.ExportReport`.

  Raises:
    FileNotFoundError: `workdir` is not a training run or has no checkpoint.
    ParityError: float export outside the tolerance (nothing written).

  Example::

      report = export_from_workdir("/tmp/tformer_s", "tformer_s.tflite")
  """
  _check_common(quantize, gelu, num_calibration_samples, num_parity_samples,
                max_eval_examples)
  from vit_edge import input_pipeline  # pylint: disable=g-import-not-at-top
  from vit_edge import train  # pylint: disable=g-import-not-at-top

  _, variables, config, info = train.load_trained_model(workdir, step=step,
                                                        use_ema=use_ema)
  trained_size = int(config.image_size)
  if image_size is not None and image_size != trained_size:
    config = data.resized_config(config, image_size)
  model = train.build_model(data.float32_config(config), info["num_classes"])
  mean, std = info["mean"], info["std"]
  if serving is None and config.get("task") == "segmentation":
    serving = serving_lib.dense(int(config.image_size))
  eval_batches = input_pipeline.create_eval_iterator(
      config, mean=mean, std=std, local_batch_size=min(64, config.eval_batch_size))
  metadata = export_metadata_lib.run_metadata(
      config, info, workdir, step=data.checkpoint_step(workdir, step), use_ema=use_ema,
      trained_image_size=trained_size)
  converter = None
  if quantize == "int8" and qat.enabled(config):
    # A QAT run: the file carries the ranges learned in training (Qwix + LiteRT).
    model, variables, converter = qat.export_parts(model, variables, config,
                                                   integer_io=integer_io)
  representative = None
  if quantize == "int8" and converter is None:
    representative = data.representative_from_config(config, mean, std,
                                                      num_calibration_samples)
  return export(model, variables, out, metadata=metadata, quantize=quantize,
                parity_images=data.first_images(eval_batches, num_parity_samples),
                representative_data=representative, eval_batches=eval_batches,
                max_eval_examples=max_eval_examples, has_labels=True,
                integer_io=integer_io, gelu=gelu, serving=serving,
                int8_policy=int8_policy, converter=converter)


def _check_variable_shapes(model, size: int, variables: dict[str, Any]) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from vit_edge.models import convert as convert_lib  # pylint: disable=g-import-not-at-top
  want = {"/".join(k): v for k, v in convert_lib.variable_shapes(model, size).items()}
  got = {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
         for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}
  if want != got:
    wrong = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    raise ValueError(f"variables do not fit {type(model).__name__} at {size}x{size}: "
                     + "; ".join(f"{k}: expected {want.get(k)}, got {got.get(k)}"
                                 for k in wrong[:5])
                     + f" ({len(wrong)} in all). Build them for this model and size.")


def export_from_registry(name: str, out: str, *, image_size: Optional[int] = None,
                         num_classes: int = 1000, quantize: str = "none",
                         calibration: str = "digits",
                         num_calibration_samples: int = (
                             modes.DEFAULT_NUM_CALIBRATION_SAMPLES),
                         num_parity_samples: int = modes.DEFAULT_NUM_PARITY_SAMPLES,
                         max_eval_examples: Optional[int] = None,
                         integer_io: bool = False, gelu: str = "tanh", seed: int = 0,
                         overrides: Optional[dict[str, Any]] = None,
                         serving: Optional[serving_lib.ServingSpec] = None,
                         int8_policy: quantize_lib.Int8Policy = (
                             quantize_lib.DEFAULT_POLICY),
                         variables: Optional[dict[str, Any]] = None
                         ) -> validate.ExportReport:
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
    quantize: one of :data:`vit_edge.export.QUANTIZE_MODES`.
    calibration: "digits" or "random".
    num_calibration_samples: images for ``int8`` calibration.
    num_parity_samples: images for the parity guard.
    max_eval_examples: cap on the agreement pass (None: 360, 0: skip).
    integer_io: int8 input/outputs (``int8`` only).
    gelu: "tanh" or "exact".
    seed: initialisation seed.
    overrides: model field overrides for create_model (e.g. narrow test models).
    serving: an image-input spec (default: classification).
    int8_policy: which ops of an int8 export stay float.
    variables: the model's variables in place of a random init, e.g. PyTorch
      weights ported with the family's ``convert_torch_state_dict`` (the peer
      benchmark); their shapes must be the model's.

  Returns:
    An :class:`~vit_edge.export.validate.ExportReport`.

  Example::

      export_from_registry("edgevit_xxs", "edgevit_xxs.tflite", image_size=224)
  """
  _check_common(quantize, gelu, num_calibration_samples, num_parity_samples,
                max_eval_examples)
  if calibration not in ("digits", "random"):
    raise ValueError(f"calibration={calibration!r}; expected 'digits' or 'random'.")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_edge import input_pipeline  # pylint: disable=g-import-not-at-top
  from vit_edge import models  # pylint: disable=g-import-not-at-top

  info = models.get_model_info(name)
  size = int(image_size or info.image_size)
  models.check_image_size(name, size)
  overrides = dict(overrides or {})
  model = models.create_model_at_size(name, size, num_classes=num_classes, **overrides)
  given_variables = variables is not None
  if variables is None:
    variables = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))
  else:
    _check_variable_shapes(model, size, variables)
  if serving is None and info.family == "segmentation":
    serving = serving_lib.dense(size)
  crop_pct, interpolation = input_pipeline.DEFAULT_CROP_PCT, "bilinear"
  eval_batches, representative = None, None
  if calibration == "digits":
    config = data.digits_config(size, crop_pct, interpolation)
    eval_batches = input_pipeline.create_eval_iterator(
        config, mean=info.mean, std=info.std, local_batch_size=64)
    parity = data.first_images(eval_batches, num_parity_samples)
    if quantize == "int8":
      representative = data.representative_from_config(
          config, info.mean, info.std, num_calibration_samples)
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
      "source": {"random_init_seed": None if given_variables else seed,
                 "given_variables": given_variables, "overrides": {
          k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}},
  }
  return export(model, variables, out, metadata=metadata, quantize=quantize,
                parity_images=parity, representative_data=representative,
                eval_batches=eval_batches,
                max_eval_examples=max_eval_examples, has_labels=False,
                integer_io=integer_io, gelu=gelu, serving=serving,
                int8_policy=int8_policy)
