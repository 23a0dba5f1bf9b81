"""tf.data input pipeline: deterministic, resumable, sharded per process.

Data sets (``config.dataset``):

* ``"digits"``: scikit-learn's real 8x8 handwritten digits (1797 images, 10 classes),
  shipped with scikit-learn so nothing is downloaded. A fixed seeded stratified
  split gives ``"train"`` (1437) and ``"test"`` (360). Pixels 0..16 are scaled to
  0..255 and the grey channel is repeated to RGB.
* ``"fashion_mnist"``: Fashion-MNIST (60,000 train / 10,000 test, 28x28 grey,
  10 classes) from its original IDX files (gzipped or not), read from
  ``config.data_dir`` when given, else ``/usr/share/datasets/fashion-mnist/`` where
  Debian's package puts them (``sudo apt-get install dataset-fashion-mnist``). The
  grey channel is repeated to RGB. TFDS has a data set of the same name: this name
  always means the IDX files; ``"tfds:fashion_mnist"`` reads TFDS's copy instead.
* ``"imagefolder"``: ``config.data_dir`` holds one folder per split, each with one
  subfolder per class (``<data_dir>/train/cat/001.png``); classes are the sorted
  union of the class folder names over all splits.
* any TFDS name (``"cifar100"``, ``"imagenet2012"``, ...), read from
  ``config.data_dir`` (or TFDS's default directory when None). A ``"tfds:"``
  prefix (``"tfds:fashion_mnist"``) forces TFDS where a built-in name would win. It must be prepared
  beforehand (``tfds build NAME --data_dir=DIR``); nothing is ever downloaded here.

Config fields (an ``ml_collections.ConfigDict``):

* ``dataset`` (str): as above.
* ``data_dir`` (None or str): image folder root or TFDS data directory.
* ``train_split``, ``eval_split`` (str): TFDS split strings, e.g. ``"train[:90%]"``,
  ``"train[90%:]"``, ``"test"``; the same syntax works for digits and imagefolder.
* ``image_size`` (int): side of the square model input.
* ``batch_size``, ``eval_batch_size`` (int): global batch sizes; the trainer passes
  each process's share as ``local_batch_size``.
* ``shuffle_buffer`` (int): examples in the shuffle buffer (per process).
* ``seed`` (int): drives the shuffle order and every augmentation.
* ``bad_images`` (str, optional, default ``"error"``): image folders only; files
  that will not decode and class folders without images stop the run with their
  names (``"error"``) or are left out with one warning (``"skip"``).
* ``cache`` (bool): keep the raw (still encoded) training records and the
  preprocessed uint8 eval images in memory after the first pass.
* ``aug`` (ConfigDict):

  - ``random_resized_crop`` (bool), ``crop_scale`` (tuple, area fractions),
    ``crop_ratio`` (tuple, aspect ratios): Inception-style crop; when off, the
    image is resized (shorter side) to ``image_size`` and centre cropped.
  - ``hflip`` (bool): random horizontal flip.
  - ``randaugment`` (str): timm syntax, ``"rand-m9-mstd0.5"``; ``""`` is off.
  - ``random_erasing`` (float): probability of erasing one box; 0 is off.
  - ``mixup_alpha``, ``cutmix_alpha``, ``mixup_prob``, ``mixup_switch_prob``:
    read by the trainer for `augment.mixup_cutmix` in the jitted step.
  - ``crop_pct`` (float, optional, default 0.875): eval resizes the shorter side
    to ``image_size / crop_pct`` and centre crops ``image_size``.
  - ``interpolation`` (str, optional, default ``"bilinear"``): resize method,
    e.g. ``"bicubic"`` as DeiT.

Determinism: each process sees its own contiguous shard of the split
(`tfds.even_splits`), reads it in a fixed order, shuffles each epoch with a seed
derived from ``(seed, epoch)``, and concatenates the epochs into one stream. The
batch of step S covers stream positions ``[S * b, (S + 1) * b)``, so resuming jumps
to that epoch and skips the offset on the still-encoded records, before any
decoding. Each example's augmentation is keyed by ``(seed, global example index)``
through stateless ops, so a resumed run yields exactly the same batches.

Example::

    info = get_info(config)
    train_iter = create_train_iterator(
        config, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        local_batch_size=config.batch_size // jax.process_count(),
        start_step=step, process_index=jax.process_index(),
        process_count=jax.process_count())
    batch = next(train_iter)  # {"image": float32 [b, H, W, 3], "label": int32 [b]}
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_edge import augment
from vit_edge import digits as digits_lib
from vit_edge.segmentation import data as seg_data

DEFAULT_CROP_PCT = 0.875
DIGITS_NUM_TEST = digits_lib.NUM_TEST
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# split -> (images, labels) IDX file names, as the original distribution names them.
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_MNIST_HOW = (
    "Install Debian's package (sudo apt-get install dataset-fashion-mnist), or set "
    "--config.data_dir=DIR to a folder holding the four IDX files "
    "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte, each optionally .gz), or with a network use TFDS's copy: "
    "--config.dataset=tfds:fashion_mnist.")
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
# Domain tags folded into the seed, so shuffle keys never coincide with the
# augmentation keys of an example with the same number.
_SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1
# "tfds:NAME" reads TFDS's NAME even where NAME is a built-in source here.
_TFDS_PREFIX = "tfds:"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a data set before reading it.

  Attributes:
    name: ``config.dataset``.
    num_classes: number of classes (label ids are 0..num_classes-1).
    num_train_examples: examples in ``config.train_split``, over all processes.
    num_eval_examples: examples in ``config.eval_split``, over all processes.
    label_names: class names, indexed by label id.
  """
  name: str
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  label_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Source:
  """A data set as the pipeline sees it.

  `read(split, train, seed)` gives the examples of a (sub)split in a fixed order as
  ``{"image": raw, "label": int32}``; `fetch(raw)`, when set, loads the encoded
  bytes (an image folder's raw value is a file path); `decode(raw)` turns the
  (fetched) raw image into a uint8 [H, W, 3] tensor.
  """
  name: str
  label_names: tuple[str, ...]
  split_infos: Mapping[str, Any]
  read: Callable[[Any, bool, int], tf.data.Dataset]
  decode: Callable[[tf.Tensor], tf.Tensor]
  fetch: Optional[Callable[[tf.Tensor], tf.Tensor]] = None
  # A filtered view (class subset) counts its (sub)splits itself: their example
  # counts are no longer the parent's positions.
  count: Optional[Callable[[Any], int]] = None

  def fetched(self, ds: tf.data.Dataset) -> tf.data.Dataset:
    if self.fetch is None:
      return ds
    return ds.map(lambda ex: {"image": self.fetch(ex["image"]), "label": ex["label"]},
                  num_parallel_calls=tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------------
# Sources.


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
  channels = image.shape[-1]
  if channels == 3:
    return image
  if channels == 1:
    return tf.tile(image, [1, 1, 3])
  # Tiling to >= 3 channels then keeping 3 maps grey -> RGB, RGB -> RGB and
  # RGBA -> RGB alike when the channel count is only known at run time.
  return tf.tile(image, [1, 1, 3])[..., :3]


def _split_infos(sizes: Mapping[str, int]) -> dict[str, tfds.core.SplitInfo]:
  return {name: tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0)
          for name, n in sizes.items()}


def _in_memory_source(name: str, label_names: Sequence[str],
                      splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
                      decode: Callable[[tf.Tensor], tf.Tensor],
                      fetch: Optional[Callable[[tf.Tensor], tf.Tensor]] = None
                      ) -> _Source:
  """A source whose raw images (arrays or file paths) and labels fit in memory."""
  split_infos = _split_infos({k: len(labels) for k, (_, labels) in splits.items()})

  def read(split, train, seed):
    del train, seed  # The order is fixed by the arrays; shuffling happens later.
    raws, labels = [], []
    for instruction in split.to_absolute(split_infos):
      raw, label = splits[instruction.splitname]
      raws.append(raw[instruction.from_:instruction.to])
      labels.append(label[instruction.from_:instruction.to])
    return tf.data.Dataset.from_tensor_slices({
        "image": np.concatenate(raws), "label": np.concatenate(labels)})

  return _Source(name, tuple(label_names), split_infos, read, decode, fetch)


def digits_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """scikit-learn's digits as {"train", "test"}: (uint8 [N, 8, 8, 1], int32 [N]).

  The fixed stratified split (1437 / 360) that the embedded data set serves; see
  `vit_edge.digits.arrays` (TensorFlow-free, for light tools).
  """
  return digits_lib.arrays()


def _digits_source() -> _Source:
  return _in_memory_source("digits", digits_lib.LABEL_NAMES, digits_arrays(),
                           _to_rgb)


def read_idx(path: str, ndim: int) -> np.ndarray:
  """An IDX file (the MNIST format; gzipped when `path` ends in .gz) as uint8 numpy.

  Args:
    path: the file.
    ndim: the expected number of dimensions (3 for images, 1 for labels).

  Raises:
    ValueError: naming the file when it is not an unsigned-byte IDX file of
      `ndim` dimensions or is cut short.

  Example::

    >>> read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz", 1)
    array([9, 2, 1, ..., 8, 1, 5], dtype=uint8)
  """
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  # Magic number: two zero bytes, type 0x08 (unsigned byte), number of dimensions.
  expected_magic = bytes([0, 0, 8, ndim])
  if data[:4] != expected_magic:
    raise ValueError(
        f"{path} is not an unsigned-byte IDX file with {ndim} dimension(s): its "
        f"magic number is {data[:4].hex()}, expected {expected_magic.hex()}. Point "
        "config.data_dir at the original Fashion-MNIST/MNIST IDX files.")
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  header = 4 + 4 * ndim
  if len(data) - header != math.prod(shape):
    raise ValueError(f"{path} declares shape {shape} ({math.prod(shape)} bytes) but "
                     f"holds {len(data) - header} bytes after its header; the file "
                     "is truncated or corrupt. Reinstall or re-download it.")
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _find_idx(directory: str, name: str) -> str:
  for candidate in (f"{name}.gz", name):
    path = os.path.join(directory, candidate)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"Fashion-MNIST file {os.path.join(directory, name)}(.gz) "
                          f"does not exist. {_FASHION_MNIST_HOW}")


@functools.lru_cache(maxsize=2)
def fashion_mnist_arrays(directory: str = FASHION_MNIST_DIR
                         ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Fashion-MNIST as {"train", "test"}: (uint8 [N, 28, 28, 1], int32 [N]).

  Reads the four IDX files in `directory` (gzipped or not). Example::

    >>> train_x, train_y = fashion_mnist_arrays()["train"]
    >>> train_x.shape, FASHION_MNIST_LABELS[train_y[0]]
    ((60000, 28, 28, 1), 'Ankle boot')
  """
  splits = {}
  for split, (images_name, labels_name) in _FASHION_MNIST_FILES.items():
    images_path = _find_idx(directory, images_name)
    labels_path = _find_idx(directory, labels_name)
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels) or labels.max(initial=0) >= len(FASHION_MNIST_LABELS):
      raise ValueError(
          f"{images_path} holds {len(images)} images but {labels_path} holds "
          f"{len(labels)} labels (max {labels.max(initial=0)}); expected equal counts "
          f"and labels below {len(FASHION_MNIST_LABELS)}. Use matching files.")
    splits[split] = (images[..., None], labels.astype(np.int32))
  return splits


def _fashion_mnist_source(data_dir: Optional[str]) -> _Source:
  directory = os.path.abspath(data_dir or FASHION_MNIST_DIR)
  return _in_memory_source("fashion_mnist", FASHION_MNIST_LABELS,
                           fashion_mnist_arrays(directory), _to_rgb)


# What tf.io.decode_image reads (PIL calls multi-picture JPEGs "MPO").
_DECODABLE_FORMATS = ("BMP", "GIF", "JPEG", "MPO", "PNG", "WEBP")
BAD_IMAGES_MODES = ("error", "skip")
_JPEG_END = b"\xff\xd9"
# JPEG end marker search window: files may carry padding after the marker.
_JPEG_TAIL_BYTES = 1024
_SHOWN_BAD_FILES = 3


def _image_problem(path: str) -> Optional[str]:
  """Why `path` will not decode, or None; reads the header, not the pixels.

  Checks: PIL recognises the file; its format is one TensorFlow decodes; PNG chunk
  CRCs (PIL's verify); a JPEG ends with its end-of-image marker (a cut-off JPEG
  fails in TensorFlow, though PIL's verify passes it). About 0.3 ms a local file
  (a full decode is ~3.4 ms): 1000 files take 0.3 s, ImageNet's 1.28M ~6 minutes.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  opener = tf.io.gfile.GFile if "://" in path else open
  try:
    with opener(path, "rb") as f:
      with Image.open(f) as image:
        image_format = image.format
        if image_format not in _DECODABLE_FORMATS:
          return f"{image_format} is not one of {'/'.join(_DECODABLE_FORMATS)}"
        image.verify()
      if image_format in ("JPEG", "MPO"):
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - _JPEG_TAIL_BYTES))
        if _JPEG_END not in f.read():
          return "truncated JPEG (no end-of-image marker)"
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises many types (UnidentifiedImageError, SyntaxError, OSError, ...).
    return f"{type(e).__name__}: {e}".strip().splitlines()[0]
  return None


@functools.lru_cache(maxsize=4)
def _bad_images(paths: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
  """(path, problem) of every undecodable file; each file is read once a process."""
  if any("://" in p for p in paths[:1]):
    from concurrent import futures  # pylint: disable=g-import-not-at-top
    # Remote storage: each read waits on the network, threads overlap them.
    with futures.ThreadPoolExecutor(max_workers=16) as pool:
      problems = list(pool.map(_image_problem, paths))
  else:
    # Local disk: PIL holds the GIL, so threads are slower (measured 0.3 vs 0.8 s
    # for 1000 500x375 files on 2 cores).
    problems = [_image_problem(p) for p in paths]
  return tuple((p, why) for p, why in zip(paths, problems) if why)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
  # The source is built several times a run (info, train, eval): warn once.
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.warning(message)


def _check_bad_images_mode(mode: str) -> None:
  if mode not in BAD_IMAGES_MODES:
    raise ValueError(f"config.bad_images={mode!r}; expected one of "
                     f"{list(BAD_IMAGES_MODES)}: 'error' stops on undecodable image "
                     "files, 'skip' leaves them out with a warning.")


def _handle_bad_images(root: str, files: Sequence[str], mode: str) -> set[str]:
  """The undecodable files to leave out (mode 'skip'); raises under 'error'."""
  bad = _bad_images(tuple(files))
  if not bad:
    return set()
  shown = "; ".join(f"{p} ({why})" for p, why in bad[:_SHOWN_BAD_FILES])
  more = f"; and {len(bad) - _SHOWN_BAD_FILES} more" if len(bad) > _SHOWN_BAD_FILES else ""
  summary = (f"{len(bad)} of {len(files)} image files under {root} cannot be decoded: "
             f"{shown}{more}")
  if mode == "error":
    raise ValueError(f"{summary}. Fix or delete them, or leave them out with "
                     "--config.bad_images=skip.")
  _warn_once(f"Skipping {summary} (config.bad_images='skip').")
  return {p for p, _ in bad}


def _handle_empty_class_folders(root: str, folders: Sequence[str], mode: str) -> None:
  if not folders:
    return
  listed = ", ".join(folders[:_SHOWN_BAD_FILES]) + (
      f" and {len(folders) - _SHOWN_BAD_FILES} more"
      if len(folders) > _SHOWN_BAD_FILES else "")
  message = (f"{len(folders)} empty class folder(s) under {root} (each holds no "
             f"images with an extension in {_IMAGE_EXTENSIONS})")
  if mode == "error":
    # An empty folder would still become a class that is never trained.
    raise FileNotFoundError(f"{message}: {listed}. Add images or remove the "
                            "folder(s), or leave them out with "
                            "--config.bad_images=skip.")
  _warn_once(f"{message}; leaving them out (config.bad_images='skip'): {listed}.")


def _imagefolder_source(root: Optional[str], bad_images: str = "error") -> _Source:
  """Lists ``root/<split>/<class>/<image>`` in sorted order, checking every file.

  `bad_images` ("error" or "skip", ``config.bad_images``) decides what happens to
  files that will not decode and to class folders without images: stop with an
  error naming them, or leave them out with one warning. Skipped classes (no image
  in any split) are not classes.
  """
  layout = ("Expected one folder per split holding one subfolder per class, e.g. "
            "ROOT/train/cat/001.png and ROOT/test/cat/002.png.")
  _check_bad_images_mode(bad_images)
  if not root:
    raise ValueError("config.dataset='imagefolder' needs config.data_dir, the root "
                     f"of the image folder; got {root!r}. {layout}")
  if not tf.io.gfile.isdir(root):
    raise FileNotFoundError(f"Image folder root {root!r} does not exist. Set "
                            f"config.data_dir to an existing folder. {layout}")

  def subdirs(path):
    return sorted(d.rstrip("/") for d in tf.io.gfile.listdir(path)
                  if tf.io.gfile.isdir(f"{path}/{d}"))

  split_names = subdirs(root)
  classes_per_split = {s: subdirs(f"{root}/{s}") for s in split_names}
  split_names = [s for s in split_names if classes_per_split[s]]
  if not split_names:
    raise FileNotFoundError(f"Image folder root {root!r} has no split folder with "
                            f"class subfolders. {layout}")
  listing = {}  # (split, class) -> image paths
  for split in split_names:
    for class_name in classes_per_split[split]:
      class_dir = f"{root}/{split}/{class_name}"
      listing[split, class_name] = [
          f"{class_dir}/{f}" for f in sorted(tf.io.gfile.listdir(class_dir))
          if f.lower().endswith(_IMAGE_EXTENSIONS)]
  skipped = _handle_bad_images(root, [p for ps in listing.values() for p in ps],
                               bad_images)
  listing = {k: [p for p in ps if p not in skipped] for k, ps in listing.items()}
  _handle_empty_class_folders(root, [f"{root}/{s}/{c}" for (s, c), ps in listing.items()
                                     if not ps], bad_images)
  label_names = sorted({c for (_, c), ps in listing.items() if ps})
  label_ids = {name: i for i, name in enumerate(label_names)}
  splits = {}
  for split in split_names:
    paths, labels = [], []
    for class_name in classes_per_split[split]:
      files = listing[split, class_name]
      if not files:  # Left out under bad_images="skip".
        continue
      paths += files
      labels += [label_ids[class_name]] * len(files)
    if not paths:
      raise FileNotFoundError(
          f"Split folder {root}/{split} holds no images with an extension in "
          f"{_IMAGE_EXTENSIONS}. Add images or remove the folder. {layout}")
    splits[split] = (np.array(paths), np.array(labels, np.int32))

  def decode(encoded):
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)

  return _in_memory_source("imagefolder", label_names, splits, decode,
                           fetch=tf.io.read_file)


def _not_prepared_message(builder: tfds.core.DatasetBuilder) -> str:
  name, data_dir = builder.name, str(builder.data_dir_root)
  message = (f"TFDS data set {name!r} is not prepared in data_dir {data_dir!r} "
             f"(looked for {builder.data_path}). This pipeline never downloads. ")
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    message += (f"{name} needs a manual download first:\n"
                f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}\nPut those files in "
                f"MANUAL_DIR, then run: tfds build {name} --data_dir={data_dir} "
                "--manual_dir=MANUAL_DIR")
  else:
    message += f"Prepare it once with: tfds build {name} --data_dir={data_dir}"
  return message + " (and point config.data_dir at that directory)."


def _tfds_source(name: str, data_dir: Optional[str]) -> _Source:
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"Unknown config.dataset {name!r}: expected 'digits', 'fashion_mnist', "
        "'imagefolder' or a "
        "TFDS name such as 'cifar100' or 'imagenet2012' (see `tfds.list_builders()`)."
    ) from e
  # is_prepared() only checks the local directory; it never triggers a download.
  if not builder.is_prepared():
    raise FileNotFoundError(_not_prepared_message(builder))
  image_key, label_key = builder.info.supervised_keys or ("image", "label")
  features = builder.info.features
  if not isinstance(features[label_key], tfds.features.ClassLabel):
    raise ValueError(f"TFDS data set {name!r} has no class label {label_key!r}; "
                     "expected an image classification data set.")
  decoders = tfds.decode.PartialDecoding(
      {image_key: True, label_key: True},
      # Images stay encoded until after the resume skip and the shuffle.
      decoders={image_key: tfds.decode.SkipDecoding()})

  def read(split, train, seed):
    read_config = tfds.ReadConfig(
        # A fixed file order (seeded once) keeps reading deterministic; the
        # per-epoch shuffle buffer does the rest.
        shuffle_seed=seed, shuffle_reshuffle_each_iteration=False,
        try_autocache=False)
    ds = builder.as_dataset(split=split, shuffle_files=train, decoders=decoders,
                            read_config=read_config)
    return ds.map(lambda ex: {"image": ex[image_key],
                              "label": tf.cast(ex[label_key], tf.int32)})

  def decode(encoded):
    return _to_rgb(features[image_key].decode_example(encoded))

  return _Source(name, tuple(features[label_key].names), builder.info.splits, read,
                 decode)


def _get_source(config) -> _Source:
  source = _dataset_source(config)
  classes = config.get("class_subset")
  return class_subset_view(source, tuple(classes)) if classes else source


def class_subset_view(source: _Source, classes: Sequence[int]) -> _Source:
  """`source` restricted to `classes` (original ids), relabelled 0..len-1 in order.

  A view, not a copy: examples are filtered and relabelled as they are read, so
  any data set the pipeline reads (digits, Fashion-MNIST, an image folder, TFDS)
  splits by class with no files written (DeViT's per-device sub-data sets).
  Counting a split reads its labels once (images stay encoded).

  Example: ``config.class_subset = (2, 3, 5, 7, 8)``; label 0 is class 2.
  """
  num_classes = len(source.label_names)
  bad = [c for c in classes if not 0 <= int(c) < num_classes]
  if not classes or bad or len(set(classes)) != len(classes):
    raise ValueError(
        f"config.class_subset={tuple(classes)}: expected distinct class ids in "
        f"[0, {num_classes}) of {source.name!r}; bad ids {bad or 'repeated'}. Use "
        "vit_edge.devit.decompose.class_subsets(num_classes, num_devices)[i].")
  new_label = np.full([num_classes], -1, np.int32)
  new_label[np.asarray(classes, np.int64)] = np.arange(len(classes), dtype=np.int32)
  new_label = tf.constant(new_label)

  def read(split, train, seed):
    ds = source.read(split, train, seed)
    ds = ds.filter(lambda ex: tf.gather(new_label, ex["label"]) >= 0)
    return ds.map(lambda ex: dict(ex, label=tf.gather(new_label, ex["label"])))

  counts: dict[str, int] = {}  # get_info and both iterators count the same splits.

  def count(split) -> int:
    if str(split) not in counts:
      labels = source.read(split, False, 0).map(lambda ex: ex["label"])
      kept = labels.map(lambda y: tf.cast(tf.gather(new_label, y) >= 0, tf.int64))
      counts[str(split)] = int(kept.reduce(tf.constant(0, tf.int64),
                                           lambda n, k: n + k))
    return counts[str(split)]

  return dataclasses.replace(
      source, label_names=tuple(source.label_names[c] for c in classes), read=read,
      count=count)


def _dataset_source(config) -> _Source:
  if config.dataset == "digits":
    return _digits_source()
  if config.dataset == "fashion_mnist":
    return _fashion_mnist_source(config.get("data_dir"))
  if config.dataset == "imagefolder":
    return _imagefolder_source(config.data_dir, config.get("bad_images", "error"))
  return _tfds_source(config.dataset.removeprefix(_TFDS_PREFIX),
                      config.get("data_dir"))


# ----------------------------------------------------------------------------------
# Splits.


def _num_examples(split: Any, split_infos: Mapping[str, Any]) -> int:
  total = 0
  for part in split.to_absolute(split_infos):
    end = split_infos[part.splitname].num_examples if part.to is None else part.to
    total += end - (part.from_ or 0)
  return total


def _process_split(source: _Source, split: str, field: str, process_index: int,
                   process_count: int) -> tuple[Any, list[int]]:
  """This process's contiguous share of `split`, and every process's share size."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count="
                     f"{process_count}). Pass jax.process_index() and "
                     "jax.process_count().")
  try:
    shares = tfds.even_splits(split, process_count)
    sizes = [source.count(share) if source.count else
             _num_examples(share, source.split_infos) for share in shares]
  except (ValueError, KeyError, AssertionError) as e:
    raise ValueError(
        f"config.{field}={split!r} is not a valid split of {source.name!r}: {e} "
        f"Available splits: {sorted(source.split_infos)}; slices look like "
        "'train[:90%]' or 'train[100:200]'.") from e
  if min(sizes) == 0:
    raise ValueError(f"config.{field}={split!r} has {sum(sizes)} examples, fewer "
                     f"than the {process_count} processes. Use a larger split.")
  return shares[process_index], sizes


def get_info(config) -> DatasetInfo:
  """Describes ``config.dataset`` without reading any images.

  Args:
    config: the experiment config (``dataset``, ``data_dir``, ``train_split``,
      ``eval_split``).

  Returns:
    A `DatasetInfo` with the class count and the sizes of both splits.

  Raises:
    FileNotFoundError: for an unprepared TFDS data set or a bad image folder.
    ValueError: for an unknown data set or split.

  Example::

    >>> config = ml_collections.ConfigDict(dict(
    ...     dataset="digits", data_dir=None, train_split="train", eval_split="test"))
    >>> get_info(config)
    DatasetInfo(name='digits', num_classes=10, num_train_examples=1437, \
num_eval_examples=360, label_names=('0', '1', '2', '3', '4', '5', '6', '7', '8', '9'))
  """
  if seg_data.is_segmentation(config.dataset):  # "seg:...": image + mask pairs.
    return seg_data.get_info(config)
  source = _get_source(config)
  _, train_sizes = _process_split(source, config.train_split, "train_split", 0, 1)
  _, eval_sizes = _process_split(source, config.eval_split, "eval_split", 0, 1)
  return DatasetInfo(name=config.dataset, num_classes=len(source.label_names),
                     num_train_examples=train_sizes[0],
                     num_eval_examples=eval_sizes[0],
                     label_names=source.label_names)


# ----------------------------------------------------------------------------------
# Preprocessing.


def _aug(config, name: str, default: Any) -> Any:
  aug = config.get("aug")
  return default if aug is None else aug.get(name, default)


def _interpolation(config) -> str:
  method = _aug(config, "interpolation", "bilinear")
  valid = ("bilinear", "bicubic", "nearest", "area", "lanczos3", "lanczos5")
  if method not in valid:
    raise ValueError(f"config.aug.interpolation={method!r} is not one of {valid}.")
  return method


def _resize(image: tf.Tensor, size: Sequence[Any], method: str) -> tf.Tensor:
  # Antialiasing matters when shrinking ImageNet photos; bicubic can overshoot.
  image = tf.image.resize(tf.cast(image, tf.float32), size, method=method,
                          antialias=True)
  return tf.clip_by_value(image, 0.0, 255.0)


def _resize_and_center_crop(image: tf.Tensor, image_size: int, crop_pct: float,
                            method: str) -> tf.Tensor:
  """timm's eval transform: shorter side to floor(size / crop_pct), centre crop."""
  scale_size = math.floor(image_size / crop_pct)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  new_shape = tf.cast(tf.round(shape * scale_size / tf.reduce_min(shape)), tf.int32)
  new_shape = tf.maximum(new_shape, image_size)
  image = _resize(image, new_shape, method)
  top = (new_shape[0] - image_size) // 2
  left = (new_shape[1] - image_size) // 2
  image = image[top:top + image_size, left:left + image_size]
  return tf.ensure_shape(image, [image_size, image_size, 3])


def _random_resized_crop(raw: tf.Tensor, decode: Callable[[tf.Tensor], tf.Tensor],
                         seed: tf.Tensor, image_size: int, scale: Sequence[float],
                         ratio: Sequence[float], method: str) -> tf.Tensor:
  """Inception crop: random area fraction in `scale` and aspect ratio in `ratio`.

  TF samples the ratio uniformly (timm log-uniformly) and falls back to the whole
  image (timm to a centre crop) after 10 failed attempts. JPEG bytes are decoded
  only inside the crop window, which roughly halves the decoding cost on ImageNet.
  """

  def sample_window(shape):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4], tf.float32), seed=seed, min_object_covered=0.0,
        aspect_ratio_range=tuple(ratio), area_range=tuple(scale), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return begin, size

  def crop_decoded():
    image = decode(raw)
    begin, size = sample_window(tf.shape(image))
    return tf.slice(image, begin, size)

  def crop_jpeg():
    begin, size = sample_window(tf.image.extract_jpeg_shape(raw))
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.image.decode_and_crop_jpeg(raw, window, channels=3)

  if raw.dtype == tf.string:
    image = tf.cond(tf.io.is_jpeg(raw), crop_jpeg, crop_decoded)
  else:
    image = crop_decoded()
  return tf.ensure_shape(_resize(image, [image_size, image_size], method),
                         [image_size, image_size, 3])


def _normalize(image: tf.Tensor, mean: Sequence[float],
               std: Sequence[float]) -> tf.Tensor:
  mean = tf.constant(mean, tf.float32)
  std = tf.constant(std, tf.float32)
  return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def _check_mean_std(mean, std):
  for name, value in (("mean", mean), ("std", std)):
    if np.ndim(value) > 1 or np.size(value) not in (1, 3):
      raise ValueError(f"{name}={value!r} must be a number or 3 numbers (RGB), as "
                       "the model's default config gives, e.g. (0.485, 0.456, 0.406).")
  if np.any(np.asarray(std) <= 0):
    raise ValueError(f"std={std!r} must be positive; use 1 for no scaling.")


def _check_image_size(config):
  size = config.image_size
  if not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f"config.image_size={size!r} must be a positive int, e.g. 224.")


def _check_crop(crop_scale, crop_ratio):
  if not (len(crop_scale) == 2 and 0 < crop_scale[0] <= crop_scale[1] <= 1):
    raise ValueError(f"config.aug.crop_scale={tuple(crop_scale)} must be (min, max) "
                     "area fractions with 0 < min <= max <= 1, e.g. (0.08, 1.0).")
  if not (len(crop_ratio) == 2 and 0 < crop_ratio[0] <= crop_ratio[1]):
    raise ValueError(f"config.aug.crop_ratio={tuple(crop_ratio)} must be (min, max) "
                     "aspect ratios with 0 < min <= max, e.g. (3 / 4, 4 / 3).")


def _train_preprocess(config, mean, std, decode: Callable[[tf.Tensor], tf.Tensor]
                      ) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
  """Returns (raw image, int64 [2] key) -> normalised float32 [S, S, 3]."""
  size = config.image_size
  method = _interpolation(config)
  rrc = _aug(config, "random_resized_crop", False)
  crop_scale = _aug(config, "crop_scale", (0.08, 1.0))
  crop_ratio = _aug(config, "crop_ratio", (3 / 4, 4 / 3))
  if rrc:
    _check_crop(crop_scale, crop_ratio)
  hflip = _aug(config, "hflip", False)
  ra_spec = _aug(config, "randaugment", "")
  ra_params = augment.parse_randaugment(ra_spec) if ra_spec else None
  erasing = float(_aug(config, "random_erasing", 0.0) or 0.0)
  # timm fills the pixels geometric ops reveal with the normalisation mean.
  fill = tuple(min(255.0, round(255.0 * m)) for m in np.broadcast_to(mean, [3]))

  def preprocess(raw, key):
    crop_key, flip_key, ra_key, erase_key = tf.unstack(
        tf.random.experimental.stateless_split(key, 4))
    if rrc:
      image = _random_resized_crop(raw, decode, crop_key, size, crop_scale,
                                   crop_ratio, method)
    else:
      image = _resize_and_center_crop(decode(raw), size, 1.0, method)
    # RandAugment's ops are defined on 8-bit images, as PIL's in timm.
    image = tf.cast(tf.round(image), tf.uint8)
    if hflip:
      image = tf.image.stateless_random_flip_left_right(image, flip_key)
    if ra_params is not None:
      image = augment.randaugment(image, ra_key, ra_params, fill=fill)
    image = _normalize(image, mean, std)
    if erasing > 0:
      image = augment.random_erasing(image, erase_key, probability=erasing)
    return image

  return preprocess


def _eval_preprocess(config) -> Callable[[tf.Tensor], tf.Tensor]:
  crop_pct = _aug(config, "crop_pct", DEFAULT_CROP_PCT)
  if not 0 < crop_pct <= 1:
    raise ValueError(f"config.aug.crop_pct={crop_pct} must be in (0, 1], e.g. 0.875.")
  method = _interpolation(config)

  def preprocess(image):
    image = _resize_and_center_crop(image, config.image_size, crop_pct, method)
    return tf.cast(tf.round(image), tf.uint8)

  return preprocess


def _hide_gpus_from_tensorflow():
  # JAX owns the accelerators; a TensorFlow build with GPU support would otherwise
  # reserve their memory. A no-op with tensorflow-cpu.
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TensorFlow already initialised its devices.
    pass


def _options() -> tf.data.Options:
  options = tf.data.Options()
  # Parallel maps must keep the order, or resumed batches would differ.
  options.deterministic = True
  return options


# ----------------------------------------------------------------------------------
# Public iterators.


def create_train_iterator(config, *, mean: Sequence[float], std: Sequence[float],
                          local_batch_size: int, start_step: int = 0,
                          process_index: int = 0,
                          process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Infinite, shuffled, augmented training batches for this process.

  The batches are a pure function of ``(config, start_step, process_index,
  process_count, local_batch_size)``: the iterator made with ``start_step=S``
  yields what an iterator made with ``start_step=0`` yields from its S-th batch on.

  Args:
    config: the experiment config (see the module docstring).
    mean: per-channel mean of the model's input normalisation, in [0, 1] units.
    std: per-channel std of the model's input normalisation.
    local_batch_size: examples per batch on this process.
    start_step: number of batches already consumed (the restored train step).
    process_index: this process, ``jax.process_index()``.
    process_count: all processes, ``jax.process_count()``.

  Returns:
    An iterator of ``{"image": float32 [b, S, S, 3] with (x / 255 - mean) / std,
    "label": int32 [b]}`` numpy batches, with ``b = local_batch_size`` and
    ``S = config.image_size``.

  Raises:
    FileNotFoundError: for an unprepared TFDS data set or a bad image folder.
    ValueError: for bad sizes, splits, processes or augmentation settings.

  Example::

    >>> it = create_train_iterator(config, mean=(0.5,) * 3, std=(0.5,) * 3,
    ...                            local_batch_size=32, start_step=1000)
    >>> next(it)["image"].shape
    (32, 224, 224, 3)
  """
  if local_batch_size < 1 or start_step < 0:
    raise ValueError(f"local_batch_size={local_batch_size} must be >= 1 and "
                     f"start_step={start_step} >= 0; pass config.batch_size // "
                     "process_count and the restored step.")
  if seg_data.is_segmentation(config.dataset):  # Masks: joint image/mask augmentation.
    return seg_data.create_train_iterator(
        config, mean=mean, std=std, local_batch_size=local_batch_size,
        start_step=start_step, process_index=process_index, process_count=process_count)
  _check_mean_std(mean, std)
  _check_image_size(config)
  _hide_gpus_from_tensorflow()
  source = _get_source(config)
  split, sizes = _process_split(source, config.train_split, "train_split",
                                process_index, process_count)
  num_examples = sizes[process_index]
  seed = int(config.seed)
  records = source.read(split, True, seed)
  cache = config.get("cache", False)
  if cache:
    records = source.fetched(records).cache()
  shuffle_buffer = max(1, min(int(config.shuffle_buffer), num_examples))

  def epoch(index):
    key = tf.random.experimental.stateless_fold_in(
        tf.constant([seed, _SHUFFLE_STREAM], tf.int64), index)
    shuffle_seed = tf.random.stateless_uniform([], key, minval=None, maxval=None,
                                               dtype=tf.int64)
    return records.shuffle(shuffle_buffer, seed=shuffle_seed,
                           reshuffle_each_iteration=False)

  first_position = start_step * local_batch_size
  first_epoch, offset = divmod(first_position, num_examples)
  ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch)
  ds = ds.skip(offset)  # Cheap: the images are still encoded.
  if not cache:
    ds = source.fetched(ds)
  ds = ds.enumerate(start=first_position)
  augment_key = tf.constant([seed, _AUGMENT_STREAM], tf.int64)
  preprocess = _train_preprocess(config, mean, std, source.decode)

  def decode_and_augment(position, example):
    # The global index is unique over processes and stream positions.
    index = position * process_count + process_index
    key = tf.random.experimental.stateless_fold_in(augment_key, index)
    return {"image": preprocess(example["image"], key), "label": example["label"]}

  ds = ds.map(decode_and_augment, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
  return ds.as_numpy_iterator()


class EvalIterable:
  """The eval split for one process, as padded batches; each `iter` is a new pass.

  Every process yields `num_batches` batches of ``{"image", "label", "mask"}``;
  ``mask`` is 1.0 for real examples and 0.0 for the zero padding that fills the
  last batches, so metrics weight by ``mask`` and collectives stay in step.

  Attributes:
    num_batches: batches per pass, the same on every process.
    num_examples: real examples of this process.
  """

  def __init__(self, dataset: tf.data.Dataset, num_batches: int, num_examples: int):
    self._dataset = dataset
    self.num_batches = num_batches
    self.num_examples = num_examples

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self._dataset.as_numpy_iterator()

  def __len__(self) -> int:
    return self.num_batches


def create_eval_iterator(config, *, mean: Sequence[float], std: Sequence[float],
                         local_batch_size: int, process_index: int = 0,
                         process_count: int = 1) -> EvalIterable:
  """Batches of ``config.eval_split`` for this process, padded to a common count.

  Images are resized (shorter side) to ``image_size / crop_pct`` and centre cropped
  to ``image_size``; no randomness. Each process reads its own contiguous share.

  Args:
    config: the experiment config (see the module docstring).
    mean: per-channel mean of the model's input normalisation, in [0, 1] units.
    std: per-channel std of the model's input normalisation.
    local_batch_size: examples per batch on this process.
    process_index: this process, ``jax.process_index()``.
    process_count: all processes, ``jax.process_count()``.

  Returns:
    An `EvalIterable`; iterating it gives ``{"image": float32 [b, S, S, 3],
    "label": int32 [b], "mask": float32 [b]}`` numpy batches.

  Raises:
    FileNotFoundError: for an unprepared TFDS data set or a bad image folder.
    ValueError: for bad sizes, splits or processes.

  Example::

    >>> batches = create_eval_iterator(config, mean=(0.,) * 3, std=(1.,) * 3,
    ...                                local_batch_size=100)
    >>> correct = sum((predict(b["image"]) == b["label"]) @ b["mask"]
    ...               for b in batches)
  """
  if local_batch_size < 1:
    raise ValueError(f"local_batch_size={local_batch_size} must be >= 1; pass "
                     "config.eval_batch_size // process_count.")
  if seg_data.is_segmentation(config.dataset):  # Masks: joint image/mask augmentation.
    return seg_data.create_eval_iterator(
        config, mean=mean, std=std, local_batch_size=local_batch_size,
        process_index=process_index, process_count=process_count)
  _check_mean_std(mean, std)
  _check_image_size(config)
  _hide_gpus_from_tensorflow()
  source = _get_source(config)
  split, sizes = _process_split(source, config.eval_split, "eval_split",
                                process_index, process_count)
  num_examples = sizes[process_index]
  num_batches = -(-max(sizes) // local_batch_size)
  preprocess = _eval_preprocess(config)
  size = config.image_size

  ds = source.fetched(source.read(split, False, int(config.seed)))
  ds = ds.map(lambda ex: {"image": preprocess(source.decode(ex["image"])),
                          "label": ex["label"]},
              num_parallel_calls=tf.data.AUTOTUNE)
  if config.get("cache", False):
    ds = ds.cache()  # uint8 crops: a quarter of the float32 size.
  ds = ds.map(lambda ex: {"image": _normalize(ex["image"], mean, std),
                          "label": ex["label"], "mask": tf.constant(1.0)})
  padding = tf.data.Dataset.from_tensors({
      "image": tf.zeros([size, size, 3], tf.float32),
      "label": tf.constant(0, tf.int32), "mask": tf.constant(0.0)})
  ds = ds.concatenate(padding.repeat(num_batches * local_batch_size - num_examples))
  ds = ds.batch(local_batch_size, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
  return EvalIterable(ds, num_batches, num_examples)
