"""Segmentation data: image + class-id mask pairs, joint augmentation, batches.

Data sets (``config.dataset``):

* ``"seg:embedded"`` (the default; offline, small): a **semi-synthetic** set built
  from real Fashion-MNIST garments (Debian's IDX files, `FASHION_MNIST_DIR`; when
  they are missing, scikit-learn's real digits, named so in the labels) pasted
  onto smooth random colour backgrounds. Each garment is scaled, tinted and
  placed at a random position; its pixels (grey level above `_INK_THRESHOLD`) are
  labelled with its class, everything else "background" (class 0). Garments may
  overlap; the one pasted last wins. Train 2,000 / test 500 images of
  `EMBEDDED_SIZE` px, generated from a fixed seed in a few seconds.
* ``"seg:folder"``: ``config.data_dir`` holds ``images/`` and ``masks/`` (one mask
  per image, same file stem, a single-channel PNG of class ids; pixel value
  ``config.ignore_index``, 255 by default, is ignored), or one such pair of
  folders per split (``<data_dir>/train/images``, ``<data_dir>/val/masks``).
  Class names come from ``<data_dir>/classes.txt`` (one per line), else
  ``config.num_classes`` gives ``class0..classN-1``. This is how LPCVC 2023 and
  most users' data come.
* ``"seg:oxford_iiit_pet"``: TFDS ``oxford_iiit_pet`` (prepared by the user with
  ``tfds build oxford_iiit_pet --data_dir=DIR``; never downloaded here); the
  trimap becomes classes pet / background / border.

Splits: ``"train"``, ``"test"`` (embedded, pets) or the split folder names, with
slices ``"train[:90%]"`` / ``"train[100:]"``; a folder without split subfolders
has one split ``"train"``.

Training batches: ``{"image": float32 [b, S, S, 3] normalised, "label": int32
[b, S, S]}``; each example gets a random scale (``config.aug.scale_range``, the
image's shorter side becomes ``S * scale``), a random ``S x S`` crop (padded with
zeros / the ignore index when smaller), a horizontal flip (``aug.hflip``) and,
on the image only, a colour jitter (``aug.color_jitter``: brightness, contrast
and saturation factors in ``1 +- jitter``). Images resize bilinearly, masks by
nearest neighbour, both with the same geometry. Eval batches resize image and
mask to ``S x S`` (no randomness) and add ``"mask": float32 [b]`` (0 for padding).

Determinism: as the classification pipeline, step S's batch covers stream
positions ``[S b, (S + 1) b)`` of a per-epoch seeded permutation, and each
example's augmentation is keyed by ``(seed, global position)``, so a resumed run
sees exactly the batches it would have seen.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import re
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

PREFIX = "seg:"
DEFAULT_IGNORE_INDEX = 255
EMBEDDED_SIZE = 64
EMBEDDED_SPLITS = {"train": 2000, "test": 500}
_EMBEDDED_SEED = 20230913
_INK_THRESHOLD = 60  # Grey levels (0..255) above which a garment pixel is labelled.
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_SHOWN_BAD = 3
PET_LABELS = ("pet", "background", "border")


def is_segmentation(dataset: str) -> bool:
  """Whether ``config.dataset`` names a segmentation data set ("seg:...")."""
  return dataset.startswith(PREFIX)


@dataclasses.dataclass(frozen=True)
class SegSource:
  """A segmentation data set: class names and, per split, a count and a loader.

  ``load(split, i)`` returns ``(uint8 [H, W, 3] image, uint8 [H, W] mask)``.
  """
  name: str
  label_names: tuple[str, ...]
  sizes: dict[str, int]
  load: Callable[[str, int], tuple[np.ndarray, np.ndarray]]
  ignore_index: int = DEFAULT_IGNORE_INDEX


# ----------------------------------------------------------------------------------
# The embedded semi-synthetic set.


def _garments() -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[str, ...]]:
  """Real object images {"train", "test"}: (uint8 [N, h, w], int [N]) and names."""
  from vit_edge import input_pipeline  # pylint: disable=g-import-not-at-top
  try:
    arrays = input_pipeline.fashion_mnist_arrays()
    names = input_pipeline.FASHION_MNIST_LABELS
  except (FileNotFoundError, OSError, ValueError):
    arrays = input_pipeline.digits_arrays()
    names = tuple(f"digit {d}" for d in range(10))
    # Digits' 8x8 grey levels 0..16 scaled to 0..255 by the pipeline's loader.
  return {k: (x[..., 0], y) for k, (x, y) in arrays.items()}, tuple(names)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """A smooth random colour field: a bilinear upsampling of a 4x4 colour grid."""
  grid = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
  field = np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR),
                     np.float32)
  return field + rng.normal(0, 6, field.shape).astype(np.float32)


def make_embedded_example(objects: np.ndarray, labels: np.ndarray,
                          rng: np.random.Generator, size: int = EMBEDDED_SIZE
                          ) -> tuple[np.ndarray, np.ndarray]:
  """One semi-synthetic (image, mask): 1-3 real objects on a random background.

  `objects` are grey object images [N, h, w] and `labels` their classes; mask
  class ``label + 1`` marks an object's pixels, 0 the background.
  """
  image = _background(rng, size)
  mask = np.zeros((size, size), np.uint8)
  for _ in range(rng.integers(1, 4)):
    k = rng.integers(len(objects))
    side = int(rng.integers(size * 3 // 8, size * 3 // 4))
    grey = np.asarray(Image.fromarray(objects[k]).resize((side, side), Image.BILINEAR))
    y, x = rng.integers(0, size - side + 1, 2)
    ink = grey > _INK_THRESHOLD
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    alpha = (grey.astype(np.float32) / 255.0)[..., None]
    patch = image[y:y + side, x:x + side]
    patch[:] = np.where(ink[..., None], alpha * colour + (1 - alpha) * (255 - colour),
                        patch)
    mask[y:y + side, x:x + side][ink] = labels[k] + 1
  return np.clip(image, 0, 255).astype(np.uint8), mask


@functools.lru_cache(maxsize=1)
def embedded_arrays() -> tuple[dict[str, tuple[np.ndarray, np.ndarray]],
                               tuple[str, ...]]:
  """{"train", "test"}: (uint8 [N, 64, 64, 3] images, uint8 [N, 64, 64] masks), names.

  Deterministic: the same arrays on every call and machine (fixed seed).
  Example::

      splits, names = embedded_arrays()
      splits["train"][0].shape, names[0]  # ((2000, 64, 64, 3), 'background')
  """
  garments, names = _garments()
  out = {}
  for i, (split, count) in enumerate(EMBEDDED_SPLITS.items()):
    objects, labels = garments[split]
    rng = np.random.default_rng((_EMBEDDED_SEED, i))
    examples = [make_embedded_example(objects, labels, rng) for _ in range(count)]
    out[split] = (np.stack([e[0] for e in examples]), np.stack([e[1] for e in examples]))
  return out, ("background",) + names


def _embedded_source() -> SegSource:
  splits, names = embedded_arrays()
  return SegSource("seg:embedded", names, {k: len(v[0]) for k, v in splits.items()},
                   lambda split, i: (splits[split][0][i], splits[split][1][i]))


# ----------------------------------------------------------------------------------
# Image + mask folders.


class MaskFolderError(ValueError):
  """A bad image/mask folder; the message names the files and the fix."""


def _list_images(folder: str) -> dict[str, str]:
  return {os.path.splitext(f)[0]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
          if f.lower().endswith(_IMAGE_SUFFIXES)}


def _shown(items: Sequence[str]) -> str:
  shown = ", ".join(items[:_SHOWN_BAD])
  return shown + (f" and {len(items) - _SHOWN_BAD} more" if len(items) > _SHOWN_BAD else "")


def pair_folder(split_dir: str) -> list[tuple[str, str]]:
  """(image path, mask path) pairs of ``split_dir/images`` and ``split_dir/masks``.

  Raises MaskFolderError naming images without a mask (and masks without an image).
  """
  image_dir, mask_dir = os.path.join(split_dir, "images"), os.path.join(split_dir, "masks")
  for d in (image_dir, mask_dir):
    if not os.path.isdir(d):
      raise MaskFolderError(
          f"{d} is not a directory. A segmentation folder holds images/ and masks/ "
          "(one class-id PNG per image, same file stem), e.g. images/0001.jpg and "
          "masks/0001.png; point config.data_dir at their parent.")
  images, masks = _list_images(image_dir), _list_images(mask_dir)
  if not images:
    raise MaskFolderError(f"{image_dir} holds no images ({', '.join(_IMAGE_SUFFIXES)}).")
  missing = [images[s] for s in images if s not in masks]
  if missing:
    raise MaskFolderError(
        f"{len(missing)} image(s) have no mask in {mask_dir}: {_shown(missing)}. Add "
        "a mask with the same file stem (e.g. masks/<stem>.png) or remove the image.")
  orphans = [masks[s] for s in masks if s not in images]
  if orphans:
    raise MaskFolderError(
        f"{len(orphans)} mask(s) have no image in {image_dir}: {_shown(orphans)}. "
        "Add the image with the same file stem or remove the mask.")
  return [(images[s], masks[s]) for s in sorted(images)]


def load_pair(image_path: str, mask_path: str, num_classes: int,
              ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
  """A checked (uint8 RGB image, uint8 class-id mask) pair from two files."""
  with Image.open(image_path) as im:
    image = np.asarray(im.convert("RGB"))
  with Image.open(mask_path) as m:
    if m.mode not in ("L", "P", "I", "I;16", "1"):
      raise MaskFolderError(
          f"Mask {mask_path} has mode {m.mode!r} (colour); expected one channel of "
          "class ids (mode 'L' or 'P'). Save the class ids as a grey PNG, e.g. "
          "Image.fromarray(ids.astype(np.uint8)).save(path).")
    mask = np.asarray(m)
  if mask.shape != image.shape[:2]:
    raise MaskFolderError(
        f"Mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
        f"{image_path} is {image.shape[1]}x{image.shape[0]} (width x height); a mask "
        "must match its image pixel for pixel. Resize the mask with nearest-neighbour "
        "interpolation (Image.NEAREST) to the image size.")
  bad = (mask >= num_classes) & (mask != ignore_index)
  if bad.any():
    raise MaskFolderError(
        f"Mask {mask_path} has class id(s) {sorted(np.unique(mask[bad]).tolist())[:8]} "
        f"but the data set has {num_classes} classes (ids 0..{num_classes - 1}; "
        f"{ignore_index} = ignore). Fix the mask, list every class in classes.txt, "
        "or set config.num_classes / config.ignore_index.")
  return image, mask.astype(np.uint8)


def _folder_source(data_dir: Optional[str], num_classes: int, ignore_index: int
                   ) -> SegSource:
  if not data_dir or not os.path.isdir(data_dir):
    raise MaskFolderError(
        f"config.data_dir={data_dir!r} is not a directory; seg:folder needs one with "
        "images/ and masks/ (or train/images, train/masks, ...).")
  if os.path.isdir(os.path.join(data_dir, "images")):
    splits = {"train": pair_folder(data_dir)}
  else:
    splits = {d: pair_folder(os.path.join(data_dir, d)) for d in sorted(os.listdir(data_dir))
              if os.path.isdir(os.path.join(data_dir, d, "images"))}
    if not splits:
      pair_folder(data_dir)  # Raises with the layout it expects.
  names_file = os.path.join(data_dir, "classes.txt")
  if os.path.exists(names_file):
    with open(names_file) as f:
      names = tuple(line.strip() for line in f if line.strip())
  elif num_classes > 0:
    names = tuple(f"class{i}" for i in range(num_classes))
  else:
    raise MaskFolderError(
        f"{data_dir} has no classes.txt and config.num_classes is not set; write the "
        "class names one per line to classes.txt (line i = class id i) or set "
        "--config.num_classes.")
  if num_classes > 0 and num_classes != len(names):
    raise MaskFolderError(f"config.num_classes={num_classes} but {names_file} lists "
                          f"{len(names)} classes; make them agree.")
  return SegSource("seg:folder", names, {k: len(v) for k, v in splits.items()},
                   lambda split, i: load_pair(*splits[split][i], len(names), ignore_index),
                   ignore_index)


# ----------------------------------------------------------------------------------
# TFDS oxford_iiit_pet (prepared by the user).


def _pets_source(data_dir: Optional[str]) -> SegSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from vit_edge import input_pipeline  # pylint: disable=g-import-not-at-top
  builder = tfds.builder("oxford_iiit_pet", data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(input_pipeline._not_prepared_message(builder))  # pylint: disable=protected-access
  cache: dict[str, list[tuple[bytes, bytes]]] = {}

  def encoded(split):
    if split not in cache:  # Encoded bytes only: decoded on load.
      ds = builder.as_dataset(split=split, decoders={
          "image": tfds.decode.SkipDecoding(),
          "segmentation_mask": tfds.decode.SkipDecoding()})
      cache[split] = [(ex["image"], ex["segmentation_mask"])
                      for ex in tfds.as_numpy(ds)]
    return cache[split]

  def load(split, i):
    import io  # pylint: disable=g-import-not-at-top
    image_bytes, mask_bytes = encoded(split)[i]
    image = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"))
    trimap = np.asarray(Image.open(io.BytesIO(mask_bytes)))
    if trimap.ndim == 3:
      trimap = trimap[..., 0]
    return image, (trimap.astype(np.int32) - 1).astype(np.uint8)  # 1,2,3 -> 0,1,2

  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  return SegSource("seg:oxford_iiit_pet", PET_LABELS, sizes, load)


def get_source(config) -> SegSource:
  """The `SegSource` of ``config.dataset`` ("seg:embedded", "seg:folder", ...)."""
  name = config.dataset.removeprefix(PREFIX)
  ignore_index = int(config.get("ignore_index", DEFAULT_IGNORE_INDEX))
  if name == "embedded":
    return _embedded_source()
  if name == "folder":
    return _folder_source(config.get("data_dir"), int(config.get("num_classes", 0) or 0),
                          ignore_index)
  if name == "oxford_iiit_pet":
    return _pets_source(config.get("data_dir"))
  raise ValueError(f"Unknown segmentation data set config.dataset={config.dataset!r}; "
                   "expected 'seg:embedded', 'seg:folder' or 'seg:oxford_iiit_pet'.")


# ----------------------------------------------------------------------------------
# Splits.

_SPLIT = re.compile(r"^(\w+)(?:\[(-?\d*%?):(-?\d*%?)\])?$")


def split_indices(split: str, sizes: dict[str, int], field: str = "split") -> np.ndarray:
  """Example indices of ``"train"``, ``"train[:90%]"`` or ``"test[100:]"``."""
  match = _SPLIT.match(split.replace(" ", ""))
  if not match or match.group(1) not in sizes:
    raise ValueError(f"config.{field}={split!r} is not a split of this data set; "
                     f"available: {sorted(sizes)}, sliced like 'train[:90%]'.")
  n = sizes[match.group(1)]

  def bound(text, default):
    if not text:
      return default
    value = int(text.rstrip("%"))
    return round(value * n / 100) if text.endswith("%") else value

  indices = np.arange(n)[bound(match.group(2), 0):bound(match.group(3), n)]
  if not len(indices):
    raise ValueError(f"config.{field}={split!r} selects no examples (of {n}).")
  return indices


# ----------------------------------------------------------------------------------
# Joint augmentation.


def _resize_pair(image: np.ndarray, mask: np.ndarray, height: int, width: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Image bilinear, mask nearest-neighbour, to the same (height, width)."""
  if image.shape[:2] == (height, width):
    return image, mask
  image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
  mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST))
  return image, mask


def augment_pair(image: np.ndarray, mask: np.ndarray, size: int,
                 rng: np.random.Generator, *, scale_range=(0.5, 2.0), hflip=True,
                 color_jitter: float = 0.2, ignore_index: int = DEFAULT_IGNORE_INDEX
                 ) -> tuple[np.ndarray, np.ndarray]:
  """One jointly augmented ``size x size`` (uint8 image, uint8 mask).

  Scale (the shorter side becomes ``size * U(scale_range)``), a random crop (padded
  with 0 / `ignore_index`), a flip: the same geometry for both, the image resized
  bilinearly and the mask by nearest neighbour. Colour jitter changes the image only.

  Example::

      image, mask = augment_pair(image, mask, 64, np.random.default_rng(0))
  """
  h, w = mask.shape
  scale = rng.uniform(*scale_range) * size / min(h, w)
  new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
  image, mask = _resize_pair(image, mask, new_h, new_w)
  pad_h, pad_w = max(0, size - new_h), max(0, size - new_w)
  if pad_h or pad_w:
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
    mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=ignore_index)
  y = rng.integers(0, mask.shape[0] - size + 1)
  x = rng.integers(0, mask.shape[1] - size + 1)
  image, mask = image[y:y + size, x:x + size], mask[y:y + size, x:x + size]
  if hflip and rng.uniform() < 0.5:
    image, mask = image[:, ::-1], mask[:, ::-1]
  if color_jitter > 0:
    pixels = image.astype(np.float32)
    brightness, contrast, saturation = rng.uniform(1 - color_jitter, 1 + color_jitter, 3)
    pixels = pixels * brightness
    pixels = (pixels - pixels.mean()) * contrast + pixels.mean()
    grey = pixels.mean(axis=-1, keepdims=True)
    pixels = (pixels - grey) * saturation + grey
    image = np.clip(pixels, 0, 255).astype(np.uint8)
  return np.ascontiguousarray(image), np.ascontiguousarray(mask)


# ----------------------------------------------------------------------------------
# Iterators.


def _normalize(images: np.ndarray, mean, std) -> np.ndarray:
  return ((images.astype(np.float32) / 255.0 - np.asarray(mean, np.float32))
          / np.asarray(std, np.float32))


def _aug_options(config) -> dict[str, Any]:
  aug = config.get("aug") or {}
  return {"scale_range": tuple(aug.get("scale_range", (0.5, 2.0))),
          "hflip": bool(aug.get("hflip", True)),
          "color_jitter": float(aug.get("color_jitter", 0.2))}


def _pool() -> concurrent.futures.ThreadPoolExecutor:
  # PIL decodes and resizes outside the GIL.
  return concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))


def create_train_iterator(config, *, mean, std, local_batch_size: int,
                          start_step: int = 0, process_index: int = 0,
                          process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Infinite augmented batches ``{"image", "label" [b, S, S]}`` for this process."""
  source = get_source(config)
  indices = split_indices(config.train_split, source.sizes, "train_split")
  split = _SPLIT.match(config.train_split.replace(" ", "")).group(1)
  indices = indices[process_index::process_count]
  size, seed = int(config.image_size), int(config.seed)
  options = _aug_options(config)
  pool = _pool()

  @functools.lru_cache(maxsize=2)
  def epoch_order(epoch):
    return np.random.default_rng((seed, 0, epoch)).permutation(len(indices))

  def example(position):
    epoch, offset = divmod(position, len(indices))
    order = epoch_order(epoch)
    image, mask = source.load(split, int(indices[order[offset]]))
    rng = np.random.default_rng((seed, 1, position * process_count + process_index))
    return augment_pair(image, mask, size, rng, ignore_index=source.ignore_index,
                        **options)

  step = start_step
  while True:
    positions = range(step * local_batch_size, (step + 1) * local_batch_size)
    pairs = list(pool.map(example, positions))
    yield {"image": _normalize(np.stack([p[0] for p in pairs]), mean, std),
           "label": np.stack([p[1] for p in pairs]).astype(np.int32)}
    step += 1


class EvalBatches:
  """The eval split as padded batches; each `iter` is a new pass (as EvalIterable)."""

  def __init__(self, source: SegSource, split: str, indices: np.ndarray, size: int,
               mean, std, local_batch_size: int, num_batches: int):
    self.source, self.split, self.indices = source, split, indices
    self.size, self.mean, self.std = size, mean, std
    self.local_batch_size, self.num_batches = local_batch_size, num_batches
    self.num_examples = len(indices)

  def _example(self, i):
    image, mask = self.source.load(self.split, int(i))
    return _resize_pair(image, mask, self.size, self.size)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    b, s = self.local_batch_size, self.size
    with _pool() as pool:
      for start in range(0, self.num_batches * b, b):
        chunk = self.indices[start:start + b]
        pairs = list(pool.map(self._example, chunk))
        images = np.zeros((b, s, s, 3), np.uint8)
        labels = np.full((b, s, s), self.source.ignore_index, np.int32)
        weights = np.zeros((b,), np.float32)
        for j, (image, mask) in enumerate(pairs):
          images[j], labels[j], weights[j] = image, mask, 1.0
        yield {"image": _normalize(images, self.mean, self.std), "label": labels,
               "mask": weights}

  def __len__(self) -> int:
    return self.num_batches


def create_eval_iterator(config, *, mean, std, local_batch_size: int,
                         process_index: int = 0, process_count: int = 1) -> EvalBatches:
  """Eval batches ``{"image", "label" [b, S, S], "mask" [b]}`` of config.eval_split."""
  source = get_source(config)
  indices = split_indices(config.eval_split, source.sizes, "eval_split")
  split = _SPLIT.match(config.eval_split.replace(" ", "")).group(1)
  shares = [indices[p::process_count] for p in range(process_count)]
  num_batches = -(-max(len(s) for s in shares) // local_batch_size)
  return EvalBatches(source, split, shares[process_index], int(config.image_size),
                     mean, std, local_batch_size, num_batches)


def get_info(config):
  """`vit_edge.input_pipeline.DatasetInfo` of a segmentation data set."""
  from vit_edge import input_pipeline  # pylint: disable=g-import-not-at-top
  source = get_source(config)
  return input_pipeline.DatasetInfo(
      name=config.dataset, num_classes=len(source.label_names),
      num_train_examples=len(split_indices(config.train_split, source.sizes,
                                           "train_split")),
      num_eval_examples=len(split_indices(config.eval_split, source.sizes,
                                          "eval_split")),
      label_names=source.label_names)
