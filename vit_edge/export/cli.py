"""The command line of the export: ``python -m vit_edge.export --help``.

Example::

    python -m vit_edge.export --model=edgevit_xxs --image_size=224 --quantize=int8
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from vit_edge import rundir
from vit_edge.export import modes
from vit_edge.export import pipeline
from vit_edge.export import quantize as quantize_lib
from vit_edge.export import validate


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m vit_edge.export",
      description="Export a trained run (--workdir) or a registry model (--model) "
                  "to a self-describing TFLite file, with a parity check.")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="training run directory")
  source.add_argument("--model", help="registry name (random initialisation)")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step of --workdir (default: newest)")
  parser.add_argument("--quantize", default="none", choices=modes.QUANTIZE_MODES)
  parser.add_argument("--out", default=None,
                      help="output .tflite (default: <model>_<quantize>.tflite in "
                           "<workdir>/export or the current directory)")
  parser.add_argument("--image_size", type=int, default=None,
                      help="input side (default: the training resolution, or the "
                           "model's reference one with --model)")
  parser.add_argument("--num_classes", type=int, default=1000,
                      help="with --model: classifier width")
  parser.add_argument("--calibration", default="digits", choices=("digits", "random"),
                      help="with --model: calibration/parity images")
  parser.add_argument("--num_calibration_samples", type=int,
                      default=modes.DEFAULT_NUM_CALIBRATION_SAMPLES)
  parser.add_argument("--num_parity_samples", type=int,
                      default=modes.DEFAULT_NUM_PARITY_SAMPLES)
  parser.add_argument("--max_eval_examples", type=int, default=None,
                      help="cap on the agreement/accuracy pass (0 skips it)")
  parser.add_argument("--integer_io", action="store_true",
                      help="with --quantize=int8: int8 input and outputs")
  parser.add_argument("--int8_activations", default="auto",
                      choices=quantize_lib.INT8_ACTIVATIONS,
                      help="with --quantize=int8: static (calibrated per-tensor "
                           "scales), dynamic (matmul inputs quantised per row at run "
                           "time; ViT/DeiT's choice) or auto (the model's choice)")
  parser.add_argument("--gelu", default="tanh", choices=modes.GELU_MODES,
                      help="GELU in the exported graph: tanh (one fused TFLite op) "
                           "or exact (rational erf)")
  parser.add_argument("--no_ema", action="store_true",
                      help="with --workdir: export the raw, not the EMA, parameters")
  parser.add_argument("--seed", type=int, default=0,
                      help="with --model: initialisation seed")
  return parser


def _default_out(workdir: str, quantize: str) -> str:
  try:
    name = rundir.load_config_dict(workdir).get("model", "model")
  except (OSError, ValueError):
    name = "model"  # export_from_workdir reports the missing run clearly.
  return os.path.join(rundir.export_dir(workdir), f"{name}_{quantize}.tflite")


def main(argv: Optional[Sequence[str]] = None) -> validate.ExportReport:
  """Command-line entry point; returns the report (see :mod:`vit_edge.export`).

  Example::

      main(["--model=tformer_s", "--image_size=64", "--out=/tmp/t.tflite"])
  """
  args = _parser().parse_args(argv)
  common = dict(quantize=args.quantize,
                num_calibration_samples=args.num_calibration_samples,
                num_parity_samples=args.num_parity_samples,
                max_eval_examples=args.max_eval_examples,
                integer_io=args.integer_io, gelu=args.gelu,
                int8_policy=quantize_lib.Int8Policy(activations=args.int8_activations))
  if args.workdir:
    out = args.out or _default_out(args.workdir, args.quantize)
    report = pipeline.export_from_workdir(args.workdir, out, step=args.step,
                                 image_size=args.image_size,
                                 use_ema=not args.no_ema, **common)
  else:
    out = args.out or f"{args.model}_{args.quantize}.tflite"
    report = pipeline.export_from_registry(args.model, out, image_size=args.image_size,
                                  num_classes=args.num_classes,
                                  calibration=args.calibration, seed=args.seed,
                                  **common)
  print(report.summary())
  return report


def run(argv: Optional[Sequence[str]] = None) -> int:
  """:func:`main` with the expected errors as one ``error:`` line and exit status 1."""
  try:
    main(argv)
  except (FileNotFoundError, ValueError, validate.ParityError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0
