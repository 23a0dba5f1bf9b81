"""scikit-learn's 8x8 handwritten digits with vit_edge's fixed train/test split.

Pure numpy and scikit-learn (no TensorFlow), so light tools can read the same
images that training sees: ``input_pipeline`` serves these arrays as the
``"digits"`` data set, and ``tools.digit_image`` writes test images from them.

Example::

    from vit_edge import digits
    images, labels = digits.arrays()["test"]   # uint8 [360, 8, 8, 1], int32 [360]
"""

from __future__ import annotations

import functools

import numpy as np

NUM_TEST = 360
# The split must never change between runs or machines: a fixed seed.
SPLIT_SEED = 0
LABEL_NAMES = tuple(str(d) for d in range(10))


@functools.lru_cache(maxsize=1)
def arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The digits as {"train", "test"}: (uint8 [N, 8, 8, 1], int32 [N]).

  The fixed stratified split (1437 / 360). Pixels 0..16 are scaled to 0..255.
  Example: ``arrays()["train"][0].shape == (1437, 8, 8, 1)``.
  """
  # pylint: disable=g-import-not-at-top
  from sklearn import datasets as sk_datasets
  from sklearn import model_selection
  # pylint: enable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  # 16 is the brightest value in the 0..16 digits images.
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  train_x, test_x, train_y, test_y = model_selection.train_test_split(
      images, labels, test_size=NUM_TEST, stratify=labels, random_state=SPLIT_SEED)
  return {"train": (train_x, train_y), "test": (test_x, test_y)}
