"""DeViT: class decomposition, per-subset data views, the stacked ensemble with
failout, the DEKD objective in one jitted train step, assembly and export."""

import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import tiny_config
from vit_edge import input_pipeline
from vit_edge import models
from vit_edge import objectives
from vit_edge import optimizer
from vit_edge import train
from vit_edge.devit import assemble
from vit_edge.devit import decompose
from vit_edge.devit import ensemble
from vit_edge.devit import stages
from vit_edge.models import vit
from vit_edge.objectives import teacher as teacher_lib

TINY = dict(num_classes=10, num_devices=3, image_size=32, patch_size=16,
            embed_dim=16, depth=1, num_heads=2, teacher_dim=24)


def _images(n=4, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(n, 32, 32, 3), jnp.float32)


# ----------------------------------------------------------------------------------
# Decomposition and data views.


def test_class_subsets_follow_devits_rule():
  # The reference: random.seed(42); random.shuffle(range(C)); chunks i*C//N.
  for num_classes, num_devices in ((10, 2), (10, 4), (100, 6), (7, 7)):
    order = list(range(num_classes))
    random.seed(42)
    random.shuffle(order)
    want = [sorted(order[i * num_classes // num_devices:
                         (i + 1) * num_classes // num_devices])
            for i in range(num_devices)]
    got = decompose.class_subsets(num_classes, num_devices)
    assert [list(s) for s in got] == want
    assert sorted(c for s in got for c in s) == list(range(num_classes))
  assert decompose.class_subsets(10, 2) == ((2, 3, 5, 7, 8), (0, 1, 4, 6, 9))
  assert decompose.class_subsets(10, 2, seed=0) != decompose.class_subsets(10, 2)
  with pytest.raises(ValueError, match="num_devices=11"):
    decompose.class_subsets(10, 11)


def _digits_config(**fields):
  return tiny_config.make(**fields)


def test_class_subset_view_filters_and_relabels_without_copies():
  subset = (2, 5, 7)
  config = _digits_config(class_subset=subset)
  info = input_pipeline.get_info(config)
  _, test_labels = input_pipeline.digits_arrays()["test"]
  _, train_labels = input_pipeline.digits_arrays()["train"]
  assert info.num_classes == 3 and info.label_names == ("2", "5", "7")
  assert info.num_eval_examples == int(np.isin(test_labels, subset).sum())
  assert info.num_train_examples == int(np.isin(train_labels, subset).sum())
  batches = input_pipeline.create_eval_iterator(config, mean=(0.5,) * 3,
                                                std=(0.5,) * 3, local_batch_size=64)
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(np.bincount(labels, minlength=3),
                                [(test_labels == c).sum() for c in subset])
  batch = next(input_pipeline.create_train_iterator(
      config, mean=(0.5,) * 3, std=(0.5,) * 3, local_batch_size=16))
  assert set(batch["label"].tolist()) <= {0, 1, 2}
  with pytest.raises(ValueError, match=r"class_subset=\(3, 12\)"):
    input_pipeline.get_info(_digits_config(class_subset=(3, 12)))


def test_stage_configs_for_any_n():
  for n in (2, 3, 4):
    subsets = decompose.class_subsets(10, n)
    for k in range(n):
      sub = stages.submodel_config(f"n={n},k={k}")
      assert tuple(sub.class_subset) == subsets[k]
      assert sub.objective.name == "hard_token+relation"
      assert sub.teacher.workdir.endswith(f"n{n}/sub_teacher_{k}")
      assert stages.sub_teacher_config(f"n={n},k={k}").init_from.endswith("teacher")
    ens = stages.ensemble_config(f"n={n}")
    assert ens.model_overrides.num_devices == n and ens.objective.name == (
        "hard_token+dekd_feature")
    assert ens.model_overrides.teacher_dim == 384  # deit_small_patch16
  assert stages.submodel_config("n=2,k=0,distilled=1").model == (
      "deit_tiny_distilled_patch16")
  with pytest.raises(ValueError, match="k=INDEX"):
    stages.submodel_config("n=2")
  with pytest.raises(ValueError, match="k=2 is not a device"):
    stages.submodel_config("n=2,k=2")


def test_single_baseline_matches_the_ensemble_size():
  options = stages.parse_arg("n=2")
  assert stages.single_width(options) == (288, 4)
  ensemble_size = stages._param_count(  # pylint: disable=protected-access
      "devit_tiny_patch16", 10, num_devices=2, embed_dim=192, depth=12, num_heads=3,
      teacher_dim=384)
  single = stages.single_config("n=2")
  size = stages._param_count(  # pylint: disable=protected-access
      single.model, 10, **{k: single.model_overrides[k]
                           for k in ("embed_dim", "depth", "num_heads")})
  assert abs(size - ensemble_size) < 0.15 * ensemble_size
  assert single.objective.name == "cross_entropy" and not single.teacher.workdir


def test_pipeline_runs_every_stage_in_order_once(tmp_path, monkeypatch):
  from vit_edge.devit import pipeline  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(pipeline.assemble, "assemble",
                      lambda config: calls.append(("assemble", config.init_from)))
  run = lambda config, workdir: calls.append((config.model, workdir)) or {"eval/top1": 0.5}
  p = pipeline.Pipeline(f"root={tmp_path}", steps=3, run=run)
  p.ensemble_n(2, nofail=True, single=True)
  p.ensemble_n(4, nofail=False, single=False)
  dirs = [c[1].replace(str(tmp_path) + "/", "") for c in calls]
  assert dirs == ["teacher", "n2/sub_teacher_0", "n2/sub_teacher_1", "n2/submodel_0",
                  "n2/submodel_1", "n2/ensemble_init", "n2/ensemble",
                  "n2/ensemble_nofail", "n2/single",  # the teacher is trained once
                  "n4/sub_teacher_0", "n4/sub_teacher_1", "n4/sub_teacher_2",
                  "n4/sub_teacher_3", "n4/submodel_0", "n4/submodel_1",
                  "n4/submodel_2", "n4/submodel_3", "n4/ensemble_init", "n4/ensemble"]
  assert pipeline.main(["--n=0"]) == 2
  calls.clear()
  p = pipeline.Pipeline(f"root={tmp_path},sub_teachers=0", steps=3, run=run)
  p.ensemble_n(2, nofail=False, single=False)
  dirs = [c[1].replace(str(tmp_path) + "/", "") for c in calls]
  assert dirs == ["teacher", "n2_no_sub_teachers/submodel_0",
                  "n2_no_sub_teachers/submodel_1", "n2_no_sub_teachers/ensemble_init",
                  "n2_no_sub_teachers/ensemble"]


def test_without_sub_teachers_submodels_distil_from_the_teacher_on_their_classes():
  subsets = decompose.class_subsets(10, 2)
  for k in range(2):
    sub = stages.submodel_config(f"n=2,k={k},sub_teachers=0,root=/r")
    assert sub.teacher.workdir == "/r/teacher"
    assert tuple(sub.teacher.classes) == tuple(sub.class_subset) == subsets[k]
  with_sub = stages.submodel_config("n=2,k=0,root=/r")
  assert with_sub.teacher.workdir == "/r/n2/sub_teacher_0"
  assert tuple(with_sub.teacher.classes) == ()


def test_a_seed_repeats_every_stage_but_the_teacher_in_its_own_directories():
  seeded = {"sub_teacher": stages.sub_teacher_config("n=2,k=1,seed=3,root=/r"),
            "submodel": stages.submodel_config("n=2,k=1,seed=3,root=/r"),
            "ensemble": stages.ensemble_config("n=2,seed=3,root=/r"),
            "single": stages.single_config("n=2,seed=3,root=/r")}
  assert {name: c.seed for name, c in seeded.items()} == dict.fromkeys(seeded, 3)
  assert stages.teacher_config("n=2,seed=3").seed == stages.teacher_config("n=2").seed
  assert seeded["sub_teacher"].init_from == "/r/teacher"
  assert seeded["submodel"].teacher.workdir == "/r/n2_seed3/sub_teacher_1"
  assert seeded["ensemble"].init_from == "/r/n2_seed3/ensemble_init"
  assert seeded["ensemble"].devit.submodel_workdirs == ["/r/n2_seed3/submodel_0",
                                                        "/r/n2_seed3/submodel_1"]
  assert stages.run_dirs(stages.parse_arg("root=/r"))["single"] == "/r/n2/single"


def test_a_longer_trained_teacher_has_its_own_run_and_students():
  default = stages.teacher_config("root=/r")
  stronger = stages.teacher_config("root=/r,teacher_epochs=8")
  assert stronger.num_epochs == 8.0 != default.num_epochs
  sub_teacher = stages.sub_teacher_config("n=2,k=0,root=/r,teacher_epochs=8")
  assert sub_teacher.init_from == "/r/teacher_e8"
  assert sub_teacher.num_epochs == stages.sub_teacher_config("n=2,k=0").num_epochs
  ensemble = stages.ensemble_config("n=2,root=/r,teacher_epochs=8,seed=1")
  assert ensemble.teacher.workdir == "/r/teacher_e8"
  assert ensemble.init_from == "/r/n2_teacher_e8_seed1/ensemble_init"
  single = stages.single_config("n=2,root=/r,teacher_epochs=8")
  assert single.num_epochs == stages.single_config("n=2").num_epochs
  with pytest.raises(ValueError, match="teacher_epochs='many'"):
    stages.parse_arg("teacher_epochs=many")


# ----------------------------------------------------------------------------------
# The stacked ensemble.


def test_ensemble_slices_are_the_device_models_and_failout_substitutes():
  model = ensemble.DeViTEnsemble(**TINY, distilled=True, failout_rate=0.5)
  x = _images(8)
  variables = model.init(jax.random.key(0), x[:1])
  assert variables["params"]["submodels"]["pos_embed"].shape[0] == 3
  device_model = model.submodel()
  # Device 1 absent: its tokens are replaced, so its input no longer matters.
  absent = jnp.ones((8, 3)).at[:, 1].set(0.0)

  @jax.jit
  def run(variables, x):  # One compilation for every check below.
    apply = functools.partial(model.apply, variables)
    logits, aux = apply(x)
    tokens = apply(x, method="device_tokens")
    per_device = [device_model.apply(
        {"params": ensemble.submodel_params(variables["params"], k)}, x)[1]["tokens"]
                  for k in range(3)]
    fused, _ = apply(tokens, None, method="fuse")
    without, without_aux = apply(tokens, absent, method="fuse")
    garbage, _ = apply(tokens.at[:, 1].set(123.0), absent, method="fuse")
    trained, trained_aux = apply(x, True, rngs={"dropout": jax.random.key(3)})
    return dict(logits=logits, aux=aux, tokens=tokens, per_device=per_device,
                fused=fused, without=without, without_aux=without_aux,
                garbage=garbage, trained=trained, trained_aux=trained_aux)

  out = run(variables, x)
  logits, aux, tokens = out["logits"], out["aux"], out["tokens"]
  assert logits.shape == (8, 10) and aux["fused_tokens"].shape == (8, 2, 24)
  assert tokens.shape == (8, 3, 2, 16)
  for k in range(3):  # Slice k of the stack is a plain ViT: what device k runs.
    np.testing.assert_allclose(tokens[:, k], out["per_device"][k][:, :2], atol=1e-5)
  np.testing.assert_allclose(out["fused"], logits, atol=1e-5)
  np.testing.assert_allclose(logits, (aux["logits_cls"] + aux["logits_dist"]) / 2,
                             atol=1e-6)
  assert float(aux["presence"].min()) == 1.0  # No failout outside training.
  # Failout's substitution: the learned missing token stands in for device 1.
  np.testing.assert_allclose(out["without"], out["garbage"], atol=1e-6)
  missing = variables["params"]["missing_token"]
  np.testing.assert_allclose(out["without_aux"]["device_tokens"][:, 1],
                             jnp.broadcast_to(missing[1], (8, 2, 16)), atol=1e-7)
  assert not np.allclose(out["without"], logits)
  # In training, failout drops devices at random with the same substitution.
  presence = np.asarray(out["trained_aux"]["presence"])
  assert 0 < presence.mean() < 1
  want = jax.jit(lambda v, t, p: model.apply(v, t, p, method="fuse")[0])(
      variables, tokens, jnp.asarray(presence))
  np.testing.assert_allclose(out["trained"], want, atol=1e-5)


def test_registered_model_builds_any_n():
  for n in (2, 4):
    model = models.create_model("devit_tiny_patch16", num_classes=10, num_devices=n,
                                image_size=32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert shapes["params"]["submodels"]["cls_token"].shape == (n, 1, 1, 192)
    assert shapes["params"]["feature_match_cls"]["kernel"].shape == (n * 192, 1024)


def test_one_jitted_dekd_train_step_moves_every_part():
  """hard_token + dekd_feature with a frozen teacher, through train.train_step."""
  config = tiny_config.make(**{"optim.lr": 1e-2})
  student = ensemble.DeViTEnsemble(**TINY, distilled=True, failout_rate=0.3)
  teacher_model = vit.VisionTransformer(num_classes=10, image_size=32, patch_size=16,
                                        embed_dim=24, depth=1, num_heads=1)
  teacher_variables = teacher_model.init(jax.random.key(9), _images(1))
  teacher = teacher_lib.Teacher(
      model=teacher_model, num_classes=10, image_size=32, mean=(0.5,) * 3,
      std=(0.5,) * 3, student_image_size=32, student_mean=(0.5,) * 3,
      student_std=(0.5,) * 3)
  terms = [objectives.TERMS[n](config.objective) for n in ("hard_token",
                                                           "dekd_feature")]
  objective = objectives.Objective(terms, teacher)
  for term in terms:
    term.adapt_teacher(teacher_model)
  objective.bind_shapes(student, 32, teacher_variables)
  tx, schedule = optimizer.create_optimizer(config.optim, 10)
  state = train.create_state(jax.random.key(0), model=student, objective=objective,
                             tx=tx, image_size=32, ema=False)
  metrics_class = train.train_metrics_class(objective.metric_names())
  step = jax.jit(functools.partial(
      train.train_step, model=student, objective=objective, tx=tx, schedule=schedule,
      config=config, num_classes=10, metrics_class=metrics_class))
  batch = {"image": _images(8), "label": jnp.arange(8) % 10}
  before = jax.tree_util.tree_map(np.asarray, state["params"])
  for _ in range(2):  # The first step has learning rate 0 (warm-up from 0).
    state, metrics = step(state, batch, teacher_variables)
  values = metrics.compute()
  assert np.isfinite(values["loss"]) and values["dekd_feature_loss"] > 0
  assert values["hard_token_loss"] > 0
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), before,
                                 jax.tree_util.tree_map(np.asarray, state["params"]))
  for part in ("submodels", "feature_match_cls", "feature_match_dist", "head",
               "head_dist"):
    assert max(jax.tree_util.tree_leaves(moved[part])) > 0, part
  # Every device's backbone is trained (the stack moves in each slice).
  qkv = before["submodels"]["blocks_0"]["attn"]["qkv"]["kernel"]
  new_qkv = np.asarray(state["params"]["submodels"]["blocks_0"]["attn"]["qkv"]["kernel"])
  assert all(np.abs(new_qkv[k] - qkv[k]).max() > 0 for k in range(3))


def test_dekd_feature_names_a_width_mismatch():
  config = tiny_config.make()
  term = objectives.TERMS["dekd_feature"](config.objective)
  student_aux = {"fused_tokens": jax.ShapeDtypeStruct((1, 1, 24), jnp.float32)}
  with pytest.raises(ValueError, match="teacher_dim=32"):
    term.init_params(None, student_aux,
                     {"tokens": jax.ShapeDtypeStruct((1, 5, 32), jnp.float32)})
  with pytest.raises(ValueError, match="DeViT ensemble student"):
    term.init_params(None, {"pre_logits": None}, {"tokens": None})


def test_assemble_stacks_trained_submodels_and_refuses_misfits():
  model = ensemble.DeViTEnsemble(**TINY)
  shapes = jax.eval_shape(model.init, jax.random.key(0), _images(1))["params"]
  rng = np.random.RandomState(0)
  params, other = (jax.tree_util.tree_map(
      lambda s: rng.randn(*s.shape).astype(np.float32), shapes) for _ in range(2))
  # Three "trained" device models: another parameter set's slices, with heads
  # (which assembly drops, as DeViT drops the sub-models' heads).
  subs = [dict(ensemble.submodel_params(other, k),
               head={"kernel": np.zeros((16, 4)), "bias": np.zeros(4)})
          for k in range(3)]
  stacked = assemble.stack_submodels(params, subs, ["a", "b", "c"])
  for k in range(3):
    np.testing.assert_array_equal(stacked["submodels"]["pos_embed"][k],
                                  subs[k]["pos_embed"])
  np.testing.assert_array_equal(stacked["head"]["kernel"], params["head"]["kernel"])
  wide = dict(subs[2], pos_embed=np.zeros((1, 5, 32)))
  with pytest.raises(ValueError, match="Sub-model 'c'.*pos_embed.*width"):
    assemble.stack_submodels(params, subs[:2] + [wide], ["a", "b", "c"])
