"""Imports PyTorch weights (timm, official EdgeViT, ml-cvnets) as a vit_edge run dir.

::

    python -m vit_edge.tools.import_torch --model=deit_tiny_patch16 \
        --checkpoint=deit_tiny_patch16_224.safetensors --workdir=workdir/deit_tiny_in1k

writes the layout training writes (config.json, dataset_info.json,
checkpoints/0/ with a train state: step 0, the converted params and BatchNorm
statistics, a fresh optimiser state), so every consumer of a run accepts it:

* export: ``python -m vit_edge.export --workdir=workdir/deit_tiny_in1k``;
* fine-tuning: ``--config.init_from=workdir/deit_tiny_in1k`` (BatchNorm statistics
  kept; a head of another class count is re-initialised);
* a distillation teacher (``config.teacher.workdir``);
* ``python -m vit_edge.main --mode=eval`` with the config the tool prints (the data
  set must have the head's class count: import with ``--num_classes=10`` and a
  fresh head to evaluate on digits, or ``--config_arg=imagenet`` for ImageNet).

Checkpoint formats: ``.safetensors`` (the ``safetensors`` package), ``.npz``
(``numpy.savez`` of name -> array), and ``.pth``/``.pt``/``.bin`` when torch is
installed (torch is not a dependency; without it the error shows the 3 lines that
convert a file to .safetensors where torch is). Wrappers are unwrapped: a top-level
``state_dict``/``model``/``model_ema`` entry and the ``module.``/``model.`` key
prefixes of DataParallel and timm's EMA. Mismatched keys raise
`vit_edge.models.convert.StateDictMismatchError`, naming every missing, unexpected and
mis-shaped key. The converters themselves are checked against the PyTorch
references (README "Fidelity").

Flags: --model (registry name), --checkpoint, --workdir, --num_classes (default:
the checkpoint head's; another count gets a fresh head), --class_names (a text
file, one name per line, in label order), --image_size (default: the model's
reference resolution; ViT position embeddings are resized), --config_arg (the
config variant recorded in config.json, e.g. "fashion"; default digits).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
# Keys under which training scripts nest the state dict (DeiT: "model"; many
# Lightning-style checkpoints: "state_dict"; timm's train script: "state_dict_ema").
_WRAPPER_KEYS = ("state_dict", "model", "model_ema", "state_dict_ema")
# Key prefixes of DataParallel ("module.") and timm's ModelEmaV2 ("model.").
_PREFIXES = ("module.", "model.")
# Classifier-head bias keys: timm/EdgeViT/TFormer, then timm's MobileViTv2.
_HEAD_BIAS_KEYS = ("head.bias", "head.fc.bias")


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A PyTorch checkpoint file as {key: float/int numpy array}, wrappers removed.

  Example::

    sd = load_state_dict("deit_tiny_patch16_224.safetensors")
    sd["blocks.0.attn.qkv.weight"].shape  # (576, 192)
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--checkpoint={path!r} does not exist.")
  if path.endswith(".safetensors"):
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
    state = st_numpy.load_file(path)
  elif path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      state = {k: data[k] for k in data.files}
  elif path.endswith(_TORCH_SUFFIXES):
    state = _load_with_torch(path)
  else:
    raise ValueError(f"--checkpoint={path!r}: unknown format; expected .safetensors, "
                     f".npz or {'/'.join(_TORCH_SUFFIXES)} (with torch installed).")
  return strip_wrappers(state)


def _load_with_torch(path: str) -> dict[str, Any]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(
        f"{path} is a PyTorch pickle, which needs torch to read; torch is not "
        "installed (vit_edge does not depend on it). Convert it once where torch is "
        "installed, then pass the .safetensors file:\n"
        "  import torch; from safetensors.torch import save_file\n"
        f"  sd = torch.load({path!r}, map_location='cpu')\n"
        "  save_file({k: v.contiguous() for k, v in sd.get('model', sd).items()}, "
        "'weights.safetensors')") from None
  state = torch.load(path, map_location="cpu", weights_only=True)
  state = _unwrap(state)
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in state.items() if hasattr(v, "numpy")}


def _unwrap(state: Mapping[str, Any]) -> Mapping[str, Any]:
  for key in _WRAPPER_KEYS:
    if isinstance(state.get(key), Mapping):
      return state[key]
  return state


def strip_wrappers(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Removes a nesting key and the prefixes that every key shares.

  Example: ``strip_wrappers({"module.head.bias": b}) == {"head.bias": b}``.
  """
  state = dict(_unwrap(state))
  changed = True
  while changed and state:
    changed = False
    for prefix in _PREFIXES:
      if all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
        changed = True
  return {k: np.asarray(v) for k, v in state.items()}


def checkpoint_num_classes(state_dict: Mapping[str, np.ndarray]) -> int:
  """The class count of the checkpoint's head (0 for a headless checkpoint)."""
  for key in _HEAD_BIAS_KEYS:
    if key in state_dict:
      return int(state_dict[key].shape[0])
  return 0


def family_module(family: str):
  """The models module of a registry family (it holds ``convert_torch_state_dict``)."""
  from vit_edge.models import edgevit, mobilevitv2, tformer, vit  # pylint: disable=g-import-not-at-top
  return {"edgevit": edgevit, "mobilevitv2": mobilevitv2, "tformer": tformer,
          "vit": vit, "deit": vit}[family]


def _native_image_size(state_dict, config, info) -> int:
  """The resolution a ViT checkpoint was trained at (its position-embedding grid)."""
  if not info.fixed_resolution or "pos_embed" not in state_dict:
    return config.image_size
  from vit_edge.models import vit  # pylint: disable=g-import-not-at-top
  prefix = 2 if "dist_token" in state_dict else 1
  grid = int(round((state_dict["pos_embed"].shape[1] - prefix) ** 0.5))
  patch_size = config.model_overrides.get("patch_size", vit.VisionTransformer.patch_size)
  return grid * patch_size


def convert_checkpoint(state_dict: Mapping[str, np.ndarray], config
                       ) -> dict[str, Any]:
  """Flax variables of `config.model` at the checkpoint's own head and resolution."""
  from vit_edge import models, train  # pylint: disable=g-import-not-at-top
  info = models.get_model_info(config.model)
  native = config.copy_and_resolve_references()
  with native.unlocked():
    native.image_size = _native_image_size(state_dict, config, info)
  model = train.build_model(native, checkpoint_num_classes(state_dict))
  return family_module(info.family).convert_torch_state_dict(state_dict, model)


def _read_class_names(path: Optional[str]) -> Optional[list[str]]:
  if not path:
    return None
  with open(path) as f:
    names = [line.strip() for line in f if line.strip()]
  if not names:
    raise ValueError(f"--class_names={path!r} holds no names; expected one class name "
                     "per line, in label order.")
  return names


def _resolve_num_classes(state_dict, num_classes, class_names) -> int:
  found = checkpoint_num_classes(state_dict)
  num_classes = num_classes or (len(class_names) if class_names else found)
  if not num_classes:
    raise ValueError("The checkpoint has no classifier head (no head.bias / "
                     "head.fc.bias); pass --num_classes=N to add a fresh one.")
  if class_names and len(class_names) != num_classes:
    raise ValueError(f"--class_names lists {len(class_names)} names but the model has "
                     f"{num_classes} classes; give one name per class.")
  return num_classes


def _train_state(config, num_classes: int, variables: Mapping[str, Any],
                 source: str):
  """A train state as training creates it, holding `variables` (init_from's rules)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_edge import checkpointing, models, objectives, optimizer, train  # pylint: disable=g-import-not-at-top
  info = models.get_model_info(config.model)
  objective, _ = objectives.create_objective(
      config, student_image_size=config.image_size, student_mean=info.mean,
      student_std=info.std)
  model = objective.adapt_student(train.build_model(config, num_classes))
  objective.bind_shapes(model, config.image_size, {})
  tx, _ = optimizer.create_optimizer(config.optim, max(1, config.num_train_steps))
  state = jax.jit(lambda rng: train.create_state(
      rng, model=model, objective=objective, tx=tx, image_size=config.image_size,
      ema=config.ema_decay > 0))(jax.random.key(config.seed))
  grid = config.image_size // info.stride
  for collection in ("params", "batch_stats"):
    if state[collection]:
      state[collection] = checkpointing.merge_for_fine_tuning(
          state[collection], variables.get(collection, {}), source, collection, grid)
  if state["ema_params"]:
    state["ema_params"] = state["params"]
  return state


def import_checkpoint(model: str, checkpoint: str, workdir: str, *,
                      num_classes: Optional[int] = None,
                      class_names_file: Optional[str] = None,
                      image_size: Optional[int] = None, config_arg: str = "",
                      model_overrides: Optional[Mapping[str, Any]] = None) -> Any:
  """Converts `checkpoint` for registry `model` and writes the run dir `workdir`.

  `model_overrides` (architecture fields, e.g. a smaller ``depth``) go into
  ``config.model_overrides``. Returns the config written to
  ``workdir/config.json``. Example::

    import_checkpoint("deit_tiny_patch16", "deit_tiny.safetensors", "/tmp/deit")
  """
  from vit_edge import checkpointing, models, recipes, rundir  # pylint: disable=g-import-not-at-top
  if rundir.is_run_dir(workdir):
    raise ValueError(f"--workdir={workdir!r} already holds a run; import into a new "
                     "directory.")
  info = models.get_model_info(model)
  config = recipes.get_config(model, config_arg)
  with config.unlocked():
    config.image_size = image_size or info.image_size
    config.model_overrides.update(dict(model_overrides or {}))
  state_dict = load_state_dict(checkpoint)
  class_names = _read_class_names(class_names_file)
  num_classes = _resolve_num_classes(state_dict, num_classes, class_names)
  variables = convert_checkpoint(state_dict, config)
  state = _train_state(config, num_classes, variables, checkpoint)
  manager = checkpointing.CheckpointManager(rundir.checkpoints_dir(workdir),
                                            config.checkpoint)
  manager.save(0, state, None)
  manager.wait()
  rundir.write_run_files(workdir, config, {
      "name": config.dataset, "num_classes": num_classes,
      "label_names": class_names or [str(i) for i in range(num_classes)],
      "image_size": config.image_size, "mean": list(info.mean),
      "std": list(info.std), "imported_from": os.path.abspath(checkpoint)})
  return config


def _parser() -> argparse.ArgumentParser:
  # argparse, not absl flags: module-level absl flags (--workdir) would clash with
  # vit_edge.main's when both are imported in one process (the test suite).
  parser = argparse.ArgumentParser(
      prog="python -m vit_edge.tools.import_torch",
      description="PyTorch weights -> a vit_edge run directory.")
  parser.add_argument("--model", required=True,
                      help="registry name, e.g. deit_tiny_patch16")
  parser.add_argument("--checkpoint", required=True,
                      help=".safetensors, .npz or .pth/.pt (with torch installed)")
  parser.add_argument("--workdir", required=True, help="new run directory to write")
  parser.add_argument("--num_classes", type=int, default=None,
                      help="classes of the head (default: the checkpoint's; "
                      "others: fresh head)")
  parser.add_argument("--class_names", default=None,
                      help="text file, one class name per line in label order")
  parser.add_argument("--image_size", type=int, default=None,
                      help="input resolution (default: the model's reference one)")
  parser.add_argument("--config_arg", default="",
                      help="config variant recorded in config.json, e.g. 'fashion' "
                      "(default: digits)")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
  args = _parser().parse_args(argv)
  try:
    config = import_checkpoint(
        args.model, args.checkpoint, args.workdir, num_classes=args.num_classes,
        class_names_file=args.class_names, image_size=args.image_size,
        config_arg=args.config_arg)
  except (ValueError, KeyError, FileNotFoundError, ImportError) as e:
    sys.exit(f"error: {e}")
  variant = f":{args.config_arg}" if args.config_arg else ""
  print(f"Wrote {args.workdir} ({config.model} at {config.image_size}x"
        f"{config.image_size}). Export: python -m vit_edge.export "
        f"--workdir={args.workdir}. Evaluate (the data set needs the head's class "
        f"count): python -m vit_edge.main --config=configs/{config.model}.py{variant} "
        f"--config.image_size={config.image_size} --workdir={args.workdir} "
        "--mode=eval")


if __name__ == "__main__":
  main()
