"""Command line: segment an image with an exported vit_edge segmentation .tflite.

Needs only numpy, Pillow and ai-edge-litert (no JAX, no TensorFlow)::

    python -m vit_edge.runtime.segment model.tflite image.jpg --out overlay.png \
        [--alpha 0.5] [--threads 1] [--json]

The image is resized to the model's input size (as the segmentation eval
pipeline does: bilinear, no crop), normalised with the mean/std in the file's
metadata and run; the argmax class map (the export's ``class_map`` output) is
resized back to the image's size by nearest neighbour. It writes the image with
each class tinted in its colour and a legend of the classes present, and prints
every class's share of the pixels.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw

from vit_edge.runtime import classifier as classifier_lib
from vit_edge.runtime import metadata as metadata_lib
from vit_edge.runtime import transforms

_LEGEND_ROW = 18  # Pixels per legend row.


def palette(num_classes: int) -> np.ndarray:
  """uint8 [num_classes, 3] distinct colours (Pascal VOC's bit-interleaved map)."""
  colours = np.zeros((num_classes, 3), np.uint8)
  for index in range(num_classes):
    label, colour = index, [0, 0, 0]
    for shift in range(7, -1, -1):
      for channel in range(3):
        colour[channel] |= ((label >> channel) & 1) << shift
      label >>= 3
    colours[index] = colour
  if num_classes > 0 and not colours[0].any():
    colours[0] = (64, 64, 64)  # Class 0 (often background) stays visible.
  return colours


class Segmenter:
  """A segmentation TFLite export with its metadata.

  Example::

      seg = Segmenter("model.tflite", num_threads=1)
      class_map = seg.segment("scene.jpg")  # int [H, W] at the image's size
  """

  def __init__(self, model_path: str, num_threads: Optional[int] = None):
    self.metadata = metadata_lib.read_metadata(model_path)
    kinds = metadata_lib.output_kinds(self.metadata)
    if "class_map" not in kinds.values():
      raise ValueError(
          f"{model_path!r} serves {kinds}, not a per-pixel class map: it is not a "
          "segmentation export. Export a segmentation run (config.task="
          "'segmentation'), e.g. python -m vit_edge.export --workdir=RUN.")
    self._class_map = next(n for n, k in kinds.items() if k == "class_map")
    self.runner = classifier_lib.TFLiteModel(model_path, num_threads=num_threads)
    self.labels = [str(n) for n in self.metadata.get("label_names") or
                   range(int(self.metadata["num_classes"]))]
    self.image_size = int(self.metadata["image_size"])

  def preprocess(self, image: Image.Image) -> np.ndarray:
    size = self.image_size
    pixels = np.asarray(image.resize((size, size), Image.BILINEAR), np.float32)
    mean = np.asarray(self.metadata["mean"], np.float32)
    std = np.asarray(self.metadata["std"], np.float32)
    return ((pixels / 255.0 - mean) / std).astype(np.float32)

  def segment(self, image: transforms.ImageLike) -> np.ndarray:
    """int32 [H, W] class ids at the image's own size."""
    rgb = transforms.load_image(image)
    out = self.runner.predict(self.preprocess(rgb)[None])
    class_map = np.asarray(out[self._class_map][0]).astype(np.int32)
    resized = Image.fromarray(class_map.astype(np.uint8)).resize(rgb.size, Image.NEAREST)
    return np.asarray(resized).astype(np.int32)


def pixel_shares(class_map: np.ndarray, num_classes: int) -> np.ndarray:
  """float [num_classes]: fraction of the pixels predicted as each class."""
  counts = np.bincount(class_map.ravel(), minlength=num_classes)[:num_classes]
  return counts / max(class_map.size, 1)


def overlay(image: Image.Image, class_map: np.ndarray, labels: Sequence[str],
            alpha: float = 0.5) -> Image.Image:
  """The image tinted by class colour, with a legend of the classes present below."""
  colours = palette(len(labels))
  rgb = np.asarray(image.convert("RGB"), np.float32)
  tinted = (1 - alpha) * rgb + alpha * colours[class_map].astype(np.float32)
  shares = pixel_shares(class_map, len(labels))
  present = [c for c in np.argsort(-shares) if shares[c] > 0]
  width = max(image.width, 220)
  canvas = Image.new("RGB", (width, image.height + _LEGEND_ROW * len(present) + 4),
                     "white")
  canvas.paste(Image.fromarray(np.clip(tinted, 0, 255).astype(np.uint8)), (0, 0))
  draw = ImageDraw.Draw(canvas)
  for row, c in enumerate(present):
    top = image.height + 2 + row * _LEGEND_ROW
    draw.rectangle([4, top + 2, 18, top + 14], fill=tuple(int(v) for v in colours[c]),
                   outline="black")
    draw.text((24, top + 2), f"{labels[c]}  {shares[c]:.1%}", fill="black")
  return canvas


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m vit_edge.runtime.segment",
      description="Segment an image with a vit_edge segmentation TFLite export and "
                  "write a coloured overlay with a legend.")
  parser.add_argument("model", help="the .tflite file")
  parser.add_argument("image", help="an image file (JPEG, PNG, ...)")
  parser.add_argument("--out", required=True, help="overlay image to write (.png)")
  parser.add_argument("--alpha", type=float, default=0.5,
                      help="weight of the class colours in the overlay (0..1)")
  parser.add_argument("--threads", type=int, default=None,
                      help="CPU threads (default: LiteRT's choice)")
  parser.add_argument("--json", action="store_true",
                      help="print the pixel shares as one JSON object")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
  """Entry point; returns {class name: pixel share} of the classes present."""
  args = _parser().parse_args(argv)
  if not 0.0 <= args.alpha <= 1.0:
    raise ValueError(f"--alpha={args.alpha} must be in [0, 1].")
  segmenter = Segmenter(args.model, num_threads=args.threads)
  image = transforms.load_image(args.image)
  class_map = segmenter.segment(image)
  overlay(image, class_map, segmenter.labels, args.alpha).save(args.out)
  shares = pixel_shares(class_map, len(segmenter.labels))
  result = {segmenter.labels[c]: float(shares[c]) for c in np.argsort(-shares)
            if shares[c] > 0}
  if args.json:
    print(json.dumps({"image": args.image, "overlay": args.out, "shares": result}))
  else:
    print(f"{args.image} ({image.width}x{image.height}) -> {args.out}")
    for name, share in result.items():
      print(f"  {share:7.2%}  {name}")
  return result


def run(argv: Optional[Sequence[str]] = None) -> int:
  """:func:`main` with expected errors as one ``error:`` line and exit status 1."""
  try:
    main(argv)
  except (FileNotFoundError, ValueError, transforms.ImageReadError,
          metadata_lib.MetadataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(run())
