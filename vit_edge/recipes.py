"""Training recipes: the default offline config and the published ImageNet recipes.

Each ``configs/<model>.py`` calls :func:`get_config` with its model name. The arg
string (big_vision style) picks variants, comma-separated:

* ``""`` (default): the embedded digits data set (scikit-learn's real 8x8 digits,
  no download) at a small resolution; finishes within minutes on a 2-core CPU.
* ``"fashion"``: Fashion-MNIST (offline IDX files, ``config.dataset=
  "fashion_mnist"``, see vit_edge/input_pipeline.py) at 32x32, 2 epochs at batch
  128 with horizontal flips; sized for a 2-core CPU (the small models well within
  30 minutes on one core). Install the data once with
  ``sudo apt-get install dataset-fashion-mnist``.
* ``"imagenet"``: the published ImageNet-1K recipe of the model's paper
  (../shared/reference/architectures.md), on TFDS ``imagenet2012``.
* ``"cifar100"``: the ImageNet recipe's optimiser on TFDS ``cifar100`` at 224.
* ``"bf16"``: bfloat16 compute (parameters stay float32).
* ``"fsdp"``: shard parameters over all devices (mesh fsdp = device count).

Example::

    python -m vit_edge.main --config=configs/tformer_s.py --workdir=/tmp/tformer_s
    python -m vit_edge.main --config=configs/edgevit_xxs.py:fashion \
        --workdir=/tmp/edgevit_xxs_fashion
    python -m vit_edge.main --config=configs/edgevit_xxs.py:imagenet,bf16 \
        --config.data_dir=/data/tfds --workdir=/runs/edgevit_xxs
"""

from __future__ import annotations

import ml_collections

from vit_edge import models
from vit_edge import objectives
from vit_edge.compress import qat
from vit_edge.objectives import balance

# Published widths of MobileViTv2 -> (max lr, weight decay) at batch 1024.
_MOBILEVITV2_LR_WD = {
    "mobilevitv2_050": (9e-3, 0.004), "mobilevitv2_075": (9e-3, 0.008),
    "mobilevitv2_100": (7.5e-3, 0.013), "mobilevitv2_125": (4.9e-3, 0.020),
    "mobilevitv2_150": (3.5e-3, 0.029), "mobilevitv2_175": (2.6e-3, 0.039),
    "mobilevitv2_200": (2e-3, 0.05),
}

_ARGS = ("fashion", "imagenet", "cifar100", "bf16", "fsdp")
# Variants that choose the data set: at most one per config.
_DATASET_ARGS = ("fashion", "imagenet", "cifar100")


def base_config(model: str) -> ml_collections.ConfigDict:
  """Every field the trainer reads, with the offline-default values."""
  c = ml_collections.ConfigDict()
  c.model = model
  c.model_overrides = ml_collections.ConfigDict(
      {"drop_path_rate": 0.0, "dropout_rate": 0.0})
  c.dtype = "float32"
  c.seed = 0

  c.dataset = "digits"
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.train_split = "train"
  c.eval_split = "test"
  c.image_size = 32
  c.batch_size = 64
  c.eval_batch_size = 128
  c.shuffle_buffer = 2048
  c.cache = True
  # Image folders: "error" stops on undecodable files / empty class folders, naming
  # them; "skip" leaves them out with one warning.
  c.bad_images = "error"

  c.aug = ml_collections.ConfigDict()
  c.aug.random_resized_crop = False
  c.aug.crop_scale = (0.08, 1.0)
  c.aug.crop_ratio = (3 / 4, 4 / 3)
  c.aug.hflip = False  # Digits are not mirror-symmetric.
  c.aug.randaugment = ""
  c.aug.random_erasing = 0.0
  c.aug.mixup_alpha = 0.0
  c.aug.cutmix_alpha = 0.0
  c.aug.mixup_prob = 1.0
  c.aug.mixup_switch_prob = 0.5
  c.aug.crop_pct = 1.0
  c.aug.interpolation = "bilinear"
  c.label_smoothing = 0.0

  c.num_epochs = 8.0
  c.num_train_steps = -1  # > 0 overrides num_epochs.
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.min_lr = 1e-5
  c.optim.warmup_epochs = 2.0
  c.optim.warmup_steps = 0  # > 0 overrides warmup_epochs.
  c.optim.weight_decay = 0.05
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip_norm = 1.0
  c.ema_decay = 0.0  # 0 = no EMA.

  c.mesh = ml_collections.ConfigDict({"num_devices": -1, "fsdp": 1})
  c.log_every_steps = 50
  c.eval_every_steps = -1  # <= 0: 6 evaluations per run (train.eval_every_steps).
  c.checkpoint = ml_collections.ConfigDict(
      {"every_steps": 200, "keep": 3, "keep_best": True, "async_save": True})
  c.init_from = ""
  # config.objective (the loss: cross_entropy, soft_kd, hard_token, feature,
  # relation, logit_map, joined by '+') and config.teacher (its run directory).
  c.update(objectives.default_config())
  # Quantisation-aware training (vit_edge/compress/qat.py); off by default.
  c.qat = qat.default_config()
  return c


def _offline_defaults(c: ml_collections.ConfigDict, family: str) -> None:
  """Per-family settings for the digits default (small inputs, fast on a CPU)."""
  if family == "mobilevitv2":
    c.image_size = 64
    c.optim.lr = 2e-3
  elif family in ("deit", "vit"):
    c.image_size = 32  # 2x2 patches of 16 pixels: each patch sees a quarter digit.
    c.optim.lr = 5e-4
    c.num_epochs = 15.0
  else:
    c.image_size = 32


def _fashion_recipe(c: ml_collections.ConfigDict, family: str) -> None:
  """Fashion-MNIST (60,000 train / 10,000 test) sized for a 2-core CPU machine.

  2 epochs (936 steps) at batch 128; 28x28 images resized to 32x32 (the smallest
  size every family takes: stride 32, and 2x2 patches of 16 for the ViTs; MobileViTv2
  would see more at 64 but costs 4x). Clothes are mirror-symmetric, so horizontal
  flips are on. Six evaluations of the full test split per run.
  """
  c.dataset = "fashion_mnist"
  c.train_split, c.eval_split = "train", "test"
  c.image_size = 32
  c.batch_size = 128
  c.eval_batch_size = 500
  c.shuffle_buffer = 60_000  # The whole train split: 47 MB of uint8 images.
  c.aug.hflip = True
  c.num_epochs = 2.0
  c.optim.warmup_epochs = 0.2
  c.optim.lr = 1e-3 if family in ("deit", "vit") else 2e-3
  c.log_every_steps = 50
  c.eval_every_steps = 156  # 936 steps / 6.
  c.checkpoint.every_steps = 156


def _imagenet_recipe(c: ml_collections.ConfigDict, model: str, family: str) -> None:
  """The published ImageNet-1K recipe (architectures.md)."""
  c.dataset = "imagenet2012"
  c.train_split = "train"
  c.eval_split = "validation"
  c.batch_size = 1024
  c.eval_batch_size = 1024
  c.shuffle_buffer = 50_000
  c.cache = False
  c.num_epochs = 300.0
  c.aug.random_resized_crop = True
  c.aug.hflip = True
  c.aug.crop_pct = 0.875
  c.aug.randaugment = "rand-m9-mstd0.5"
  c.aug.random_erasing = 0.25
  c.label_smoothing = 0.1
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint.every_steps = 1000
  if family == "mobilevitv2":
    lr, wd = _MOBILEVITV2_LR_WD[model]
    c.image_size = 256
    c.optim.lr, c.optim.min_lr, c.optim.weight_decay = lr, lr / 10, wd
    c.optim.warmup_steps = 20_000
    c.optim.grad_clip_norm = 10.0
    c.aug.mixup_alpha, c.aug.cutmix_alpha = 0.2, 1.0
    c.ema_decay = 1 - 0.0005  # ml-cvnets' EMA momentum 0.0005.
  else:
    # DeiT recipe (also EdgeViT's and, per the paper, TFormer's):
    # lr 5e-4 x batch / 512, 5 warm-up epochs, wd 0.05, drop-path 0.1.
    c.image_size = 224
    c.optim.lr = 5e-4 * c.batch_size / 512
    c.optim.min_lr = 1e-5
    c.optim.warmup_epochs = 5.0
    c.optim.weight_decay = 0.05
    c.optim.grad_clip_norm = 0.0
    c.aug.mixup_alpha, c.aug.cutmix_alpha = 0.8, 1.0
    c.aug.randaugment = "rand-m9-mstd0.5-inc1"  # timm's DeiT setting.
    c.aug.interpolation = "bicubic"
    c.model_overrides.drop_path_rate = 0.1
    c.ema_decay = 0.99996


def get_config(model: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of `model` for the variant string `arg` (see module docstring)."""
  info = models.get_model_info(model)
  args = [a for a in (arg or "").split(",") if a]
  unknown = [a for a in args if a not in _ARGS]
  if unknown:
    raise ValueError(f"Unknown config variant(s) {unknown} for {model}; expected a "
                     f"comma-separated subset of {list(_ARGS)}.")
  datasets = [a for a in args if a in _DATASET_ARGS]
  if len(datasets) > 1:
    raise ValueError(f"Config variants {datasets} for {model} each choose a data set; "
                     "pick one of them.")
  c = base_config(model)
  if "fashion" in args:
    _fashion_recipe(c, info.family)
  elif "imagenet" in args or "cifar100" in args:
    _imagenet_recipe(c, model, info.family)
    if "cifar100" in args:
      c.dataset, c.eval_split = "cifar100", "test"
      c.batch_size, c.eval_batch_size = 256, 256
      c.optim.lr = 5e-4 * c.batch_size / 512 if info.family != "mobilevitv2" else c.optim.lr
      c.num_epochs = 100.0
  else:
    _offline_defaults(c, info.family)
  if "bf16" in args:
    c.dtype = "bfloat16"
  if "fsdp" in args:
    c.mesh.fsdp = -1  # All devices (see sharding.create_mesh).
  c.lock()
  return c


def routed_config(model: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config` for a routed (mixture-of-experts) model: label cross-entropy plus
  V-MoE's importance and load losses, weighted by ``config.objective.moe``
  (vit_edge/objectives/balance.py). The configs/mobilevitv2_moe_*.py files use it.

  Example::

      routed_config("mobilevitv2_moe_xs", "fashion")
  """
  c = get_config(model, arg)
  with c.unlocked():
    c.objective.name = "cross_entropy+moe_importance+moe_load"
    c.objective.moe = balance.default_config()
  return c


def distillation_config(student: str, objective: str, teacher_workdir: str,
                        **objective_fields) -> ml_collections.ConfigDict:
  """The student's Fashion-MNIST config trained with `objective` from a teacher.

  Example (configs/distill/)::

      distillation_config("mobilevitv2_050", "soft_kd", "workdir/fashion_teacher",
                          alpha=0.5, tau=4.0)
  """
  c = get_config(student, "fashion")
  c.objective.name = objective
  c.objective.update(objective_fields)
  c.teacher.workdir = teacher_workdir
  return c
