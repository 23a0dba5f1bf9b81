"""Command line: classify images with an exported vit_edge .tflite file.

Needs only numpy, Pillow and ai-edge-litert (no JAX, no TensorFlow)::

    python -m vit_edge.runtime.classify model.tflite cat.jpg dog.png \
        [--threads 2] [--top_k 5] [--json]

Prints, for every image, the top-k labels with their probabilities.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from vit_edge.runtime import classifier as classifier_lib
from vit_edge.runtime import metadata as metadata_lib
from vit_edge.runtime import transforms


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m vit_edge.runtime.classify",
      description="Classify images with a vit_edge TFLite export (labels, size and "
                  "normalisation are read from the file's metadata).")
  parser.add_argument("model", help="the .tflite file")
  parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
  parser.add_argument("--threads", type=int, default=None,
                      help="CPU threads (default: LiteRT's choice)")
  parser.add_argument("--top_k", type=int, default=5, help="classes per image")
  parser.add_argument("--json", action="store_true",
                      help="print one JSON object per image instead of a table")
  return parser


def _print_predictions(path: str, predictions, clf, as_json: bool) -> None:
  if as_json:
    print(json.dumps({"image": path, "model": clf.metadata["model"],
                      "predictions": [
                          {"index": p.index, "label": p.label,
                           "probability": round(p.probability, 6)}
                          for p in predictions]}))
    return
  print(f"{path} ({clf.metadata['model']}, {clf.metadata.get('quantize')}):")
  width = max(len(p.label) for p in predictions)
  for rank, p in enumerate(predictions, 1):
    print(f"  {rank}. {p.label:<{width}}  {p.probability:.4f}")


# Problems with one input image: reported, then the next image is classified.
_IMAGE_ERRORS = (FileNotFoundError, transforms.ImageReadError, ValueError)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the CLI; returns the exit status (0 ok, 2 bad model, arguments or image).

  Every image is classified even when some cannot be read: each bad one gets one
  ``error: <image>: <why>`` line on stderr, and the status is 2 at the end.

  Example::

      main(["model.tflite", "cat.jpg", "--top_k", "3"])
  """
  args = _parser().parse_args(argv)
  if args.top_k < 1:
    print(f"error: --top_k={args.top_k} must be >= 1.", file=sys.stderr)
    return 2
  try:
    clf = classifier_lib.Classifier(args.model, num_threads=args.threads)
  except (FileNotFoundError, metadata_lib.MetadataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  failed = 0
  for path in args.images:
    try:
      predictions = clf.classify(path, top_k=args.top_k)
    except _IMAGE_ERRORS as e:
      failed += 1
      print(f"error: {path}: {e}", file=sys.stderr)
      continue
    _print_predictions(path, predictions, clf, args.json)
  if failed and len(args.images) > 1:
    print(f"error: {failed} of {len(args.images)} images could not be classified.",
          file=sys.stderr)
  return 2 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
