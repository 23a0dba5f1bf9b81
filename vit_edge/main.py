"""Command-line entry point: train (default) or evaluate a checkpoint.

Usage::

    python -m vit_edge.main --config=configs/tformer_s.py --workdir=/tmp/tformer_s
    python -m vit_edge.main --config=configs/tformer_s.py --config.batch_size=128 \
        --workdir=/tmp/tformer_s
    python -m vit_edge.main --config=configs/tformer_s.py --workdir=/tmp/tformer_s \
        --mode=eval [--step=600]

Multi-process (one process per host, or several on one machine over loopback)::

    python -m vit_edge.main --config=... --workdir=... \
        --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0
"""

from __future__ import annotations

import json
import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/tformer_s.py or "
    "configs/tformer_s.py:imagenet,bf16.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, TensorBoard logs and config.json. "
    "Defaults to ./workdir/<model>.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train: train and evaluate (resumes from workdir); "
                          "eval: evaluate a checkpoint of workdir.")
_STEP = flags.DEFINE_integer("step", None, "With --mode=eval: checkpoint step "
                             "(default: the newest).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", None, "Simulate this many CPU devices (testing sharding).")


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of Orbax and TensorStore (several lines per save)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    noisy = "/orbax/" in record.pathname or "/tensorstore/" in record.pathname
    return record.levelno >= std_logging.WARNING or not noisy


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/tformer_s.py")
  # Keep TensorFlow (only used by tf.data) off the accelerators that JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")

  if _NUM_CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _NUM_CPU_DEVICES.value)
  if _COORDINATOR.value:
    # Collectives between CPU processes need gloo; harmless on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  logging.info("JAX process %d / %d, %d local devices, %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())

  from vit_edge import train  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("workdir", config.model)
  if _MODE.value == "train":
    results = train.train_and_evaluate(config, workdir)
  else:
    results = train.evaluate(config, workdir, step=_STEP.value)
  if jax.process_index() == 0:
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
