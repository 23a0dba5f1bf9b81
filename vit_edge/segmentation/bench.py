"""Segmentation benchmark on the embedded set: mIoU / mean Dice per head and backbone.

Trains each configuration of configs/seg/embedded.py for ``--steps`` steps (same
seed and data), then each ``--distill_students`` model again with logit-map
distillation from the first run as teacher, and prints a Markdown table. Short runs: the figures compare heads at a
fixed small budget, they are not converged accuracies.

    python -m vit_edge.segmentation.bench --steps=200 --workdir=/tmp/seg_bench
"""

from __future__ import annotations

import argparse
import os
import time

from vit_edge import hugepages
from vit_edge import train
from vit_edge.segmentation import recipes

TEACHER = "upernet_mobilevitv2_100"
STUDENTS = ("fpn_edgevit_xxs", "upernet_edgevit_xxs", "fpn_mobilevitv2_100")


def _row(name, objective, results, seconds):
  return (f"| {name} | {objective} | {results['eval/miou']:.4f} | "
          f"{results['eval/mdice']:.4f} | {results['eval/top1']:.4f} | "
          f"{seconds / 60:.1f} |")


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m vit_edge.segmentation.bench")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--workdir", default="/tmp/seg_bench")
  parser.add_argument("--models", default=",".join((TEACHER,) + STUDENTS))
  parser.add_argument("--distill_students", default="fpn_edgevit_xxs",
                      help="comma-separated models trained again with logit-map "
                           "distillation from the first model ('' skips)")
  args = parser.parse_args(argv)
  rows = []
  runs = [(m, "") for m in args.models.split(",") if m]
  runs += [(m, "distill") for m in args.distill_students.split(",") if m]
  teacher_dir = os.path.join(args.workdir, runs[0][0])
  for model, extra in runs:
    config = recipes.segmentation_config(",".join(filter(None, [
        f"model={model}", f"steps={args.steps}", extra])))
    config.eval_every_steps = args.steps
    if extra == "distill":
      config.teacher.workdir = teacher_dir
    workdir = os.path.join(args.workdir, model + ("_distill" if extra else ""))
    start = time.time()
    results = train.train_and_evaluate(config, workdir)
    rows.append(_row(model, config.objective.name + (
        f" (teacher {runs[0][0]})" if extra else ""), results, time.time() - start))
    print("\n".join(rows), flush=True)
  print(f"\nEmbedded set, {args.steps} steps at batch 16, 64x64:\n")
  print("| model | objective | mIoU | mean Dice | pixel acc. | minutes |")
  print("|---|---|---|---|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  hugepages.restart_with_hugepages()  # Before JAX starts (glibc reads it at exec).
  main()
