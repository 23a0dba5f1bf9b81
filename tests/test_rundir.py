"""Run directory layout, readers, atomic writers and the compatibility guard."""

import json
import os
import sys

import pytest

from vit_edge import rundir

sys.path.insert(0, os.path.dirname(__file__))
import tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position

_INFO = {"name": "digits", "num_classes": 10, "label_names": list("0123456789"),
         "image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}


_config = tiny_config.make


def _fake_checkpoint(workdir, step, metrics=None):
  directory = os.path.join(workdir, "checkpoints", str(step))
  os.makedirs(os.path.join(directory, "default"))
  if metrics is not None:
    os.makedirs(os.path.join(directory, "metrics"))
    with open(os.path.join(directory, "metrics", "metrics"), "w") as f:
      json.dump(metrics, f)


def test_steps_skip_unfinished_and_foreign_folders(tmp_path):
  workdir = str(tmp_path)
  assert rundir.checkpoint_steps(workdir) == [] and rundir.newest_step(workdir) is None
  for step in (2, 10, 4):
    _fake_checkpoint(workdir, step)
  # An Orbax save in flight and a step folder without a train state do not count.
  os.makedirs(tmp_path / "checkpoints" / "12.orbax-checkpoint-tmp-1700000000")
  os.makedirs(tmp_path / "checkpoints" / "14")
  assert rundir.checkpoint_steps(workdir) == [2, 4, 10]
  assert rundir.checkpoint_steps(str(tmp_path / "checkpoints")) == [2, 4, 10]
  assert rundir.newest_step(workdir) == 10
  assert rundir.checkpoint_path(workdir) == str(tmp_path / "checkpoints" / "10")
  assert rundir.checkpoint_path(workdir, 4) == str(tmp_path / "checkpoints" / "4")
  with pytest.raises(FileNotFoundError, match=r"step 3 .*available steps: \[2, 4, 10\]"):
    rundir.checkpoint_path(workdir, 3)


def test_no_checkpoint_says_how_to_train(tmp_path):
  with pytest.raises(FileNotFoundError, match="Train first"):
    rundir.checkpoint_path(str(tmp_path))


def test_best_step_reads_orbax_metrics(tmp_path):
  workdir = str(tmp_path)
  _fake_checkpoint(workdir, 2, {"eval/top1": 0.5})
  _fake_checkpoint(workdir, 4, {"eval/top1": 0.9})
  _fake_checkpoint(workdir, 6, {"eval/top1": 0.9})  # A tie goes to the newer step.
  _fake_checkpoint(workdir, 8)  # No metrics stored.
  assert rundir.best_step(workdir) == 6
  assert rundir.checkpoint_metrics(workdir, 4) == {"eval/top1": 0.9}
  assert rundir.checkpoint_metrics(workdir, 8) is None
  assert rundir.best_step(workdir, "eval/top5") is None


def test_write_and_load_run_files(tmp_path):
  workdir = str(tmp_path / "run")
  config = _config()
  rundir.write_run_files(workdir, config, _INFO)
  loaded = rundir.load_config(workdir)
  assert loaded.model == "tformer_s"
  assert tuple(loaded.model_overrides.widths) == (8, 16, 24, 32)
  assert rundir.load_dataset_info(workdir) == _INFO
  assert rundir.is_run_dir(workdir)
  # No temporary file is left behind, and the files are readable by everyone.
  assert sorted(os.listdir(workdir)) == ["config.json", "dataset_info.json"]
  assert os.stat(rundir.config_path(workdir)).st_mode & 0o777 == 0o644
  assert rundir.load_config_history(workdir) == []


def test_missing_or_damaged_run_files_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a training run directory"):
    rundir.load_config(str(tmp_path))
  (tmp_path / "config.json").write_text('{"model": "tformer_s", ')
  with pytest.raises(ValueError, match="not valid JSON"):
    rundir.load_config(str(tmp_path))


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  rundir.write_run_files(workdir, _config(), _INFO)
  before = (tmp_path / "config.json").read_text()

  def fail(*args):
    raise OSError("No space left on device")

  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError, match="No space left"):
    rundir.write_run_files(workdir, _config(num_train_steps=8), _INFO)
  assert (tmp_path / "config.json").read_text() == before
  assert sorted(os.listdir(workdir)) == ["config.json", "dataset_info.json"]


def test_compatible_changes_are_returned_and_recorded(tmp_path):
  workdir = str(tmp_path)
  rundir.write_run_files(workdir, _config(), _INFO)
  _fake_checkpoint(workdir, 4)
  new = _config(**{"num_train_steps": 8, "optim.lr": 3e-4, "eval_every_steps": 2,
                   "dtype": "bfloat16", "mesh.fsdp": 2,
                   "model_overrides.drop_path_rate": 0.1})
  changes = rundir.check_run_dir(workdir, new, _INFO)
  assert [c.field for c in changes] == [
      "dtype", "eval_every_steps", "mesh.fsdp", "model_overrides.drop_path_rate",
      "num_train_steps", "optim.lr"]
  assert str(changes[-2]) == "num_train_steps: 4 -> 8"
  rundir.write_run_files(workdir, new, _INFO, changes)
  (record,) = rundir.load_config_history(workdir)
  assert record["step"] == 4 and record["changes"]["num_train_steps"] == [4, 8]
  assert rundir.load_config(workdir).num_train_steps == 8
  # The same config again: nothing to record.
  assert rundir.check_run_dir(workdir, new, _INFO) == []


@pytest.mark.parametrize("updates, fields", [
    ({"model": "edgevit_xxs"}, ["model"]),
    ({"model_overrides.widths": (8, 16, 24, 48)}, ["model_overrides.widths"]),
    ({"image_size": 64}, ["image_size"]),
    ({"dataset": "imagefolder", "data_dir": "/data/cats"}, ["data_dir", "dataset"]),
    ({"ema_decay": 0.999}, ["ema_decay"]),
    ({"optim.grad_clip_norm": 0.0}, ["optim.grad_clip_norm"]),
    ({"qat.enabled": True}, ["qat.enabled"]),
])
def test_conflicts_are_refused_in_one_line(tmp_path, updates, fields):
  workdir = str(tmp_path)
  rundir.write_run_files(workdir, _config(), _INFO)
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(rundir.RunDirConflictError) as e:
    rundir.check_run_dir(workdir, _config(**updates), _INFO)
  message = str(e.value)
  assert "\n" not in message and f"--workdir={workdir}" in message
  for field in fields:
    assert f"{field}: " in message
  assert "new --workdir" in message
  assert isinstance(e.value, ValueError)
  assert (tmp_path / "config.json").read_text() == before


def test_conflict_message_names_values_and_ways_forward():
  with pytest.raises(rundir.RunDirConflictError) as e:
    rundir.check_compatible(_config(), _config(image_size=64), workdir="/runs/a")
  assert str(e.value) == (
      "--workdir=/runs/a holds another experiment (image_size: 32 -> 64): the model "
      "and its checkpoints are built for one resolution. Nothing was written. Train "
      "into a new --workdir, or fine-tune from this run with --workdir=<new dir> "
      "--config.init_from=/runs/a")
  # init_from cannot bridge architectures, so it is not offered for a new model.
  with pytest.raises(rundir.RunDirConflictError) as e:
    rundir.check_compatible(_config(), _config(model="edgevit_xxs"))
  assert "init_from" not in str(e.value)


def test_class_count_and_harmless_spellings():
  saved, new = _config(data_dir="/data/x/"), _config(data_dir="/data/x")
  changes = rundir.check_compatible(saved, new)
  assert [c.field for c in changes] == ["data_dir"]  # Recorded, not refused.
  # Clipping 1.0 -> 2.0 keeps the optimizer state's structure.
  assert rundir.check_compatible(_config(), _config(**{"optim.grad_clip_norm": 2.0}))
  with pytest.raises(rundir.RunDirConflictError, match="num_classes: 10 -> 11"):
    rundir.check_compatible(_config(), _config(), saved_info=_INFO,
                            new_info=dict(_INFO, num_classes=11))


def test_new_config_fields_are_compatible():
  saved = _config().to_dict()
  saved.pop("init_from")  # A run saved before the field existed.
  (change,) = rundir.check_compatible(saved, _config())
  assert (change.field, change.old, change.new) == ("init_from", "<unset>", "")
  saved.pop("qat")  # A float run from before QAT existed resumes without QAT.
  assert [c.field for c in rundir.check_compatible(saved, _config())] == [
      "init_from", "qat.enabled", "qat.layers"]


def test_new_workdir_has_no_changes(tmp_path):
  assert rundir.check_run_dir(str(tmp_path / "fresh"), _config()) == []
