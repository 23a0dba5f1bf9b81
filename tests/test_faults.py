"""Faults injected into real (tiny) training runs: each stops the run with one line
and leaves every checkpoint that was complete before it restorable."""

import errno
import io
import os
import sys

import ml_collections
import pytest

from vit_edge import checkpointing
from vit_edge import rundir
from vit_edge import train

sys.path.insert(0, os.path.dirname(__file__))
import tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def _config(**checkpoint):
  config = tiny_config.get_config()
  with config.unlocked():
    config.checkpoint.update(checkpoint)
  return config


@pytest.fixture
def immutable_dir(tmp_path, make_immutable):
  """A directory that even root cannot write into (chattr +i); undone afterwards."""
  path = tmp_path / "run" / "checkpoints"
  path.mkdir(parents=True)
  return make_immutable(path)


@pytest.fixture
def small_disk(tmp_path, mount_tmpfs):
  """A 16 MiB tmpfs mounted as the run's checkpoints/ (root only); unmounted after."""
  return mount_tmpfs(tmp_path / "run" / "checkpoints", "16m")


def _fill(directory):
  """Writes a file until the disk is full. A disk already too full to create the file
  (seen once in CI) is what this wants too."""
  try:
    with open(os.path.join(directory, ".filler"), "wb") as f:
      while True:
        f.write(b"\0" * 65536)
        f.flush()
  except OSError as error:
    assert error.errno == errno.ENOSPC, error


def test_unwritable_checkpoint_dir_fails_before_training(immutable_dir):
  workdir = str(immutable_dir.parent)
  with pytest.raises(checkpointing.CheckpointSaveError,
                     match=r"Cannot write checkpoints to .*: Operation not permitted "
                           r"\(EPERM\)\. Nothing was trained\."):
    train.train_and_evaluate(_config(), workdir)
  assert not rundir.is_run_dir(workdir)  # Nothing written, no config.json.


def test_full_disk_stops_within_one_step_and_keeps_the_last_checkpoint(
    small_disk, monkeypatch):
  real_save = checkpointing.CheckpointManager.save

  def fill_then_save(self, step, state, metrics):
    if step == 2:  # The disk fills up after checkpoint 1 is written.
      self.wait()
      _fill(self.directory)
    real_save(self, step, state, metrics)

  monkeypatch.setattr(checkpointing.CheckpointManager, "save", fill_then_save)
  workdir = str(small_disk.parent)
  with pytest.raises(checkpointing.CheckpointSaveError) as raised:
    train.train_and_evaluate(_config(every_steps=1, async_save=True), workdir)
  message = str(raised.value)
  assert "\n" not in message
  assert message.startswith(f"Saving checkpoint 2 to {small_disk} failed: No space "
                            "left on device (ENOSPC)."), message
  assert "the newest intact checkpoint is step 1" in message
  assert "Free space on the disk" in message
  assert rundir.checkpoint_steps(workdir) == [1]
  restored = checkpointing.load_state(workdir)
  assert int(restored["step"]) == 1


def test_nonfinite_advice_fits_the_config():
  config = tiny_config.get_config()
  watch = train.NonFiniteWatch()
  watch.bad = (7, float("inf"), float("nan"))
  default = train.nonfinite_message(watch, config, None, "/run/checkpoints")
  assert "the training loss was inf at step 7" in default
  assert "it was the first step of this start" in default
  assert "no checkpoint had been saved yet" in default
  assert "grad_clip_norm" not in default and "float32" not in default
  with config.unlocked():
    config.optim.grad_clip_norm = 0.0
    config.dtype = "bfloat16"
  watch.last_finite = (6, 2.5)
  risky = train.nonfinite_message(watch, config, 4, "/run/checkpoints")
  assert "the last finite loss was 2.5 at step 6" in risky
  assert "the newest checkpoint is step 4 (/run/checkpoints/4)" in risky
  assert "--config.optim.grad_clip_norm=1.0" in risky
  assert "--config.dtype=float32" in risky


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def test_progress_is_a_live_line_on_a_terminal_and_plain_lines_elsewhere():
  terminal = _Terminal()
  live = train.Progress(total_steps=100, start_step=0, batch_size=64, stream=terminal)
  live.interval = 0.0  # Every update is due (the default is a second).
  for step in range(1, 4):
    live.update(step, 2.0)
  live.close()
  text = terminal.getvalue()
  assert text.count("\r") == 3 and text.count("\n") == 1 and text.endswith("\n")
  assert "train: step 3/100, loss 2.0000" in text and "img/s, ETA " in text

  log = io.StringIO()
  plain = train.Progress(total_steps=100, start_step=0, batch_size=64, stream=log)
  plain.update(1, 2.0)  # Not due yet: plain lines come every 30 s or at log steps.
  plain.update(2, 1.5, commit=True)
  plain.close()
  assert "\r" not in log.getvalue()
  assert log.getvalue().splitlines() == [log.getvalue().strip()]
  assert log.getvalue().startswith("train: step 2/100, loss 1.5000")


def test_default_eval_cadence_gives_a_curve():
  config = ml_collections.ConfigDict({"eval_every_steps": -1})
  assert train.eval_every_steps(config, 176) == 30  # 6 evaluations in 176 steps.
  assert train.eval_every_steps(config, 4) == 1
  config.eval_every_steps = 200  # An explicit value is kept.
  assert train.eval_every_steps(config, 176) == 200
  from vit_edge import recipes  # pylint: disable=g-import-not-at-top
  digits = recipes.get_config("tformer_s")
  assert digits.eval_every_steps <= 0
  evals = [s for s in range(1, 177) if s % train.eval_every_steps(digits, 176) == 0]
  assert 4 <= len(evals) + 1 <= 8  # +1: the last step always evaluates.
