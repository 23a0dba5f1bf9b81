"""vit_edge.tools.import_torch: PyTorch-layout checkpoints become run directories.

The state dicts are written from random Flax weights by inverting the converters'
layout (torch itself is not needed); the converters' PyTorch parity is checked
separately (README "Fidelity").
"""

import json
import os

import jax
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from vit_edge import checkpointing
from vit_edge import models
from vit_edge import train
from vit_edge.models import convert
from vit_edge.models import edgevit
from vit_edge.models import mobilevitv2
from vit_edge.models import vit
from vit_edge.tools import import_torch

# PyTorch key of a Flax path (collection first), per family.
_TORCH_NAME = {
    "deit": vit.torch_name,
    "edgevit": edgevit.torch_name,
    "mobilevitv2": lambda path: mobilevitv2.torch_name(path[1:]),
}
TINY = {
    "deit_tiny_patch16": dict(embed_dim=32, depth=2, num_heads=2),
    "edgevit_xxs": dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), head_dim=8),
    "mobilevitv2_050": dict(width_multiplier=0.25),
}


def _random_variables(name, size, num_classes=10, **overrides):
  """A model and random variables of its shapes (no init compile: tests stay fast)."""
  info = models.get_model_info(name)
  if info.fixed_resolution:
    overrides["image_size"] = size
  model = models.create_model(name, num_classes=num_classes, **overrides)
  rng = np.random.default_rng(0)
  variables = {}
  for path, shape in convert.variable_shapes(model, size).items():
    # Positive variances; everything else small, as in a trained model.
    value = (rng.uniform(0.5, 1.5, shape) if path[-1] == "var"
             else rng.normal(0.0, 0.05, shape))
    node = variables
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value.astype(np.float32)
  return model, variables


def _to_torch(variables, family):
  """Flax variables -> a PyTorch-layout state dict (inverse of the converters)."""
  state = {}
  for path, value in jax.tree_util.tree_leaves_with_path(variables):
    path = tuple(k.key for k in path)
    if path[-1] == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    state[_TORCH_NAME[family](path)] = np.ascontiguousarray(value)
  return state


def _same_logits(variables, loaded_model, loaded, size):
  """The run dir's model (rebuilt from config.json) with its weights computes what
  the original weights compute (one compile: same module, variables as argument)."""
  x = jax.random.uniform(jax.random.key(2), (2, size, size, 3))
  logits = jax.jit(lambda v: loaded_model.apply(v, x, train=False)[0])
  np.testing.assert_array_equal(np.asarray(logits(loaded)), np.asarray(logits(variables)))


def test_timm_deit_tiny_safetensors_becomes_a_run_with_the_same_logits(tmp_path):
  # The done-when: a timm-format deit_tiny_patch16_224 state dict.
  _, variables = _random_variables("deit_tiny_patch16", 224, num_classes=1000)
  state_dict = _to_torch(variables, "deit")
  assert state_dict["blocks.0.attn.qkv.weight"].shape == (576, 192)  # timm's layout.
  checkpoint = tmp_path / "deit_tiny_patch16_224.safetensors"
  st_numpy.save_file(state_dict, str(checkpoint))
  workdir = tmp_path / "run"
  import_torch.import_checkpoint("deit_tiny_patch16", str(checkpoint), str(workdir))

  loaded_model, loaded, config, info = train.load_trained_model(str(workdir))
  assert (config.image_size, info["num_classes"]) == (224, 1000)
  _same_logits(variables, loaded_model, loaded, 224)
  state = checkpointing.load_state(str(workdir))
  assert int(state["step"]) == 0 and "opt_state" in state
  assert sorted(os.listdir(workdir / "checkpoints")) == ["0"]


def test_npz_with_prefixes_keeps_batchnorm_statistics(tmp_path):
  _, variables = _random_variables("edgevit_xxs", 32, **TINY["edgevit_xxs"])
  state_dict = {f"module.{k}": v for k, v in _to_torch(variables, "edgevit").items()}
  state_dict["module.norm.num_batches_tracked"] = np.array(7)
  checkpoint = tmp_path / "edgevit.npz"
  np.savez(checkpoint, **state_dict)
  workdir = tmp_path / "run"
  import_torch.import_checkpoint("edgevit_xxs", str(checkpoint), str(workdir),
                                 image_size=32, model_overrides=TINY["edgevit_xxs"])
  _, loaded, _, info = train.load_trained_model(str(workdir))
  assert info["num_classes"] == 10
  # Every parameter and BatchNorm statistic as in the source (no compile needed).
  jax.tree_util.tree_map(np.testing.assert_array_equal, dict(loaded), variables)


def test_new_head_and_class_names_for_fine_tuning(tmp_path):
  _, variables = _random_variables("mobilevitv2_050", 64, num_classes=1000,
                                   **TINY["mobilevitv2_050"])
  checkpoint = tmp_path / "mobilevitv2.safetensors"
  # timm's EMA wrapper prefixes every key with "model.".
  st_numpy.save_file({f"model.{k}": v for k, v in
                      _to_torch(variables, "mobilevitv2").items()}, str(checkpoint))
  names = tmp_path / "classes.txt"
  names.write_text("cat\ndog\nbird\n")
  workdir = tmp_path / "run"
  import_torch.import_checkpoint(
      "mobilevitv2_050", str(checkpoint), str(workdir), class_names_file=str(names),
      image_size=64, model_overrides=TINY["mobilevitv2_050"])
  info = json.loads((workdir / "dataset_info.json").read_text())
  assert (info["num_classes"], info["label_names"]) == (3, ["cat", "dog", "bird"])
  state = checkpointing.load_state(str(workdir))
  assert state["params"]["head"]["kernel"].shape[-1] == 3  # Fresh 3-class head.
  np.testing.assert_array_equal(state["params"]["stem"]["conv"]["kernel"],
                                variables["params"]["stem"]["conv"]["kernel"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, state["batch_stats"],
                         variables["batch_stats"])
  with pytest.raises(ValueError, match="already holds a run"):
    import_torch.import_checkpoint("mobilevitv2_050", str(checkpoint), str(workdir))


@pytest.mark.parametrize("name,family,size", [
    ("deit_tiny_patch16", "deit", 32), ("edgevit_xxs", "edgevit", 32),
    ("mobilevitv2_050", "mobilevitv2", 64)])
def test_mismatched_keys_are_all_named_the_same_way(tmp_path, name, family, size):
  _, variables = _random_variables(name, size, **TINY[name])
  state_dict = _to_torch(variables, family)
  missing = next(k for k in state_dict if k.endswith(".bias") and "head" not in k)
  del state_dict[missing]
  state_dict["extra.weight"] = np.zeros((2, 2), np.float32)
  head = "head.fc.weight" if family == "mobilevitv2" else "head.weight"
  state_dict[head] = np.zeros((10, 5), np.float32)
  checkpoint = tmp_path / "bad.npz"
  np.savez(checkpoint, **state_dict)
  with pytest.raises(convert.StateDictMismatchError) as error:
    import_torch.import_checkpoint(name, str(checkpoint), str(tmp_path / "run"),
                                   image_size=size, model_overrides=TINY[name])
  message = str(error.value)
  assert "1 missing, 1 unexpected and 1 mis-shaped" in message
  assert missing in message and "extra.weight (2, 2)" in message
  assert f"{head} has shape (10, 5)" in message
  assert [m[0] for m in error.value.missing] == [missing]
  assert isinstance(error.value, ValueError) and isinstance(error.value, KeyError)


def test_torch_pickle_without_torch_says_how_to_convert(tmp_path):
  checkpoint = tmp_path / "weights.pth"
  checkpoint.write_bytes(b"not read")
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    pytest.skip("torch is installed here; the message is for machines without it")
  except ImportError:
    pass
  with pytest.raises(ValueError, match="save_file") as error:
    import_torch.load_state_dict(str(checkpoint))
  assert "torch is not installed" in str(error.value)
  with pytest.raises(ValueError, match="unknown format"):
    import_torch.load_state_dict(str(tmp_path / "classes.txt") if (
        tmp_path / "classes.txt").write_text("x") else "")


def test_strip_wrappers():
  weight = np.ones(2)
  assert list(import_torch.strip_wrappers(
      {"state_dict": {"module.model.head.bias": weight}})) == ["head.bias"]
  assert list(import_torch.strip_wrappers(
      {"model": {"head.bias": weight}, "epoch": 3})) == ["head.bias"]
  # A prefix that only some keys share is part of the names.
  assert sorted(import_torch.strip_wrappers(
      {"model.a": weight, "b": weight})) == ["b", "model.a"]


def test_vit_position_embeddings_follow_the_image_size(tmp_path):
  _, variables = _random_variables("deit_tiny_patch16", 32, **TINY["deit_tiny_patch16"])
  checkpoint = tmp_path / "deit.npz"
  np.savez(checkpoint, **_to_torch(variables, "deit"))
  import_torch.import_checkpoint("deit_tiny_patch16", str(checkpoint),
                                 str(tmp_path / "run"), image_size=64,
                                 model_overrides=TINY["deit_tiny_patch16"])
  pos_embed = checkpointing.load_state(str(tmp_path / "run"))["params"]["pos_embed"]
  assert pos_embed.shape == (1, 1 + 4 * 4, 32)  # 2x2 patches at 32 -> 4x4 at 64.
  np.testing.assert_array_equal(pos_embed[:, 0], variables["params"]["pos_embed"][:, 0])
