"""Images for calibration, parity and evaluation, and the configs that produce them."""

from __future__ import annotations

from typing import Optional

import numpy as np

from vit_edge import rundir


def calibration_config(config, num_samples: int):
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
    calib.aug.scale_range = (1.0, 1.0)  # Segmentation: no random scale / colour.
    calib.aug.color_jitter = 0.0
    calib.shuffle_buffer = max(int(calib.get("shuffle_buffer", 0) or 0), num_samples)
    calib.cache = False
  return calib


def representative_from_config(config, mean, std, num_samples: int):
  """A callable yielding `num_samples` float32 [1, S, S, C] calibration images."""
  from vit_edge import input_pipeline  # pylint: disable=g-import-not-at-top
  calib = calibration_config(config, num_samples)
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


def first_images(eval_iterable, count: int) -> np.ndarray:
  """The first `count` real (unmasked) images of an eval iterator."""
  images = []
  for batch in eval_iterable:
    keep = np.asarray(batch["mask"]) > 0
    images.extend(batch["image"][keep])
    if len(images) >= count:
      break
  if not images:
    raise ValueError("The eval split yielded no images for the parity check.")
  return np.stack(images[:count]).astype(np.float32)


def digits_config(image_size: int, crop_pct: float, interpolation: str):
  """The embedded digits data set at `image_size` with the eval transform."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(
      dataset="digits", data_dir=None, train_split="train", eval_split="test",
      image_size=image_size, batch_size=32, eval_batch_size=64, shuffle_buffer=1437,
      seed=0, cache=False,
      aug=dict(random_resized_crop=False, hflip=False, randaugment="",
               random_erasing=0.0, crop_pct=crop_pct, interpolation=interpolation)))


def check_count(name: str, value: Optional[int], minimum: int) -> None:
  """Raises ValueError unless `value` is None or at least `minimum`."""
  if value is not None and value < minimum:
    raise ValueError(f"{name}={value} must be >= {minimum}.")


def resized_config(config, image_size: int):
  """`config` at another input resolution, for models that allow one."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vit_edge import models  # pylint: disable=g-import-not-at-top
  info = models.get_model_info(config.model)
  if info.fixed_resolution:
    raise ValueError(
        f"image_size={image_size}: {config.model} was trained at "
        f"{config.image_size} and its position embedding fixes that resolution. "
        f"Export at {config.image_size} (omit --image_size).")
  models.check_image_size(config.model, image_size)
  resized = ml_collections.ConfigDict(config.to_dict())
  with resized.unlocked():
    resized.image_size = image_size
  return resized


def checkpoint_step(workdir: str, step: Optional[int]) -> Optional[int]:
  """The step that load_trained_model restored (it does not return it)."""
  return step if step is not None else rundir.newest_step(workdir)


def float32_config(config):
  """The training config with float32 compute: the export reference is float32."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  copy = ml_collections.ConfigDict(config.to_dict())
  with copy.unlocked():
    copy.dtype = "float32"
  return copy
