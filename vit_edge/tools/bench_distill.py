"""Distillation benchmark on Fashion-MNIST: prints one Markdown table (not run by tests).

Trains each experiment's teacher (``configs/<teacher>.py:fashion``), then each student of an experiment with
plain cross-entropy (``--seeds`` seeds: the seed-to-seed spread) and with its
distillation objective (the same steps and data order: seed 0's), one subprocess
per run, each in its own workdir under ``--workdir`` (a finished run is not
retrained: the rerun only re-evaluates)::

    python -m vit_edge.tools.bench_distill --workdir=/tmp/distill_runs \
        --experiments=hard_token,soft_kd,relation --seeds=0,1

``--reuse=RUN=DIR`` takes a finished run directory instead of training RUN (e.g.
``--reuse=teacher_edgevit_xxs=/tmp/fashion_runs/edgevit_xxs``, a run of
``tools.bench_train --config_arg=fashion``); it is only re-evaluated.

Rows: experiment, student, objective, seed, steps, wall minutes, eval top-1 and
the gain of each distilled run over the mean of its plain runs.
"""

from __future__ import annotations

import dataclasses
import os

from absl import app
from absl import flags

from vit_edge import hugepages
from vit_edge.tools import training_runs

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/distill_runs", "Parent of all runs.")
_EXPERIMENTS = flags.DEFINE_list("experiments", ["hard_token", "soft_kd", "relation"],
                                 "Which experiments (see EXPERIMENTS).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds of the plain-CE baselines.")
_DISTILLED_SEEDS = flags.DEFINE_list("distilled_seeds", ["0"],
                                     "Seeds of the distilled runs.")
_REUSE = flags.DEFINE_multi_string(
    "reuse", [], "RUN=DIR: use the finished run DIR for the run named RUN "
    "(teacher_<model>, <experiment>_plain_s<seed>, <experiment>_distilled_s<seed>).")
_EXTRA = flags.DEFINE_multi_string(
    "extra", [], "Extra --config.* flags for every run, e.g. "
    "--extra=--config.num_epochs=1 for a quick pass.")

REPO = training_runs.REPO
_DISTILL = os.path.join(REPO, "configs", "distill")


@dataclasses.dataclass(frozen=True)
class Experiment:
  config: str          # configs/distill/<config>.py: the distilled student.
  teacher: str         # configs/<teacher>.py:fashion trains its teacher.
  student: str


EXPERIMENTS = {
    "hard_token": Experiment("deit_tiny_hard_token", "edgevit_xxs",
                             "deit_tiny_distilled_patch16"),
    "soft_kd": Experiment("mobilevitv2_050_soft_kd", "edgevit_xxs", "mobilevitv2_050"),
    "relation": Experiment("deit_tiny_relation", "deit_small_patch16",
                           "deit_tiny_patch16"),
}


def _workdir(run: str) -> str:
  """The run's directory under --workdir; a link to the --reuse directory if given."""
  workdir = os.path.join(_WORKDIR.value, run)
  reuse = dict(item.split("=", 1) for item in _REUSE.value)
  if run in reuse and not os.path.exists(workdir):
    os.makedirs(_WORKDIR.value, exist_ok=True)
    os.symlink(os.path.abspath(reuse[run]), workdir)
  return workdir


def train_run(config: str, run: str, *config_flags: str
              ) -> tuple[dict[str, float], float]:
  """Trains `config` (path[:arg]) as `run` in a subprocess: (final metrics, s)."""
  return training_runs.train_in_subprocess(config, _workdir(run), *config_flags,
                                           *_EXTRA.value)


_top1 = training_runs.top1_percent


def _teacher(model: str) -> str:
  run = f"teacher_{model}"
  config = os.path.join(REPO, "configs", f"{model}.py") + ":fashion"
  results, seconds = train_run(config, run)
  print(f"| teacher | {model} | cross_entropy | 0 | {results['step']} | "
        f"{seconds / 60:.1f} | {_top1(results):.2f} | |", flush=True)
  return _workdir(run)


def run_experiment(name: str, teachers: dict[str, str]) -> None:
  exp = EXPERIMENTS[name]
  config = os.path.join(_DISTILL, exp.config + ".py")
  teacher_flag = f"--config.teacher.workdir={teachers[exp.teacher]}"
  plain = []
  for seed in _SEEDS.value:
    results, seconds = train_run(config, f"{name}_plain_s{seed}",
                                 "--config.objective.name=cross_entropy",
                                 f"--config.seed={seed}")
    plain.append(_top1(results))
    print(f"| {name} | {exp.student} | cross_entropy | {seed} | {results['step']} | "
          f"{seconds / 60:.1f} | {plain[-1]:.2f} | |", flush=True)
  for seed in _DISTILLED_SEEDS.value:
    results, seconds = train_run(config, f"{name}_distilled_s{seed}", teacher_flag,
                                 f"--config.seed={seed}")
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
    model = EXPERIMENTS[name].teacher
    if model not in teachers:
      teachers[model] = _teacher(model)
    run_experiment(name, teachers)


if __name__ == "__main__":
  hugepages.restart_with_hugepages()  # Before JAX starts (glibc reads it at exec).
  app.run(main)
