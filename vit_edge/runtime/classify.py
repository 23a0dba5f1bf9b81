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


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the CLI; returns the exit status (0 ok, 2 bad input).

  Example::

      main(["model.tflite", "cat.jpg", "--top_k", "3"])
  """
  args = _parser().parse_args(argv)
  try:
    clf = classifier_lib.Classifier(args.model, num_threads=args.threads)
    for path in args.images:
      predictions = clf.classify(path, top_k=args.top_k)
      if args.json:
        print(json.dumps({"image": path, "model": clf.metadata["model"],
                          "predictions": [
                              {"index": p.index, "label": p.label,
                               "probability": round(p.probability, 6)}
                              for p in predictions]}))
      else:
        print(f"{path} ({clf.metadata['model']}, {clf.metadata.get('quantize')}):")
        width = max(len(p.label) for p in predictions)
        for rank, p in enumerate(predictions, 1):
          print(f"  {rank}. {p.label:<{width}}  {p.probability:.4f}")
  except (FileNotFoundError, transforms.ImageReadError,
          metadata_lib.MetadataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
