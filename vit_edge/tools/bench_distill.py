"""Distillation benchmark on Fashion-MNIST: prints one Markdown table (not run by tests).

Trains the teachers of configs/distill/, then each student of an experiment with
plain cross-entropy (``--seeds`` seeds: the seed-to-seed spread) and with its
distillation objective (the same steps and data order: seed 0's), one subprocess
per run, each in its own workdir under ``--workdir`` (a finished run is not
retrained: the rerun only re-evaluates)::

    python -m vit_edge.tools.bench_distill --workdir=/tmp/distill_runs \
        --experiments=hard_token,soft_kd,relation --seeds=0,1

Rows: experiment, student, objective, seed, steps, wall minutes, eval top-1 and
the gain of each distilled run over the mean of its plain runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/distill_runs", "Parent of all runs.")
_EXPERIMENTS = flags.DEFINE_list("experiments", ["hard_token", "soft_kd", "relation"],
                                 "Which experiments (see EXPERIMENTS).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds of the plain-CE baselines.")
_DISTILLED_SEEDS = flags.DEFINE_list("distilled_seeds", ["0"],
                                     "Seeds of the distilled runs.")
_EXTRA = flags.DEFINE_multi_string(
    "extra", [], "Extra --config.* flags for every run, e.g. "
    "--extra=--config.num_epochs=1 for a quick pass.")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_DISTILL = os.path.join(REPO, "configs", "distill")


@dataclasses.dataclass(frozen=True)
class Experiment:
  config: str          # configs/distill/<config>.py: the distilled student.
  teacher_arg: str     # configs/distill/teacher.py:<arg>: its teacher.
  student: str


EXPERIMENTS = {
    "hard_token": Experiment("deit_tiny_hard_token", "edgevit_xs",
                             "deit_tiny_distilled_patch16"),
    "soft_kd": Experiment("mobilevitv2_050_soft_kd", "edgevit_xs", "mobilevitv2_050"),
    "relation": Experiment("deit_tiny_relation", "deit_small_patch16",
                           "deit_tiny_patch16"),
}


def train_run(config: str, workdir: str, *config_flags: str
              ) -> tuple[dict[str, float], float]:
  """Trains `config` (path[:arg]) into workdir in a subprocess: (final metrics, s)."""
  cmd = [sys.executable, "-m", "vit_edge.main", f"--config={config}",
         f"--workdir={workdir}", *config_flags, *_EXTRA.value]
  start = time.time()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1]), time.time() - start


def _top1(results: dict[str, float]) -> float:
  return 100 * results.get("eval_ema/top1", results["eval/top1"])


def _teacher(arg: str) -> str:
  workdir = os.path.join(_WORKDIR.value, f"teacher_{arg}")
  results, seconds = train_run(os.path.join(_DISTILL, "teacher.py") + f":{arg}",
                               workdir)
  print(f"| teacher | {arg} | cross_entropy | 0 | {results['step']} | "
        f"{seconds / 60:.1f} | {_top1(results):.2f} | |", flush=True)
  return workdir


def run_experiment(name: str, teachers: dict[str, str]) -> None:
  exp = EXPERIMENTS[name]
  config = os.path.join(_DISTILL, exp.config + ".py")
  teacher_flag = f"--config.teacher.workdir={teachers[exp.teacher_arg]}"
  plain = []
  for seed in _SEEDS.value:
    results, seconds = train_run(
        config, os.path.join(_WORKDIR.value, f"{name}_plain_s{seed}"),
        "--config.objective.name=cross_entropy", f"--config.seed={seed}")
    plain.append(_top1(results))
    print(f"| {name} | {exp.student} | cross_entropy | {seed} | {results['step']} | "
          f"{seconds / 60:.1f} | {plain[-1]:.2f} | |", flush=True)
  for seed in _DISTILLED_SEEDS.value:
    results, seconds = train_run(
        config, os.path.join(_WORKDIR.value, f"{name}_distilled_s{seed}"),
        teacher_flag, f"--config.seed={seed}")
    gain = _top1(results) - sum(plain) / len(plain)
    print(f"| {name} | {exp.student} | distilled | {seed} | {results['step']} | "
          f"{seconds / 60:.1f} | {_top1(results):.2f} | {gain:+.2f} |", flush=True)
  spread = max(plain) - min(plain)
  print(f"| {name} | plain-CE seed spread (max - min) | | | | | {spread:.2f} | |",
        flush=True)


def main(argv):
  del argv
  unknown = [e for e in _EXPERIMENTS.value if e not in EXPERIMENTS]
  if unknown:
    raise app.UsageError(f"--experiments: unknown {unknown}; choose from "
                         f"{sorted(EXPERIMENTS)}.")
  print("| experiment | student | objective | seed | steps | wall (min) | "
        "Fashion-MNIST top-1 (%) | gain vs plain mean |")
  print("|---|---|---|---:|---:|---:|---:|---:|")
  teachers = {}
  for name in _EXPERIMENTS.value:
    arg = EXPERIMENTS[name].teacher_arg
    if arg not in teachers:
      teachers[arg] = _teacher(arg)
    run_experiment(name, teachers)


if __name__ == "__main__":
  app.run(main)
