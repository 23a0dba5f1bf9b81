"""DeViT end to end: every training stage for each N, then the accuracy table.

Runs, in order and resuming where a stage stopped (each stage is an ordinary run
directory under ``--root``; a finished one is only evaluated again): the teacher,
then for each N the sub-teachers, the sub-models, the assembled ensemble
(failout as configured, and with ``--nofail`` a failout-0 twin from the same
initial point), and the baseline ``single``: one small ViT with the ensemble's
parameter count trained like the teacher (plain cross-entropy, same steps).
Prints one Markdown table: top-1 of each model, and each ensemble's top-1 with
each single device missing::

    python -m vit_edge.devit.pipeline --n=2,4 --root=workdir/devit

Without sub-teachers (each sub-model distils from the teacher's logits restricted
to its classes): ``--args=sub_teachers=0``. Small settings for a smoke run
(2-block models, 40 steps per stage)::

    python -m vit_edge.devit.pipeline --n=2 --root=/tmp/devit_small \\
        --args=depth=2,width=64,heads=2,teacher_depth=2 --steps=40
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional, Sequence

import ml_collections

from vit_edge import hugepages
from vit_edge import train
from vit_edge.devit import assemble
from vit_edge.devit import evaluate
from vit_edge.devit import stages


def _with_steps(config: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  if steps > 0:
    with config.unlocked():
      config.num_train_steps = steps
      config.eval_every_steps = steps
      config.checkpoint.every_steps = steps
  return config


class Pipeline:
  """Trains stages through `train_and_evaluate` and keeps their results."""

  def __init__(self, args: str, steps: int,
               run: Callable[[ml_collections.ConfigDict, str], dict] = train.train_and_evaluate):
    self.args, self.steps, self.run = args, steps, run
    self.results: dict[str, dict] = {}
    self.minutes: dict[str, float] = {}

  def stage(self, name: str, config: ml_collections.ConfigDict, workdir: str) -> dict:
    if workdir in self.results:
      return self.results[workdir]
    print(f"[devit] {name}: {workdir}", flush=True)
    start = time.time()
    self.results[workdir] = self.run(_with_steps(config, self.steps), workdir)
    self.minutes[workdir] = (time.time() - start) / 60
    return self.results[workdir]

  def spec(self, **fields) -> str:
    return ",".join(filter(None, [self.args] + [f"{k}={v}" for k, v in fields.items()]))

  def ensemble_n(self, n: int, nofail: bool, single: bool) -> None:
    spec = self.spec(n=n)
    dirs = stages.run_dirs(stages.parse_arg(spec))
    self.stage("teacher", stages.teacher_config(spec), dirs["teacher"])
    for k in range(n if stages.parse_arg(spec)["sub_teachers"] else 0):
      self.stage(f"sub-teacher {k}/{n}", stages.sub_teacher_config(f"{spec},k={k}"),
                 dirs["sub_teachers"][k])
    for k in range(n):
      self.stage(f"sub-model {k}/{n}", stages.submodel_config(f"{spec},k={k}"),
                 dirs["submodels"][k])
    config = stages.ensemble_config(spec)
    if not os.path.isdir(os.path.join(dirs["ensemble"], "checkpoints")):
      assemble.assemble(config)
    self.stage(f"ensemble N={n}", config, dirs["ensemble"])
    if nofail:
      self.stage(f"ensemble N={n}, failout 0", stages.ensemble_config(f"{spec},failout=0"),
                 dirs["ensemble_nofail"])
    if single:
      self.stage(f"single ViT of N={n}'s size", stages.single_config(spec), dirs["single"])


def table(pipeline: Pipeline, ns: Sequence[int], max_examples: int = 0) -> str:
  """The Markdown accuracy table of a finished pipeline."""
  n_max = max(ns)
  head = ("| model | params of | top-1 (%) | "
          + " | ".join(f"device {k} missing" for k in range(n_max)) + " | minutes |")
  lines = [head, "|" + "---|" * (4 + n_max)]
  dirs0 = stages.run_dirs(stages.parse_arg(pipeline.spec(n=ns[0])))

  def cell(workdir):
    return f"{100 * pipeline.results[workdir]['eval/top1']:.2f}"

  def minutes(workdir):
    return f"{pipeline.minutes.get(workdir, 0.0):.1f}"

  blank = " | ".join(["-"] * n_max)
  lines.append(f"| teacher | full | {cell(dirs0['teacher'])} | {blank} | "
               f"{minutes(dirs0['teacher'])} |")
  for n in ns:
    dirs = stages.run_dirs(stages.parse_arg(pipeline.spec(n=n)))
    if dirs["single"] in pipeline.results:
      width, heads = stages.single_width(stages.parse_arg(pipeline.spec(n=n)))
      lines.append(f"| single ViT (width {width}, {heads} heads) | N={n} ensemble | "
                   f"{cell(dirs['single'])} | {blank} | {minutes(dirs['single'])} |")
    for key in ("ensemble", "ensemble_nofail"):
      if dirs[key] not in pipeline.results:
        continue
      r = evaluate.missing_device_accuracy(dirs[key], max_examples)
      cells = [f"{a:.2f}" for a in r.device_missing] + ["-"] * (n_max - n)
      stage_minutes = sum(pipeline.minutes.get(d, 0.0) for d in
                          dirs["sub_teachers"] + dirs["submodels"] + [dirs[key]])
      lines.append(f"| DeViT N={n}, failout {r.failout:g} | - | {r.all_present:.2f} | "
                   + " | ".join(cells) + f" | {stage_minutes:.1f} |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vit_edge.devit.pipeline",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--n", default="2,4", help="ensemble sizes, e.g. 2,4")
  parser.add_argument("--root", default="workdir/devit", help="run directories go here")
  parser.add_argument("--args", default="",
                      help="stage arguments for every stage (configs/devit/*.py), "
                           "e.g. width=64,depth=2,heads=2,teacher_depth=2")
  parser.add_argument("--steps", type=int, default=0,
                      help="training steps per stage (0: each config's epochs)")
  parser.add_argument("--nofail", action="store_true",
                      help="also train each ensemble with failout 0 (robustness control)")
  parser.add_argument("--single", action=argparse.BooleanOptionalAction, default=True,
                      help="train the single-ViT baseline of each ensemble's size")
  parser.add_argument("--max_eval_examples", type=int, default=0,
                      help="images for the missing-device columns (0: the whole split)")
  args = parser.parse_args(argv)
  try:
    sizes = [n.strip() for n in args.n.split(",") if n.strip()]
    if not sizes or not all(n.isdigit() and int(n) >= 1 for n in sizes):
      raise ValueError(f"--n={args.n!r}: expected ensemble sizes >= 1, e.g. --n=2,4.")
    ns = [int(n) for n in sizes]
    pipeline = Pipeline(",".join(filter(None, [args.args, f"root={args.root}"])), args.steps)
    for n in ns:
      pipeline.ensemble_n(n, args.nofail, args.single)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("\nFashion-MNIST test split, top-1 (%):\n")
  print(table(pipeline, ns, args.max_eval_examples), flush=True)
  return 0


if __name__ == "__main__":
  hugepages.restart_with_hugepages()  # Before JAX starts (glibc reads it at exec).
  sys.exit(main())
