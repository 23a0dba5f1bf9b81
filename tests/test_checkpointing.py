"""Checkpoint retention across restarts and clean failures of a checkpoint save."""

import threading

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


@pytest.fixture
def small_disk(tmp_path, mount_tmpfs):
  """A 200 KiB tmpfs (root only), unmounted afterwards whatever happens."""
  return mount_tmpfs(tmp_path / "small_disk", "200k")


def _orbax_threads_finish():
  """No Orbax save thread is left waiting for a signal of the failed save.

  Such threads are not daemons: before the fix they held up the interpreter's
  exit for Orbax's 5-minute coordination timeout. (Idle executor workers are
  fine: they end at exit.)
  """
  for thread in threading.enumerate():
    if type(thread).__name__ == "_SignalingThread":
      threading.Thread.join(thread, timeout=60)  # Its own join re-raises.
      assert not thread.is_alive(), f"{thread.name} still waits"


def _save_and_wait(manager, step, state):
  manager.save(step, state, None)
  manager.wait()


def test_full_disk_is_one_error_and_keeps_the_last_checkpoint(small_disk):
  directory = str(small_disk / "checkpoints")
  manager = checkpointing.CheckpointManager(directory, _options(keep=2))
  manager.check_writable()
  _save_and_wait(manager, 1, _state(1))
  # ~400 KB of incompressible floats cannot fit into what is left of 200 KiB.
  big = {"step": jnp.asarray(2, jnp.int32),
         "w": jnp.asarray(np.random.default_rng(0).normal(size=100_000), jnp.float32)}
  with pytest.raises(checkpointing.CheckpointSaveError) as raised:
    _save_and_wait(manager, 2, big)
  message = str(raised.value)
  assert "\n" not in message
  assert "No space left on device (ENOSPC)" in message and directory in message
  assert "newest intact checkpoint is step 1" in message
  assert rundir.checkpoint_steps(directory) == [1]
  np.testing.assert_array_equal(checkpointing.load_state(directory)["w"],
                                np.full((4,), 1.0))
  _orbax_threads_finish()


def test_unwritable_directory_fails_before_training(tmp_path, make_immutable):
  directory = tmp_path / "checkpoints"
  directory.mkdir()
  make_immutable(directory)
  manager = checkpointing.CheckpointManager(str(directory), _options())
  with pytest.raises(checkpointing.CheckpointSaveError,
                     match=r"Cannot write checkpoints to .*checkpoints: Operation not "
                           r"permitted \(EPERM\)\. Nothing was trained\. Make .* "
                           "writable"):
    manager.check_writable()


@pytest.mark.parametrize("async_save", [True, False])
def test_directory_unwritable_mid_run_stops_without_hanging(tmp_path, make_immutable,
                                                            async_save):
  directory = tmp_path / "checkpoints"
  manager = checkpointing.CheckpointManager(str(directory),
                                            _options(keep=2, async_save=async_save))
  _save_and_wait(manager, 1, _state(1))
  make_immutable(directory)
  with pytest.raises(checkpointing.CheckpointSaveError,
                     match=r"Saving checkpoint 2 .* failed: Operation not permitted "
                           r"\(EPERM\)\. The run stopped; the newest intact checkpoint "
                           r"is step 1"):
    _save_and_wait(manager, 2, _state(2))
  _orbax_threads_finish()
  assert rundir.checkpoint_steps(str(directory)) == [1]
