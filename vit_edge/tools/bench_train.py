"""Training benchmarks that print Markdown tables (nothing here is run by the tests).

Accuracy of the default (offline digits) configs, each trained from scratch in a
fresh workdir, one subprocess per model::

    python -m vit_edge.tools.bench_train --mode=accuracy \
        --models=tformer_s,edgevit_xxs,mobilevitv2_050,deit_tiny_patch16

``--config_arg=fashion`` trains the configs' Fashion-MNIST variant instead.

Training throughput (images/s) at batch 32 and resolution 224, on whatever
accelerator JAX sees (CPU here)::

    python -m vit_edge.tools.bench_train --mode=throughput --models=tformer_s

Throughput is timed over --steps steps after one compile+warm-up step, with random
data already on the device (so it measures the model and optimizer, not tf.data).
The table also gives the process's page faults per step and the kernel's share of its
CPU time over those steps (see vit_edge.hugepages).

The hand-written gradients of `models/layers.py` (depthwise and 1x1 convs, max
pooling) against XLA's own autodiff of the same forward, one step each in turn for
--steps rounds (median)::

    python -m vit_edge.tools.bench_train --mode=fast_gradients --models=tformer_s

Both steps are compiled in one process, and they can slow each other (README
"Performance notes": a 1.30x here that fresh processes did not show); confirm a
gain with ``--mode=throughput`` in a checkout of each side, alternated.
"""

from __future__ import annotations

import os
import tempfile

from absl import app
from absl import flags

from vit_edge import hugepages
from vit_edge.tools import step_timing
from vit_edge.tools import training_runs

_MODE = flags.DEFINE_enum("mode", "accuracy", ["accuracy", "throughput", "fast_gradients"],
                          "What to measure.")
_MODELS = flags.DEFINE_list("models", ["tformer_s"], "Registered model names.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per model (throughput); "
                               "interleaved rounds of one step (fast_gradients).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size (throughput).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Resolution (throughput).")
_CONFIG_ARG = flags.DEFINE_string(
    "config_arg", "", "Config variant string for accuracy runs, e.g. 'fashion' "
    "(configs/<model>.py:fashion); '' is the digits default.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent of the per-model workdirs "
                               "(accuracy); a temporary directory by default.")

def accuracy_row(name: str, parent: str) -> str:
  """Trains configs/<name>.py[:--config_arg] in a subprocess; one table row."""
  variant = f":{_CONFIG_ARG.value}" if _CONFIG_ARG.value else ""
  config = os.path.join(training_runs.REPO, "configs", name + ".py") + variant
  try:
    results, wall = training_runs.train_in_subprocess(config,
                                                      os.path.join(parent, name))
  except RuntimeError as e:
    return f"| {name} | failed | | {str(e).strip().splitlines()[-1]} |"
  return (f"| {name} | {results['step']} | {wall / 60:.1f} | "
          f"{training_runs.top1_percent(results):.2f} |")


def throughput_row(name: str) -> str:
  """Images/s of the jitted train step of `name` (DeiT recipe optimizer, float32).

  Also the process's page faults per step and the kernel's share of its CPU time
  during the timed steps: where XLA's step buffers fault in afresh every step, that
  share is large (vit_edge.hugepages).
  """
  import resource  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  time_steps = step_timing.train_step_timer(name, _BATCH.value, _IMAGE_SIZE.value)
  before = resource.getrusage(resource.RUSAGE_SELF)
  seconds = time_steps(_STEPS.value)
  after = resource.getrusage(resource.RUSAGE_SELF)
  faults = (after.ru_minflt - before.ru_minflt) / _STEPS.value
  kernel, user = (after.ru_stime - before.ru_stime), (after.ru_utime - before.ru_utime)
  device = jax.devices()[0].device_kind
  return (f"| {name} | {device} | {_BATCH.value} | {_IMAGE_SIZE.value} | "
          f"{seconds:.2f} | {_BATCH.value / seconds:.1f} | {faults:,.0f} | "
          f"{kernel / max(kernel + user, 1e-9):.0%} |")


def fast_gradients_row(name: str) -> str:
  """Median s/step with `layers.use_fast_gradients` off and on, interleaved."""
  import statistics  # pylint: disable=g-import-not-at-top
  from vit_edge.models import layers  # pylint: disable=g-import-not-at-top
  timers = {}
  try:
    for enabled in (False, True):  # The switch is read when the step is traced.
      layers.use_fast_gradients(enabled)
      timers[enabled] = step_timing.train_step_timer(name, _BATCH.value, _IMAGE_SIZE.value)
  finally:
    layers.use_fast_gradients(True)
  rounds = {enabled: [] for enabled in timers}
  for _ in range(_STEPS.value):
    for enabled, time_steps in timers.items():
      rounds[enabled].append(time_steps(1))
  off, on = (statistics.median(rounds[e]) for e in (False, True))
  shown = lambda e: ", ".join(f"{s:.2f}" for s in rounds[e])
  return (f"| {name} | {_BATCH.value} | {_IMAGE_SIZE.value} | {shown(False)} | "
          f"{shown(True)} | {off:.2f} | {on:.2f} | {off / on:.2f}x |")


def main(argv):
  del argv
  if _MODE.value == "accuracy":
    parent = _WORKDIR.value or tempfile.mkdtemp(prefix="bench_train_")
    data = "Fashion-MNIST" if _CONFIG_ARG.value == "fashion" else "digits"
    print(f"| model | steps | wall time (min) | {data} eval top-1 (%) |")
    print("|---|---:|---:|---:|")
    for name in _MODELS.value:
      print(accuracy_row(name, parent), flush=True)
  elif _MODE.value == "fast_gradients":
    print("| model | batch | resolution | XLA autodiff s/step (rounds) | "
          "custom gradients s/step (rounds) | median off | median on | speed-up |")
    print("|---|---:|---:|---|---|---:|---:|---:|")
    for name in _MODELS.value:
      print(fast_gradients_row(name), flush=True)
  else:
    print("| model | device | batch | resolution | s/step | images/s | page faults/step | "
          "kernel share of CPU time |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in _MODELS.value:
      print(throughput_row(name), flush=True)


if __name__ == "__main__":
  hugepages.restart_with_hugepages()  # Before JAX starts (glibc reads it at exec).
  app.run(main)
