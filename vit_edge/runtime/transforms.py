"""The eval transform of vit_edge.input_pipeline, with Pillow and numpy only.

Matches ``input_pipeline._eval_preprocess`` then ``_normalize``: the shorter side
is resized to ``floor(image_size / crop_pct)`` (the longer side keeps the aspect
ratio, rounded), with antialiasing, then a centred ``image_size`` square is cut,
rounded to 8-bit levels, scaled to [0, 1] and normalised with the model's mean
and std. Resizing runs on float channels (Pillow mode "F"), as TensorFlow's
``tf.image.resize(..., antialias=True)`` does, so the two agree to about one
8-bit level.

Example::

    x = preprocess(Image.open("cat.jpg"), image_size=224, mean=(0.485, 0.456,
                   0.406), std=(0.229, 0.224, 0.225))  # float32 [224, 224, 3]
"""

from __future__ import annotations

import math
import os
from typing import Sequence, Union

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "area": Image.Resampling.BOX,
    "lanczos3": Image.Resampling.LANCZOS,
    # Pillow has only the 3-lobe Lanczos; the difference is a fraction of a level.
    "lanczos5": Image.Resampling.LANCZOS,
}


class ImageReadError(ValueError):
  """An image file that cannot be opened or decoded."""


def load_image(image: ImageLike) -> Image.Image:
  """An RGB PIL image from a path, a PIL image or a uint8 [H, W(, C)] array.

  Grey and palette images become RGB by repeating the channel, RGBA drops alpha,
  as the training pipeline does.

  Raises:
    FileNotFoundError: a path that does not exist.
    ImageReadError: a file Pillow cannot decode, or an array of a bad shape.

  Example::

      rgb = load_image("photo.jpg")
  """
  if isinstance(image, Image.Image):
    pil = image
  elif isinstance(image, np.ndarray):
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
      raise ImageReadError(f"Image array of shape {image.shape}; expected uint8 "
                           "[H, W], [H, W, 1], [H, W, 3] or [H, W, 4].")
    pil = Image.fromarray(np.asarray(image, np.uint8))
  else:
    path = os.fspath(image)
    if not os.path.exists(path):
      raise FileNotFoundError(f"Image file {path!r} does not exist; pass the path of "
                              "a JPEG/PNG/BMP/GIF image.")
    try:
      pil = Image.open(path)
      pil.load()
    except (UnidentifiedImageError, OSError) as e:
      raise ImageReadError(
          f"Cannot read {path!r} as an image ({e}). Pass a JPEG, PNG, BMP or GIF "
          "file.") from e
  return pil.convert("RGB")


def resize_and_center_crop(image: Image.Image, image_size: int, crop_pct: float,
                           interpolation: str = "bilinear") -> np.ndarray:
  """timm's eval crop on a PIL image; returns float32 [S, S, 3] in 0..255 levels.

  Example::

      crop = resize_and_center_crop(load_image("a.png"), 224, 0.875)
  """
  if interpolation not in _RESAMPLE:
    raise ValueError(f"interpolation={interpolation!r}; expected one of "
                     f"{sorted(_RESAMPLE)}.")
  if not 0 < crop_pct <= 1:
    raise ValueError(f"crop_pct={crop_pct} must be in (0, 1], e.g. 0.875.")
  scale_size = math.floor(image_size / crop_pct)
  width, height = image.size
  shorter = min(width, height)
  # Round half to even, as tf.round in the training pipeline.
  new_h = max(int(np.round(height * scale_size / shorter)), image_size)
  new_w = max(int(np.round(width * scale_size / shorter)), image_size)
  resample = _RESAMPLE[interpolation]
  channels = [Image.fromarray(np.asarray(c, np.float32), mode="F").resize(
      (new_w, new_h), resample) for c in image.split()]
  resized = np.stack([np.asarray(c, np.float32) for c in channels], axis=-1)
  resized = np.clip(resized, 0.0, 255.0)
  top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
  return resized[top:top + image_size, left:left + image_size]


def preprocess(image: ImageLike, image_size: int, mean: Sequence[float],
               std: Sequence[float], crop_pct: float = 0.875,
               interpolation: str = "bilinear") -> np.ndarray:
  """An image as the model's float32 [S, S, 3] input (see the module docstring).

  Args:
    image: a path, PIL image or uint8 array.
    image_size: the model's input side.
    mean: per-channel mean of [0, 1] pixels.
    std: per-channel std of [0, 1] pixels.
    crop_pct: the eval crop fraction (shorter side resized to size / crop_pct).
    interpolation: "bilinear", "bicubic", "nearest", "area" or "lanczos3".

  Returns:
    float32 [image_size, image_size, 3].

  Example::

      x = preprocess("digit.png", 32, (0.5,) * 3, (0.5,) * 3)
  """
  crop = resize_and_center_crop(load_image(image), image_size, crop_pct,
                                interpolation)
  levels = np.round(crop)  # The pipeline stores 8-bit crops before normalising.
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return ((levels / 255.0 - mean) / std).astype(np.float32)
