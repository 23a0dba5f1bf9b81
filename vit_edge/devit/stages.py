"""The four DeViT training stages as configs (used by configs/devit/*.py).

Stage order and default run directories (``workdir/devit``; every path is a
config field, so ``--config.teacher.workdir=...`` etc. override them)::

    teacher            the large model on all classes        workdir/devit/teacher
    sub_teacher k      it, fine-tuned on class subset k      workdir/devit/n{N}/sub_teacher_{k}
    submodel k         small ViT distilled from sub-teacher  workdir/devit/n{N}/submodel_{k}
                       (hard-token + Q/K/V relation at the middle block)
    ensemble           the N sub-models stacked, fused, trained jointly with DEKD
                       workdir/devit/n{N}/ensemble (initialised from the sub-models
                       by ``python -m vit_edge.devit.assemble``)
    single             baseline: one small ViT with the ensemble's parameter count,
                       plain cross-entropy                workdir/devit/n{N}/single

Arguments (comma-separated ``key=value``; big_vision style):
``n`` devices (default 2), ``k`` the device of a per-device stage, ``classes``
(default 10, Fashion-MNIST), ``teacher`` (default deit_small_patch16),
``width`` / ``depth`` / ``heads`` of the sub-models (DeiT-Ti: 192 / 12 / 3),
``distilled`` (1: DeDeiT sub-models with a distillation token), ``failout``
(ensemble drop probability per device, default 0.25), ``root`` (default
workdir/devit), ``teacher_depth`` (blocks of the teacher and sub-teachers; default
the registered model's, e.g. 12; fewer for quick runs), ``sub_teachers`` (1, the
paper's default; 0: no sub-teachers, each sub-model distils from the full-data
teacher's logits restricted to its classes; run directories ``n{N}_no_sub_teachers``),
``seed`` (default 0: the training seed of every stage but the teacher, which all
seeds share; another seed runs in ``n{N}_seed{S}``, for the seed-to-seed spread),
``teacher_epochs`` (default: the teacher recipe's; more for a stronger teacher, as
DeViT's is a pretrained ViT-B: it trains in ``teacher_e{E}`` and every later stage
in ``n{N}_teacher_e{E}``; sub-teachers, sub-models, ensemble and single keep their
own recipes' epochs).

Example::

    config = ensemble_config("n=4,distilled=1")
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from vit_edge import models
from vit_edge import recipes
from vit_edge.devit import decompose

_DEFAULTS = {"n": "2", "k": "", "classes": "10", "teacher": "deit_small_patch16",
             "width": "192", "depth": "12", "heads": "3", "distilled": "0",
             "failout": "0.25", "root": "workdir/devit", "teacher_depth": "",
             "sub_teachers": "1", "seed": "0", "teacher_epochs": ""}


def parse_arg(arg: str | None) -> dict[str, Any]:
  """``"n=4,k=1"`` -> the stage options with defaults, checked."""
  options = dict(_DEFAULTS)
  for item in (arg or "").split(","):
    if not item:
      continue
    key, sep, value = item.partition("=")
    if not sep or key not in _DEFAULTS:
      raise ValueError(f"DeViT config argument {item!r}: expected key=value with key "
                       f"in {sorted(_DEFAULTS)}, e.g. 'n=4,k=0'.")
    options[key] = value
  out = dict(options, n=int(options["n"]), classes=int(options["classes"]),
             width=int(options["width"]), depth=int(options["depth"]),
             heads=int(options["heads"]), distilled=options["distilled"] in ("1", "true"),
             failout=float(options["failout"]),
             sub_teachers=options["sub_teachers"] in ("1", "true"),
             seed=int(options["seed"]))
  out["teacher_epochs"] = _teacher_epochs(options["teacher_epochs"])
  out["subsets"] = decompose.class_subsets(out["classes"], out["n"])
  return out


def _teacher_epochs(text: str) -> float | None:
  """None (the recipe's epochs) or a positive number; "8" and "8.0" are the same run."""
  if not text:
    return None
  try:
    epochs = float(text)
  except ValueError:
    epochs = math.nan
  if not 0 < epochs < math.inf:  # Also rejects "nan" and "inf", which float() accepts.
    raise ValueError(f"teacher_epochs={text!r}: expected a positive number of epochs, "
                     "e.g. 'teacher_epochs=8'.")
  return epochs


def _device(options: dict[str, Any]) -> int:
  if options["k"] == "":
    raise ValueError("This DeViT stage trains one device's model: pass k=INDEX "
                     f"(0..{options['n'] - 1}), e.g. ':n={options['n']},k=0'.")
  k = int(options["k"])
  if not 0 <= k < options["n"]:
    raise ValueError(f"k={k} is not a device of n={options['n']}; use 0..{options['n'] - 1}.")
  return k


def run_dirs(options: dict[str, Any]) -> dict[str, Any]:
  """The default run directory of every stage."""
  base = f"{options['root']}/n{options['n']}"
  teacher = f"{options['root']}/teacher"
  if options["teacher_epochs"]:  # Another teacher: every stage after it is another run.
    teacher += f"_e{options['teacher_epochs']:g}"
    base += f"_teacher_e{options['teacher_epochs']:g}"
  if not options["sub_teachers"]:  # Another experiment: its own directories.
    base += "_no_sub_teachers"
  if options["seed"]:  # A repeat for the seed-to-seed spread; the teacher is shared.
    base += f"_seed{options['seed']}"
  return {"teacher": teacher,
          "sub_teachers": [f"{base}/sub_teacher_{k}" for k in range(options["n"])],
          "submodels": [f"{base}/submodel_{k}" for k in range(options["n"])],
          "ensemble_init": f"{base}/ensemble_init", "ensemble": f"{base}/ensemble",
          "ensemble_nofail": f"{base}/ensemble_nofail", "single": f"{base}/single"}


def _devit_fields(c: ml_collections.ConfigDict, options: dict[str, Any]) -> None:
  """config.devit: what export and the runtime need to know of the decomposition."""
  dirs = run_dirs(options)
  c.devit = ml_collections.ConfigDict({
      "num_devices": options["n"], "seed": decompose.DEVIT_SEED,
      "class_subsets": [list(s) for s in options["subsets"]],
      "submodel_workdirs": dirs["submodels"]})


def _teacher_base(options: dict[str, Any]) -> ml_collections.ConfigDict:
  c = recipes.get_config(options["teacher"], "fashion")
  if options["teacher_depth"]:
    with c.unlocked():
      c.model_overrides.depth = int(options["teacher_depth"])
  return c


def teacher_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The large model on every class (the DEKD ensemble's teacher)."""
  options = parse_arg(arg)
  c = _teacher_base(options)
  if options["teacher_epochs"]:  # Sub-teachers fine-tune with the recipe's epochs.
    with c.unlocked():
      c.num_epochs = options["teacher_epochs"]
  return c


def sub_teacher_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The large model fine-tuned on class subset k, from the full-data teacher."""
  options = parse_arg(arg)
  k = _device(options)
  c = _teacher_base(options)
  with c.unlocked():
    c.class_subset = tuple(options["subsets"][k])
    c.init_from = run_dirs(options)["teacher"]
    c.seed = options["seed"]
  return c


def _student_model(options: dict[str, Any]) -> str:
  return "deit_tiny_distilled_patch16" if options["distilled"] else "deit_tiny_patch16"


def submodel_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Device k's small ViT, distilled from its sub-teacher (hard token + relation)."""
  options = parse_arg(arg)
  k = _device(options)
  dirs = run_dirs(options)
  teacher = dirs["sub_teachers"][k] if options["sub_teachers"] else dirs["teacher"]
  c = recipes.distillation_config(_student_model(options), "hard_token+relation",
                                  teacher, alpha=0.5)
  with c.unlocked():
    c.class_subset = tuple(options["subsets"][k])
    if not options["sub_teachers"]:
      # The full-data teacher's logits, restricted to this device's classes.
      c.teacher.classes = tuple(options["subsets"][k])
    c.model_overrides.update(embed_dim=options["width"], depth=options["depth"],
                             num_heads=options["heads"])
    c.seed = options["seed"]
  return c


def ensemble_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The N sub-models stacked and fused, trained with DEKD and failout."""
  options = parse_arg(arg)
  dirs = run_dirs(options)
  teacher_width = models.create_model(options["teacher"]).embed_dim
  c = recipes.get_config("devit_tiny_patch16", "fashion")
  with c.unlocked():
    c.model_overrides.update(
        num_devices=options["n"], embed_dim=options["width"], depth=options["depth"],
        num_heads=options["heads"], distilled=options["distilled"],
        teacher_dim=teacher_width, failout_rate=options["failout"])
    c.objective.name = "hard_token+dekd_feature"
    c.objective.alpha = 0.5
    c.objective.dekd_weight = 1.0
    c.teacher.workdir = dirs["teacher"]
    c.init_from = dirs["ensemble_init"]
    _devit_fields(c, options)
    c.seed = options["seed"]
  return c


def _param_count(model: str, num_classes: int, **overrides: Any) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_edge import complexity  # pylint: disable=g-import-not-at-top

  module = models.create_model(model, num_classes=num_classes, image_size=32, **overrides)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return complexity.count_params(shapes["params"])


def single_width(options: dict[str, Any]) -> tuple[int, int]:
  """(width, heads) of one DeiT of the sub-models' depth nearest the ensemble in size.

  Widths are multiples of 32 with heads of about 64 channels (DeiT's head size);
  the ensemble counted is the stacked sub-models plus the fusion head.
  """
  teacher_width = models.create_model(options["teacher"]).embed_dim
  target = _param_count(
      "devit_tiny_patch16", options["classes"], num_devices=options["n"], embed_dim=options["width"],
      depth=options["depth"], num_heads=options["heads"],
      distilled=options["distilled"], teacher_dim=teacher_width)
  best = None
  for width in range(options["width"], 4 * options["width"] * options["n"] + 1, 32):
    heads = max(1, round(width / 64))
    while width % heads:
      heads -= 1
    size = _param_count(_student_model(options), options["classes"], embed_dim=width,
                        depth=options["depth"], num_heads=heads)
    if best is None or abs(size - target) < best[0]:
      best = (abs(size - target), width, heads)
    if size > target:
      break
  return best[1], best[2]


def single_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Baseline: one small ViT of the ensemble's size, plain CE, all classes."""
  options = parse_arg(arg)
  width, heads = single_width(options)
  c = recipes.get_config(_student_model(options), "fashion")
  with c.unlocked():
    c.model_overrides.update(embed_dim=width, depth=options["depth"], num_heads=heads)
    c.seed = options["seed"]
  return c

