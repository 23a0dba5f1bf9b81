"""Timing a model's jitted train step on random data already on the device.

Shared by ``bench_train --mode=throughput``, ``bench_peers`` (JAX against PyTorch)
and ``profile_train`` (where the step's time goes). No flags are defined here, so
every tool can import it.
"""

from __future__ import annotations

import tempfile
import time
from typing import Callable


def timing_setup(name: str, batch_size: int, image_size: int):
  """(trainer, fresh state, batch on the device) for timing `name`'s train step.

  The offline config's optimizer and objective (DeiT recipe AdamW, cross-entropy,
  float32) at the given batch and resolution, on random data already on the
  device, so timings measure the model and optimizer, not tf.data. The head has
  the offline data set's 10 classes.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_edge import recipes  # pylint: disable=g-import-not-at-top
  from vit_edge import sharding  # pylint: disable=g-import-not-at-top
  from vit_edge import train  # pylint: disable=g-import-not-at-top

  config = recipes.get_config(name)
  with config.unlocked():
    config.image_size, config.batch_size = image_size, batch_size
    config.eval_batch_size = batch_size
    config.num_train_steps = 1_000_000  # The schedule's length; only timing matters.
  trainer = train.Trainer(config, tempfile.mkdtemp())
  rng = np.random.default_rng(0)
  batch = sharding.make_global_batch({
      "image": rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32),
      "label": rng.integers(0, trainer.ds_info.num_classes, size=(batch_size,)
                            ).astype(np.int32)}, trainer.mesh)
  return trainer, trainer.fresh_state(), batch


def train_step_timer(name: str, batch_size: int, image_size: int
                     ) -> Callable[[int], float]:
  """`time_steps(n)`: runs n jitted train steps of `name`, returns seconds per step.

  Set up by `timing_setup`. The first step (compile + warm-up) runs here,
  untimed. Successive calls continue training, so timings of two frameworks can
  interleave.
  """
  import jax  # pylint: disable=g-import-not-at-top
  trainer, state, batch = timing_setup(name, batch_size, image_size)

  def time_steps(steps: int) -> float:
    nonlocal state
    with jax.set_mesh(trainer.mesh):
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics = trainer.train_step(state, batch)
      jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps

  time_steps(1)  # Compile + warm-up.
  return time_steps
