"""Writes a digit of the embedded test split as an image file, to try a classifier on.

    python -m vit_edge.tools.digit_image --out=digit.png [--index=0] [--size=64]

The 8x8 scikit-learn digit is upscaled (nearest neighbour) to --size pixels, white on
black, as the training pipeline sees it; the true label is printed. The classifier's
own preprocessing (vit_edge.runtime) resizes it to the model's input. Needs only
numpy, scikit-learn and Pillow (no TensorFlow, no JAX).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from PIL import Image

# The TensorFlow-free copy of the data set's split: same images, same order.
from vit_edge import digits

_OUT = flags.DEFINE_string("out", "digit.png", "Destination (.png, .jpg, ...).")
_INDEX = flags.DEFINE_integer("index", 0, "Index into the 360 test-split digits.")
_SIZE = flags.DEFINE_integer("size", 64, "Side of the written image in pixels.")


def write_digit(out: str, index: int = 0, size: int = 64) -> int:
  """Saves test digit `index` to `out`; returns its label.

  Example: ``label = write_digit("digit.png", index=3)``.
  """
  images, labels = digits.arrays()["test"]
  if not 0 <= index < len(images):
    raise ValueError(f"--index={index} is out of range: the digits test split has "
                     f"{len(images)} images (0..{len(images) - 1}).")
  if size < 8:
    raise ValueError(f"--size={size} must be at least 8 (the digits are 8x8).")
  image = Image.fromarray(images[index][..., 0]).resize((size, size),
                                                        Image.Resampling.NEAREST)
  image.convert("RGB").save(out)
  return int(labels[index])


def main(argv):
  del argv
  try:
    label = write_digit(_OUT.value, _INDEX.value, _SIZE.value)
  except (ValueError, OSError) as e:  # A bad flag or an unwritable --out.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"Wrote {_OUT.value}: test digit {_INDEX.value}, label {label}.")


if __name__ == "__main__":
  app.run(main)
