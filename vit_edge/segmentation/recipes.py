"""Segmentation training configs (``configs/seg/*.py`` call `segmentation_config`).

The default trains a light UPerNet on the embedded semi-synthetic set
(`vit_edge.segmentation.data`, offline) at 64x64 in a few minutes on a 2-core
CPU. Args (comma-separated, big_vision style):

* ``model=NAME``: any ``fpn_*`` / ``upernet_*`` registry name
  (default ``upernet_edgevit_xxs``).
* ``steps=N``: training steps (default 1000: about 7 minutes on a 2-core CPU).
* ``aux``: add the auxiliary FCN head (weight 0.4 in the loss).
* ``ohem``: online hard example mining (threshold 0.7, >= 10,000 pixels kept).
* ``folder``: image + mask folders (``--config.data_dir``, 512x512, 14 classes by
  default as LPCVC 2023; override ``--config.num_classes``).
* ``pets``: TFDS oxford_iiit_pet (``--config.data_dir``; prepared by the user).
* ``distill``: logit-map MSE distillation from a segmentation teacher run
  (``--config.teacher.workdir``), added to the pixel cross-entropy.

Example::

    python -m vit_edge.main --config=configs/seg/embedded.py --workdir=/tmp/seg
"""

from __future__ import annotations

import ml_collections

from vit_edge import recipes

DEFAULT_MODEL = "upernet_edgevit_xxs"
_FLAGS = ("aux", "ohem", "folder", "pets", "distill")


def parse_arg(arg: str | None) -> dict[str, str]:
  """``"model=fpn_edgevit_xxs,aux"`` -> {"model": "fpn_edgevit_xxs", "aux": ""}."""
  options = {}
  for part in (arg or "").split(","):
    if not part:
      continue
    key, _, value = part.partition("=")
    if key not in _FLAGS + ("model", "steps"):
      raise ValueError(f"Unknown segmentation config arg {part!r}; expected "
                       f"model=NAME, steps=N or one of {_FLAGS}.")
    options[key] = value
  return options


def segmentation_config(arg: str | None = None, **defaults
                        ) -> ml_collections.ConfigDict:
  """A segmentation training config; see the module docstring for `arg`.

  Example: ``segmentation_config("model=fpn_mobilevitv2_100,aux")``.
  """
  options = {**defaults, **parse_arg(arg)}
  c = recipes.base_config(options.get("model", DEFAULT_MODEL))
  c.task = "segmentation"
  c.dataset = "seg:embedded"
  c.ignore_index = 255
  c.num_classes = 0  # seg:folder without classes.txt: the class count.
  c.image_size = 64
  c.batch_size = 16
  c.eval_batch_size = 50
  c.cache = False
  c.model_overrides.drop_path_rate = 0.0
  c.model_overrides.dropout_rate = 0.1
  c.model_overrides.aux_head = "aux" in options
  # Joint image/mask augmentation (vit_edge.segmentation.data.augment_pair).
  c.aug.scale_range = (0.5, 2.0)
  c.aug.hflip = True
  c.aug.color_jitter = 0.2
  c.num_train_steps = int(options.get("steps", 1000))
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 40
  c.optim.weight_decay = 0.01
  c.log_every_steps = 50
  c.eval_every_steps = -1
  c.checkpoint.every_steps = 200
  c.objective.name = "pixel_cross_entropy"
  c.objective.pixel_ce = ml_collections.ConfigDict(
      {"aux_weight": 0.4, "ohem_thresh": 0.7 if "ohem" in options else 0.0,
       "ohem_min_kept": 10_000})
  if "folder" in options:
    c.dataset = "seg:folder"
    c.image_size = 512
    c.num_classes = 14
    c.batch_size = 8
    c.eval_batch_size = 8
    c.train_split = "train"
    c.eval_split = "val"
  if "pets" in options:
    c.dataset = "seg:oxford_iiit_pet"
    c.image_size = 256
  if "distill" in options:
    c.objective.name = "pixel_cross_entropy+logit_map"
    c.objective.logit_map_weight = 1.0
    c.teacher.workdir = "workdir/seg_teacher"
  return c
