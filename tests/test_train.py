"""End-to-end training: one-step runs, resume, multi-device equivalence, bad input."""

import glob
import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from vit_edge import checkpointing
from vit_edge import input_pipeline
from vit_edge import rundir
from vit_edge import train

sys.path.insert(0, os.path.dirname(__file__))
import sigkill  # pylint: disable=g-import-not-at-top,wrong-import-position
import tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**updates):
  return tiny_config.make(updates.pop("arg", None), **updates)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


def test_train_digits_end_to_end(tmp_path):
  results = train.train_and_evaluate(_config(), str(tmp_path))
  assert results["step"] == 4
  assert 0.0 <= results["eval/top1"] <= 1.0 and results["eval/top5"] >= results["eval/top1"]
  assert os.path.isdir(tmp_path / "checkpoints" / "4")
  assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
  info = json.loads((tmp_path / "dataset_info.json").read_text())
  assert info["num_classes"] == 10 and info["image_size"] == 32
  # Evaluating the saved checkpoint reproduces the final in-training evaluation.
  again = train.evaluate(_config(), str(tmp_path))
  assert again["step"] == 4
  assert again["eval/top1"] == pytest.approx(results["eval/top1"], abs=1e-6)


def test_train_mock_tfds_one_step(tmp_path, write_tfds_metadata):
  data_dir = tmp_path / "tfds"
  write_tfds_metadata(data_dir, "cifar10", {"train": 32, "test": 32})
  config = _config(dataset="cifar10", data_dir=str(data_dir), num_train_steps=1,
                   eval_every_steps=1)
  with tfds.testing.mock_data(num_examples=32, data_dir=str(data_dir)):
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["step"] == 1 and np.isfinite(results["eval/loss"])


def test_sigkill_and_restart_matches_uninterrupted(tmp_path):
  steps = ["--config.num_train_steps=8", "--config.eval_every_steps=8"]
  sigkill.assert_resume_matches_uninterrupted(_main_cmd, tmp_path, steps, kill_at=4,
                                              final_step=8, cwd=REPO, timeout=600)


def _write_image_folder(root, num_classes=3, per_class=4, size=16):
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for c in range(num_classes):
      os.makedirs(root / split / f"class_{c}")
      for i in range(per_class):
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / f"class_{c}" / f"{i}.png")


def test_init_from_resizes_pos_embed_and_reinitialises_head(tmp_path):
  pretrained = tmp_path / "pretrained"
  vit = dict(arg="model=deit_tiny_patch16", num_train_steps=2, eval_every_steps=2)
  train.train_and_evaluate(_config(**vit), str(pretrained))

  folder = tmp_path / "folder"
  _write_image_folder(folder)
  config = _config(dataset="imagefolder", data_dir=str(folder), image_size=48,
                   batch_size=8, init_from=str(pretrained), **vit)
  trainer = train.Trainer(config, str(tmp_path / "finetune"))
  state = trainer.initial_state()
  old = checkpointing.load_params(str(pretrained))
  new = state["params"]
  np.testing.assert_array_equal(np.asarray(new["blocks_0"]["attn"]["qkv"]["kernel"]),
                                old["blocks_0"]["attn"]["qkv"]["kernel"])
  assert old["pos_embed"].shape == (1, 1 + 4, 32)
  assert new["pos_embed"].shape == (1, 1 + 9, 32)
  np.testing.assert_array_equal(np.asarray(new["pos_embed"][:, 0]),
                                old["pos_embed"][:, 0])  # Class token's entry kept.
  assert new["head"]["kernel"].shape == (32, 3)
  # Fine-tuning runs on the 3-class folder at the new resolution.
  results = train.train_and_evaluate(config, str(tmp_path / "finetune"))
  assert results["step"] == 2


def _one_step(num_devices, fsdp=1, model="tformer_s", dtype="float32"):
  config = _config(arg=f"model={model}", dtype=dtype,
                   **{"mesh.num_devices": num_devices, "mesh.fsdp": fsdp})
  trainer = train.Trainer(config, "/tmp/unused")
  it = input_pipeline.create_train_iterator(
      config, mean=trainer.model_info.mean, std=trainer.model_info.std,
      local_batch_size=trainer.local_batch)
  from vit_edge import sharding  # pylint: disable=g-import-not-at-top
  state = trainer.fresh_state()
  with jax.set_mesh(trainer.mesh):
    state, metrics = trainer.train_step(state, sharding.make_global_batch(next(it),
                                                                          trainer.mesh))
  return float(metrics.compute()["loss"]), _flat(state["params"]), _flat(
      state["batch_stats"]) if state["batch_stats"] else None


@pytest.mark.parametrize("model,fsdp", [("tformer_s", 1), ("tformer_s", 2),
                                        ("edgevit_xxs", 1)])
def test_eight_devices_match_one_device(model, fsdp):
  """Same batch, same init: loss, updated params and BN statistics agree.

  Tolerance: 1e-5 relative on the loss, 1e-5 absolute on parameters (float32
  reductions are split differently across devices).
  """
  assert jax.device_count() == 8, "tests/conftest.py asks for 8 CPU devices"
  loss1, params1, stats1 = _one_step(1, model=model)
  loss8, params8, stats8 = _one_step(8, fsdp=fsdp, model=model)
  assert loss8 == pytest.approx(loss1, rel=1e-5)
  np.testing.assert_allclose(params8, params1, atol=1e-5)
  if stats1 is not None:
    np.testing.assert_allclose(stats8, stats1, atol=1e-5)


def test_bf16_compute_keeps_float32_params():
  loss_bf16, params_bf16, _ = _one_step(1, dtype="bfloat16")
  loss_f32, _, _ = _one_step(1)
  assert params_bf16.dtype == np.float32
  assert np.isfinite(loss_bf16) and loss_bf16 == pytest.approx(loss_f32, rel=0.05)


def test_batch_size_not_divisible_by_devices(tmp_path):
  with pytest.raises(ValueError, match=r"batch_size=12 does not divide by the 8 devices"):
    train.train_and_evaluate(_config(batch_size=12), str(tmp_path))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  """NaN at step 3 while step 2's checkpoint is still being written (async)."""
  real_iterator = input_pipeline.create_train_iterator

  def poisoned(*args, **kwargs):
    for i, batch in enumerate(real_iterator(*args, **kwargs)):
      if i >= 2:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      yield batch

  monkeypatch.setattr(input_pipeline, "create_train_iterator", poisoned)
  config = _config(**{"checkpoint.every_steps": 1, "checkpoint.async_save": True})
  with pytest.raises(FloatingPointError) as raised:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(raised.value)
  assert "the training loss was nan at step 3" in message, message
  assert re.search(r"the last finite loss was [0-9.]+ at step 2", message), message
  assert "the newest checkpoint is step 2" in message, message
  # Clipping is on and the dtype float32 in this config: no advice to turn them on.
  assert "lower the learning rate" in message
  assert "grad_clip_norm" not in message and "float32" not in message
  assert rundir.checkpoint_steps(str(tmp_path)) == [1, 2]
  restored = checkpointing.load_state(str(tmp_path))
  assert int(restored["step"]) == 2 and np.all(np.isfinite(_flat(restored["params"])))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _main_cmd(workdir, *extra):
  return [sys.executable, "-m", "vit_edge.main",
          f"--config={os.path.join(REPO, 'tests', 'tiny_config.py')}",
          f"--workdir={workdir}", *extra]


def test_unknown_config_field_is_an_error(tmp_path):
  proc = subprocess.run(_main_cmd(tmp_path, "--config.no_such_field=1"),
                        capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode != 0
  assert "no_such_field" in proc.stderr


def test_two_processes_on_loopback_train_and_checkpoint(tmp_path):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      _main_cmd(tmp_path, f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2", f"--process_id={i}", "--num_cpu_devices=2"),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
           for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  results = json.loads(outputs[0][0].strip().splitlines()[-1])
  assert results["step"] == 4
  assert os.path.isdir(tmp_path / "checkpoints" / "4")
