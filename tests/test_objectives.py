"""Objectives: each loss against a direct numpy computation; the teacher stays frozen
and out of the optimiser state and checkpoints; a distillation run resumes after
SIGKILL to the same result."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_edge import checkpointing
from vit_edge import objectives
from vit_edge import train
from vit_edge.objectives import losses
from vit_edge.objectives import teacher as teacher_lib
from vit_edge.objectives import terms

sys.path.insert(0, os.path.dirname(__file__))
import sigkill  # pylint: disable=g-import-not-at-top,wrong-import-position
import tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)


def _log_softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _ce(logits, targets):
  return float(np.mean(-(targets * _log_softmax(logits)).sum(-1)))


def _one_hot(labels, n):
  return np.eye(n, dtype=np.float32)[labels]


def _objective_config(**updates):
  c = objectives.default_config().objective
  c.update(updates)
  return c


def test_soft_kd_matches_numpy():
  zs, zt = RNG.normal(size=(4, 5)), RNG.normal(size=(4, 5))
  tau = 3.0
  log_ps, log_pt = _log_softmax(zs / tau), _log_softmax(zt / tau)
  expected = tau ** 2 * np.mean((np.exp(log_pt) * (log_pt - log_ps)).sum(-1))
  assert float(losses.soft_kd(jnp.asarray(zs), jnp.asarray(zt), tau)) == pytest.approx(
      expected, rel=1e-5)


def test_soft_kd_term_mixes_label_ce_by_alpha():
  zs, zt = RNG.normal(size=(6, 4)), RNG.normal(size=(6, 4))
  y = _one_hot(RNG.integers(0, 4, 6), 4)
  term = terms.SoftKD(_objective_config(alpha=0.3, tau=2.0))
  out = terms.StepOutputs(jnp.asarray(zs), {}, jnp.asarray(y), jnp.asarray(zt), {})
  loss, metrics = term(out, {})
  kd = float(losses.soft_kd(jnp.asarray(zs), jnp.asarray(zt), 2.0))
  assert float(loss) == pytest.approx(0.7 * _ce(zs, y) + 0.3 * kd, rel=1e-5)
  assert float(metrics["kd_kl"]) == pytest.approx(kd, rel=1e-6)


def test_hard_token_uses_both_heads_of_a_distilled_deit():
  z_cls, z_dist, zt = (RNG.normal(size=(5, 3)) for _ in range(3))
  y = _one_hot(RNG.integers(0, 3, 5), 3)
  aux = {"logits_cls": jnp.asarray(z_cls), "logits_dist": jnp.asarray(z_dist)}
  term = terms.HardToken(_objective_config(alpha=0.5))
  out = terms.StepOutputs(jnp.asarray((z_cls + z_dist) / 2), aux, jnp.asarray(y),
                          jnp.asarray(zt), {})
  loss, _ = term(out, {})
  hard = _one_hot(zt.argmax(-1), 3)
  expected = 0.5 * _ce(z_cls, y) + 0.5 * _ce(z_dist, hard)
  assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_feature_term_learns_a_projection_when_shapes_differ():
  student_aux = {"pre_logits": jax.ShapeDtypeStruct((2, 3, 8), jnp.float32)}
  teacher_aux = {"pre_logits": jax.ShapeDtypeStruct((2, 5, 4), jnp.float32)}
  term = terms.Feature(_objective_config())
  params = term.init_params(jax.random.key(0), student_aux, teacher_aux)
  assert params["token_kernel"].shape == (3, 5) and params["kernel"].shape == (8, 4)
  s, t = RNG.normal(size=(2, 3, 8)), RNG.normal(size=(2, 5, 4))
  out = terms.StepOutputs(None, {"pre_logits": jnp.asarray(s)}, None, None,
                          {"pre_logits": jnp.asarray(t)})
  loss, _ = term(out, params)
  p = {k: np.asarray(v) for k, v in params.items()}
  projected = np.einsum("bnd,nm->bmd", s, p["token_kernel"]) @ p["kernel"] + p["bias"]
  assert float(loss) == pytest.approx(np.mean((projected - t) ** 2), rel=1e-5)


def test_feature_term_is_plain_mse_for_equal_shapes_and_names_bad_keys():
  shapes = {"pre_logits": jax.ShapeDtypeStruct((2, 6), jnp.float32)}
  term = terms.Feature(_objective_config())
  assert term.init_params(jax.random.key(0), shapes, shapes) == {}
  bad = terms.Feature(_objective_config(feature={"student": "nope",
                                                 "teacher": "pre_logits",
                                                 "weight": 1.0}))
  with pytest.raises(ValueError, match=r"feature.student='nope'.*pre_logits"):
    bad.init_params(jax.random.key(0), shapes, shapes)


def _relation_numpy(xs, xt):
  def rel(x):
    b, h, n, d = x.shape
    flat = x.transpose(0, 2, 1, 3).reshape(b, n, h * d)
    return _log_softmax(flat @ flat.transpose(0, 2, 1) / np.sqrt(d))
  rs, rt = rel(xs), rel(xt)
  return np.mean((np.exp(rt) * (rt - rs)).sum((-2, -1)))


def test_relation_kl_matches_numpy_across_widths():
  xs = RNG.normal(size=(2, 2, 5, 4))   # student: 2 heads of 4
  xt = RNG.normal(size=(2, 3, 5, 8))   # teacher: 3 heads of 8
  got = float(losses.relation_kl(jnp.asarray(xs), jnp.asarray(xt)))
  assert got == pytest.approx(_relation_numpy(xs, xt), rel=1e-5)
  total, parts = losses.qkv_relation(
      {k: jnp.asarray(xs) for k in "qkv"}, {k: jnp.asarray(xt) for k in "qkv"},
      (0.2, 0.1, 0.3))
  assert float(total) == pytest.approx(0.6 * got, rel=1e-5)
  assert set(parts) == {"q", "k", "v"}


def test_relation_term_relates_patch_tokens_when_prefixes_differ():
  from vit_edge import models  # pylint: disable=g-import-not-at-top
  tiny = dict(embed_dim=16, depth=4, num_heads=2, image_size=32, num_classes=3)
  student = models.create_model("deit_tiny_distilled_patch16", **tiny)
  teacher = models.create_model("deit_tiny_patch16", **tiny)
  term = terms.Relation(_objective_config())
  student, teacher = term.adapt_student(student), term.adapt_teacher(teacher)
  assert student.qkv_block == 1 and teacher.qkv_block == 1  # depth // 2 - 1
  x = jnp.asarray(RNG.normal(size=(2, 32, 32, 3)), jnp.float32)
  _, s_aux = student.apply(student.init(jax.random.key(0), x), x)
  _, t_aux = teacher.apply(teacher.init(jax.random.key(1), x), x)
  out = terms.StepOutputs(None, s_aux, None, None, t_aux)
  loss, metrics = term(out, {})
  expected = sum(w * _relation_numpy(np.asarray(s_aux[k])[:, :, 2:],
                                     np.asarray(t_aux[k])[:, :, 1:])
                 for w, k in zip((0.2, 0.1, 0.3), "qkv"))
  # Random small ViTs give near-uniform relations: a KL of ~1e-4, compared to
  # float32 rounding.
  assert float(loss) == pytest.approx(expected, rel=1e-3, abs=1e-7)
  assert float(metrics["relation_loss"]) == float(loss)


def test_relation_needs_a_vit():
  from vit_edge import models  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="needs a ViT/DeiT student"):
    terms.Relation(_objective_config()).adapt_student(
        models.create_model("edgevit_xxs", num_classes=3))


def test_logit_map_mse_upsamples_the_smaller_map():
  s, t = RNG.normal(size=(1, 4, 4, 3)), RNG.normal(size=(1, 8, 8, 3))
  term = terms.LogitMap(_objective_config(logit_map_weight=2.0))
  loss, _ = term(terms.StepOutputs(jnp.asarray(s), {}, None, jnp.asarray(t), {}), {})
  up = np.asarray(jax.image.resize(jnp.asarray(s), (1, 8, 8, 3), "bilinear"))
  assert float(loss) == pytest.approx(2.0 * np.mean((up - t) ** 2), rel=1e-5)
  flat, _ = term(terms.StepOutputs(jnp.asarray(s[:, 0, 0]), {}, None,
                                   jnp.asarray(t[:, 0, 0]), {}), {})
  assert float(flat) == pytest.approx(2.0 * np.mean((s[:, 0, 0] - t[:, 0, 0]) ** 2),
                                      rel=1e-5)


def test_objective_names_are_checked():
  with pytest.raises(ValueError, match=r"unknown term\(s\) \['nope'\].*hard_token"):
    objectives.parse_names("cross_entropy+nope")
  assert objectives.parse_names("hard_token + relation") == ["hard_token", "relation"]


def test_teacher_objective_without_teacher_is_an_error(tmp_path):
  config = _config(**{"objective.name": "soft_kd"})
  with pytest.raises(ValueError, match="--config.teacher.workdir"):
    train.Trainer(config, str(tmp_path))


_config = tiny_config.make


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A tiny TFormer trained 4 steps: another family, normalisation and resolution."""
  workdir = tmp_path_factory.mktemp("teacher")
  train.train_and_evaluate(_config(image_size=64), str(workdir))
  return str(workdir)


_STUDENT = {"model_overrides.embed_dim": 16, "model_overrides.depth": 2,
            "model_overrides.num_heads": 2}


def test_teacher_is_frozen_and_not_checkpointed(tmp_path, teacher_dir):
  # Mixup and cutmix on: the teacher sees the same mixed images, CE the mixed targets.
  config = _config("model=deit_tiny_distilled_patch16", **_STUDENT,
                   **{"objective.name": "hard_token+feature",
                      "teacher.workdir": teacher_dir, "aug.mixup_alpha": 0.8,
                      "aug.cutmix_alpha": 1.0})
  trainer = train.Trainer(config, str(tmp_path))
  assert trainer.objective.teacher.image_size == 64  # Its own view of the batch.
  teacher_before = jax.tree_util.tree_map(np.asarray, trainer.teacher_variables)
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results["step"] == 4
  saved = checkpointing.load_state(str(tmp_path))
  # The checkpoint holds the student and its feature projection (16-wide student
  # pre-logits -> the teacher's 32), and nothing of the teacher.
  assert saved["objective_params"]["feature"]["kernel"].shape == (16, 32)
  assert set(saved) == {"step", "params", "objective_params", "batch_stats",
                        "opt_state", "ema_params"}
  n_student = sum(np.size(x) for x in jax.tree_util.tree_leaves(saved["params"]))
  n_objective = sum(np.size(x) for x in
                    jax.tree_util.tree_leaves(saved["objective_params"]))
  n_teacher = sum(np.size(x) for x in jax.tree_util.tree_leaves(teacher_before))
  n_opt = sum(np.size(x) for x in jax.tree_util.tree_leaves(saved["opt_state"]))
  # Adam's mu and nu over student + projection, plus step counters; a teacher in
  # the optimiser would add 2 * n_teacher.
  assert n_teacher > 100
  assert 0 < n_opt - 2 * (n_student + n_objective) <= 4
  # Evaluation needs no teacher: the run evaluates after its teacher is gone.
  without_teacher = config.copy_and_resolve_references()
  with without_teacher.unlocked():
    without_teacher.teacher.workdir = str(tmp_path / "no_such_teacher")
  again = train.evaluate(without_teacher, str(tmp_path))
  assert again["step"] == 4
  assert again["eval/top1"] == pytest.approx(results["eval/top1"], abs=1e-6)
  # The teacher's weights are what its own directory holds, unchanged.
  from_disk = train.load_trained_model(teacher_dir)[1]
  for a, b in zip(jax.tree_util.tree_leaves(from_disk),
                  jax.tree_util.tree_leaves(teacher_before)):
    np.testing.assert_array_equal(np.asarray(a), b)


def _main_cmd(workdir, *extra):
  return [sys.executable, "-m", "vit_edge.main",
          f"--config={os.path.join(REPO, 'tests', 'tiny_config.py')}:"
          "model=deit_tiny_patch16", f"--workdir={workdir}", *extra]


def test_distillation_resumes_after_sigkill(tmp_path, teacher_dir):
  flags = ["--config.num_train_steps=8", "--config.eval_every_steps=8",
           "--config.objective.name=soft_kd", "--config.objective.tau=2.0",
           f"--config.teacher.workdir={teacher_dir}"]
  sigkill.assert_resume_matches_uninterrupted(_main_cmd, tmp_path, flags, kill_at=4,
                                              final_step=8, cwd=REPO)


def test_teacher_classes_keep_the_students_logit_columns(teacher_dir):
  full, variables = teacher_lib.load_teacher(
      teacher_dir, student_image_size=32, student_mean=(0.5,) * 3,
      student_std=(0.5,) * 3)
  subset, _ = teacher_lib.load_teacher(
      teacher_dir, student_image_size=32, student_mean=(0.5,) * 3,
      student_std=(0.5,) * 3, classes=(7, 2, 5))
  images = jnp.asarray(np.random.RandomState(0).randn(3, 32, 32, 3), jnp.float32)
  all_logits, _ = full(variables, images)
  logits, _ = subset(variables, images)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(all_logits)[:, [7, 2, 5]])
  with pytest.raises(ValueError, match=r"classes \[10\].*0\.\.9"):
    teacher_lib.load_teacher(teacher_dir, student_image_size=32,
                             student_mean=(0.5,) * 3, student_std=(0.5,) * 3,
                             classes=(1, 10))
