"""Checkpoint retention across restarts and clean failures of a checkpoint save."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_edge import checkpointing
from vit_edge import rundir


def _options(**updates):
  options = {"every_steps": 1, "keep": 1, "keep_best": True, "async_save": True}
  options.update(updates)
  return ml_collections.ConfigDict(options)


def _state(value):
  return {"step": jnp.asarray(value, jnp.int32), "w": jnp.full((4,), value, jnp.float32)}


@pytest.mark.parametrize("async_save", [True, False])
def test_best_checkpoint_survives_a_restart(tmp_path, async_save):
  directory = str(tmp_path / "checkpoints")
  first = checkpointing.CheckpointManager(directory, _options(async_save=async_save))
  first.save(1, _state(1), {"eval/top1": 0.9})
  first.save(2, _state(2), {"eval/top1": 0.5})
  first.wait()
  assert rundir.best_step(str(tmp_path)) == 1
  # A restarted run (a new manager) still knows step 1 is the best and keeps it.
  again = checkpointing.CheckpointManager(directory, _options(async_save=async_save))
  again.save(3, _state(3), None)
  again.save(4, _state(4), None)
  again.wait()
  assert rundir.checkpoint_steps(str(tmp_path)) == [1, 4]
  assert rundir.best_step(str(tmp_path)) == 1
  np.testing.assert_array_equal(checkpointing.load_state(str(tmp_path), 1)["w"],
                                np.full((4,), 1.0))
