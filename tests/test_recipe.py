"""The compression recipe (python -m vit_edge.compress): stages, resume, table."""

import importlib.util
import json
import os

import ml_collections
import pytest

from tests import tiny_config
from vit_edge import rundir
from vit_edge import train
from vit_edge.compress import recipe as recipe_lib

_CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "compress")


def _tiny_recipe() -> ml_collections.ConfigDict:
  """Tiny DeiTs on digits, 3 steps per training stage, post-training int8."""
  c = recipe_lib.recipe_config("deit_tiny_patch16", "deit_tiny_patch16", "soft_kd", "ptq")
  c.teacher = ml_collections.ConfigDict(
      tiny_config.get_config("model=deit_tiny_patch16").to_dict())
  student = tiny_config.make("model=deit_tiny_patch16", **{
      "objective.name": "soft_kd", "objective.tau": 4.0})
  c.student = ml_collections.ConfigDict(student.to_dict())
  c.prune.update(batches=1, batch_size=8)
  c.bench.update(runs=2, warmup=0, max_eval_examples=32, num_calibration_samples=8)
  c.steps = 3
  return c


class _Killed(RuntimeError):
  pass


def _counting_train(calls, kill_at=None):
  def train_fn(config, workdir):
    stage = os.path.basename(workdir)
    calls.append(stage)
    if stage == kill_at:
      raise _Killed(f"killed in {stage}")
    return train.train_and_evaluate(config, workdir)
  return train_fn


@pytest.fixture(scope="module")
def finished_recipe(tmp_path_factory):
  """A recipe killed in its fine-tune stage, then rerun to the end."""
  workdir = str(tmp_path_factory.mktemp("recipe"))
  first, second = [], []
  with pytest.raises(_Killed):
    recipe_lib.Recipe(_tiny_recipe(), workdir,
                      train_fn=_counting_train(first, kill_at="pruned_ft")).run()
  recipe = recipe_lib.Recipe(_tiny_recipe(), workdir, train_fn=_counting_train(second))
  recipe.run()
  return recipe, first, second


def test_a_killed_recipe_resumes_at_the_first_unfinished_stage(finished_recipe):
  recipe, first, second = finished_recipe
  assert first == ["teacher", "student", "pruned_ft"]
  assert second == ["pruned_ft"]  # teacher, student and pruning were not redone.
  with open(os.path.join(recipe.workdir, recipe_lib.STATE_FILE)) as f:
    state = json.load(f)
  assert list(state["done"]) == ["teacher", "student", "pruned", "pruned_ft", "int8"]
  assert rundir.checkpoint_steps(recipe.dir("pruned_ft"))


def test_stages_are_chained_runs(finished_recipe):
  recipe, _, _ = finished_recipe
  student = rundir.load_config(recipe.dir("student"))
  assert student.teacher.workdir == recipe.dir("teacher")
  pruned = rundir.load_config(recipe.dir("pruned"))
  assert dict(pruned.model_overrides.unit_widths)  # the kept widths are recorded
  finetuned = rundir.load_config(recipe.dir("pruned_ft"))
  assert finetuned.init_from == recipe.dir("pruned")
  assert finetuned.teacher.workdir == recipe.dir("student")  # KD from the unpruned
  done = recipe.state["done"]
  assert done["pruned"]["params_after"] < done["pruned"]["params_before"]
  assert done["int8"]["source"] == recipe.dir("pruned_ft")  # ptq: no QAT stage
  with open(done["int8"]["file"], "rb") as f:
    assert f.read(8)[4:8] == b"TFL3"


def test_the_stage_table_and_pareto_plot(finished_recipe):
  recipe, _, _ = finished_recipe
  rows = recipe_lib.measure(recipe, log=lambda _: None)
  text = recipe_lib.write_table(recipe, rows)
  assert [r.stage for r in rows] == ["teacher", "student", "pruned", "pruned_ft",
                                     "pruned_ft int8 (post-training)"]
  by_stage = {r.stage: r for r in rows}
  assert by_stage["pruned"].params_m < by_stage["student"].params_m
  assert by_stage["pruned"].gmacs < by_stage["student"].gmacs
  assert by_stage["pruned_ft int8 (post-training)"].size_mb < by_stage["pruned_ft"].size_mb
  assert all(r.median_ms > 0 and r.top1 is not None for r in rows)
  assert len(text.splitlines()) == 2 + len(rows)
  with open(os.path.join(recipe.workdir, "pareto.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_changed_config_is_refused_with_the_field(finished_recipe):
  recipe, _, _ = finished_recipe
  changed = _tiny_recipe()
  changed.prune.hidden = 0.25
  with pytest.raises(recipe_lib.RecipeError, match=r"prune\.hidden"):
    recipe_lib.Recipe(changed, recipe.workdir)


@pytest.mark.skipif(importlib.util.find_spec("qwix") is not None,
                    reason="the .[qat] extra is installed")
def test_qat_stage_without_the_extra_says_how_to_install_or_skip(tmp_path):
  config = _tiny_recipe()
  config.qat.epochs = 1.0
  with pytest.raises(recipe_lib.RecipeError, match=r"\.\[qat\].*qat\.epochs=0"):
    recipe_lib.Recipe(config, str(tmp_path)).run()


def test_missing_teacher_run_is_named(tmp_path):
  config = _tiny_recipe()
  config.teacher_workdir = str(tmp_path / "nowhere")
  with pytest.raises(recipe_lib.RecipeError, match="nowhere.*no checkpoint"):
    recipe_lib.Recipe(config, str(tmp_path / "w")).run()


@pytest.mark.parametrize("name", ["uav_edgevit", "uav_mobilevitv2", "deit"])
def test_recipe_configs_load(name):
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  del config_flags
  spec = importlib.util.spec_from_file_location(name, os.path.join(_CONFIGS, name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("steps=5,ptq")
  assert config.steps == 5 and config.qat.epochs == 0  # ptq
  assert config.student.objective.name in ("soft_kd", "hard_token")
  assert config.teacher.dataset == config.student.dataset == "fashion_mnist"
  with pytest.raises(recipe_lib.RecipeError, match="unknown"):
    module.get_config("stepz=5")
