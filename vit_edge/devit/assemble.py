"""The DeViT ensemble's starting checkpoint: the N trained sub-models, stacked.

The ensemble config's ``init_from`` points here; training then copies every
variable with a matching shape (``checkpointing.init_from``). Each sub-model's
backbone becomes its slice of the stacked parameters (its class head is dropped,
as DeViT drops the sub-models' heads); the fusion head and missing tokens start
fresh.

Usage::

    python -m vit_edge.devit.assemble --config=configs/devit/ensemble.py:n=2
    # reads config.devit.submodel_workdirs, writes config.init_from
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vit_edge import rundir
from vit_edge import train


def load_config(spec: str):
  """``path/to/config.py[:arg]`` -> the ConfigDict its get_config(arg) returns."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config={spec!r}: no file {path!r}.")
  module_spec = importlib.util.spec_from_file_location("devit_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def stack_submodels(params: dict[str, Any], submodel_params: Sequence[dict[str, Any]],
                    names: Sequence[str]) -> dict[str, Any]:
  """`params` of a fresh ensemble with each sub-model's backbone in its slice.

  Raises ValueError naming the first variable whose shape does not fit (a
  sub-model of another width, depth, patch size or distillation setting).
  """
  stacked = params["submodels"]
  if len(submodel_params) != jax.tree_util.tree_leaves(stacked)[0].shape[0]:
    raise ValueError(f"{len(submodel_params)} sub-models for an ensemble of "
                     f"{jax.tree_util.tree_leaves(stacked)[0].shape[0]} devices.")
  flat_stacked = ocp.tree.to_flat_dict(stacked)
  slices = {key: [] for key in flat_stacked}
  for name, sub in zip(names, submodel_params):
    flat_sub = ocp.tree.to_flat_dict(sub)
    for key, target in flat_stacked.items():
      value = flat_sub.get(key)
      if value is None or tuple(value.shape) != tuple(target.shape[1:]):
        raise ValueError(
            f"Sub-model {name!r}: variable {'/'.join(key)} has shape "
            f"{None if value is None else tuple(value.shape)}, the ensemble expects "
            f"{tuple(target.shape[1:])}. Train the sub-models with the ensemble's "
            "width/depth/heads/distilled arguments (configs/devit/submodel.py).")
      slices[key].append(np.asarray(value))
  new_stacked = ocp.tree.from_flat_dict(
      {key: np.stack(values) for key, values in slices.items()}, target=stacked)
  return dict(params, submodels=new_stacked)


def assemble(config, out: Optional[str] = None, num_classes: Optional[int] = None
             ) -> str:
  """Writes the stacked initial checkpoint for `config`; returns its directory."""
  out = out or config.init_from
  workdirs = list(config.devit.submodel_workdirs)
  info = None
  if num_classes is None:
    from vit_edge import input_pipeline  # pylint: disable=g-import-not-at-top
    num_classes = input_pipeline.get_info(config).num_classes
  model = train.build_model(config, num_classes)
  x = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  params = model.init(jax.random.key(config.seed), x)["params"]
  subs = []
  for workdir in workdirs:
    _, variables, _, info = train.load_trained_model(workdir)
    subs.append(variables["params"])
  params = stack_submodels(params, subs, workdirs)
  item = os.path.join(os.path.abspath(out), rundir.STATE_ITEM)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(item, {"params": params}, force=True)
  checkpointer.wait_until_finished()
  del info
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True,
                      help="the ensemble config, e.g. configs/devit/ensemble.py:n=2")
  parser.add_argument("--out", default=None, help="default: the config's init_from")
  args = parser.parse_args(argv)
  try:
    out = assemble(load_config(args.config), args.out)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"Wrote the ensemble's initial checkpoint to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
