"""A pruned run is an ordinary run: it evaluates, exports and fine-tunes (init_from)
through the standard entry points, rebuilt from the widths in its config.json."""

import json
import os

import jax
import numpy as np
import pytest

from tests import tiny_config
from vit_edge import checkpointing
from vit_edge import export
from vit_edge import rundir
from vit_edge import train
from vit_edge.compress import prune

_CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "compress")


@pytest.fixture(scope="module")
def trained_deit(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("deit"))
  train.train_and_evaluate(tiny_config.get_config("model=deit_tiny_patch16"), workdir)
  return workdir


@pytest.fixture(scope="module")
def pruned_deit(trained_deit, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("deit_pruned") / "run")
  summary = prune.prune_run(trained_deit, out, importance_method="taylor",
                            ratios=prune.Ratios(heads=0.5, hidden=0.5),
                            num_batches=2, batch_size=16)
  return out, summary


def test_pruned_run_records_widths_and_sliced_checkpoint(trained_deit, pruned_deit):
  out, summary = pruned_deit
  config = rundir.load_config(out)
  widths = dict(config.model_overrides.unit_widths)
  # tiny deit: 2 blocks, 2 heads, MLP 128 -> 1 head and 64 hidden units each.
  assert widths == {"blocks_0/attn": 1, "blocks_0/mlp": 64,
                    "blocks_1/attn": 1, "blocks_1/mlp": 64}
  assert config.pruning.importance == "taylor"
  state = checkpointing.load_state(out)
  qkv = state["params"]["blocks_0"]["attn"]["qkv"]["kernel"]
  assert qkv.shape == (32, 3 * 16)
  assert summary["params_after"] < summary["params_before"]
  assert json.load(open(os.path.join(out, "pruning.json")))["widths"] == widths
  # The kept units' weights are the trained ones, not a re-initialisation.
  kept = summary["kept"]["blocks_0/mlp"]
  source = checkpointing.load_state(trained_deit)["params"]["blocks_0"]["mlp"]["fc1"]
  np.testing.assert_array_equal(state["params"]["blocks_0"]["mlp"]["fc1"]["kernel"],
                                np.asarray(source["kernel"])[:, kept])


def test_pruned_run_evaluates_and_exports_with_the_standard_commands(pruned_deit,
                                                                       tmp_path):
  out, _ = pruned_deit
  results = train.evaluate(rundir.load_config(out), out)
  assert 0.0 <= results["eval/top1"] <= 1.0 and results["step"] == 4
  tflite = str(tmp_path / "pruned.tflite")
  report = export.export_from_workdir(out, tflite, num_parity_samples=4,
                                      max_eval_examples=0)
  assert report.max_abs_logit_diff <= report.tolerance
  assert os.path.getsize(tflite) > 0


def test_fine_tune_from_the_pruned_run_with_a_teacher(trained_deit, pruned_deit,
                                                       tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  out, _ = pruned_deit
  spec = importlib.util.spec_from_file_location(
      "finetune_config", os.path.join(_CONFIG_DIR, "finetune.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f"pruned={out},teacher={trained_deit},steps=2")
  assert config.objective.name == "soft_kd"
  workdir = str(tmp_path / "ft")
  trainer = train.Trainer(config, workdir)
  state = trainer.initial_state()
  pruned = checkpointing.load_state(out)["params"]
  np.testing.assert_array_equal(
      jax.device_get(state["params"]["blocks_1"]["mlp"]["fc2"]["kernel"]),
      pruned["blocks_1"]["mlp"]["fc2"]["kernel"])
  with pytest.raises(ValueError, match="pruned=DIR"):
    module.get_config("teacher=x")


def test_cli_names_the_layer_and_the_ratio_that_works(trained_deit, tmp_path, capsys):
  rc = prune.main([f"--workdir={trained_deit}", f"--out={tmp_path / 'p'}",
                   "--importance=l2", "--heads=0.9"])
  assert rc == 2
  err = capsys.readouterr().err
  assert "blocks_0/attn" in err and "ratio <= 0.5" in err
  assert not os.path.exists(tmp_path / "p" / "checkpoints")


def test_mac_budget_finds_the_smallest_ratio_that_fits(trained_deit, tmp_path):
  from vit_edge import complexity  # pylint: disable=g-import-not-at-top
  config = rundir.load_config(trained_deit)
  full = complexity.model_macs(train.build_model(config, 10), config.image_size)
  budget = 0.8 * full
  summary = prune.prune_run(trained_deit, str(tmp_path / "p"), importance_method="l2",
                            ratios=prune.Ratios(hidden=0.1), macs_budget=budget)
  ratio = summary["ratios"]["hidden"]
  assert summary["ratios"]["heads"] == 0.0  # only the kind that was given
  assert summary["macs_after"] <= budget
  pruned = rundir.load_config(str(tmp_path / "p"))
  assert complexity.model_macs(train.build_model(pruned, 10),
                               config.image_size) == summary["macs_after"]
  # One step less pruning would not fit: the ratio is the smallest.
  less = prune.prune_run(trained_deit, str(tmp_path / "q"), importance_method="l2",
                         ratios=prune.Ratios(hidden=round(ratio - 0.01, 2)))
  less_config = rundir.load_config(str(tmp_path / "q"))
  assert complexity.model_macs(train.build_model(less_config, 10),
                               config.image_size) > budget
  del less


def test_a_mac_budget_that_cannot_be_met_names_the_reachable_count(trained_deit, tmp_path):
  with pytest.raises(prune.PruningError, match=r"MAC budget 1,000 cannot be met.*>= [\d,]+"):
    prune.prune_run(trained_deit, str(tmp_path / "p"), importance_method="l2",
                    ratios=prune.Ratios(), macs_budget=1000)
  assert not os.path.exists(tmp_path / "p" / "checkpoints")
