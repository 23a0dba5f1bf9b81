"""Orbax checkpoints: periodic save, keep the last N plus the best, auto-resume, and
fine-tuning initialisation from another run (``config.init_from``).

A save is atomic (Orbax writes to a temporary directory and renames it), so a run
killed at any moment keeps every checkpoint that had finished; the unfinished
temporary directory is removed on the next start.

Example::

    manager = CheckpointManager("/tmp/run/checkpoints", config.checkpoint)
    manager.save(step, state, {"eval/top1": 0.93})
    state = manager.restore_latest(abstract_state, shardings)
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

# The metric that ranks checkpoints for "keep the best".
BEST_METRIC = "eval/top1"


class CheckpointManager:
  """Thin wrapper over ocp.CheckpointManager with the project's retention policy.

  config fields: every_steps, keep (last N), keep_best (bool), async_save (bool).
  """

  def __init__(self, directory: str, config: ml_collections.ConfigDict):
    self.directory = os.path.abspath(directory)
    policies = [preservation_policy.LatestN(n=config.keep)]
    if config.keep_best:
      policies.append(preservation_policy.BestN(
          get_metric_fn=lambda m: m[BEST_METRIC], n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation_policy.AnyPreservationPolicy(policies),
        cleanup_tmp_directories=True,
        enable_async_checkpointing=config.async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Any, metrics: Optional[dict[str, float]]) -> None:
    metrics = metrics if metrics and BEST_METRIC in metrics else None
    self._manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics,
                       force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def restore_latest(self, abstract_state: Any, shardings: Any) -> Optional[Any]:
    """The newest checkpoint restored with the target shardings, or None if none."""
    if self._manager.latest_step() is None:
      return None
    return self.restore(abstract_state, shardings)

  def restore(self, abstract_state: Any, shardings: Any,
              step: Optional[int] = None) -> Any:
    """Restores `step` (newest when None); a clear error when there is none."""
    steps = self._manager.all_steps()
    if not steps:
      raise FileNotFoundError(
          f"No checkpoint in {self.directory}. Train first (python -m vit_edge.main "
          "--config=... --workdir=...) or point --workdir at a run that has one.")
    step = max(steps) if step is None else step
    if step not in steps:
      raise FileNotFoundError(
          f"No checkpoint for step {step} in {self.directory}; available steps: "
          f"{sorted(steps)}.")
    target = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state, shardings)
    return self._manager.restore(step, args=ocp.args.StandardRestore(target))


def load_state(path: str, step: Optional[int] = None) -> dict[str, Any]:
  """The raw (host numpy) train state of a checkpoint, with no target tree.

  Args:
    path: a workdir, its checkpoints/ directory, or a checkpoints/<step> directory.
    step: which step when `path` holds several (newest when None).
  """
  path = os.path.abspath(path)
  for candidate in (path, os.path.join(path, "checkpoints")):
    if not os.path.isdir(candidate):
      continue
    steps = sorted(int(d) for d in os.listdir(candidate) if re.fullmatch(r"\d+", d))
    if steps:
      if step is not None and step not in steps:
        raise FileNotFoundError(f"No checkpoint for step {step} in {candidate}; "
                                f"available steps: {steps}.")
      path = os.path.join(candidate, str(step if step is not None else steps[-1]))
      break
  item = os.path.join(path, "default")
  if not os.path.isdir(item):
    raise FileNotFoundError(
        f"{path!r} holds no Orbax checkpoint (expected a workdir, its checkpoints/ "
        "directory, or a checkpoints/<step> directory). Train first with "
        "python -m vit_edge.main --config=... --workdir=...")
  return ocp.StandardCheckpointer().restore(item)


def load_params(path: str) -> dict[str, Any]:
  """The raw params of the newest checkpoint under `path` (see load_state)."""
  return load_state(path)["params"]


def init_from(state: Any, path: str, shardings: Any, grid: int) -> Any:
  """Copies the params of another run into `state` for fine-tuning.

  Parameters with equal shapes are copied. Where shapes differ, the classifier head
  (any param under a module whose name starts with "head") keeps its fresh
  initialisation (a different class count), and ViT position embeddings are resized
  to the new `grid` x `grid` patch grid; any other mismatch is an error.
  """
  from vit_edge.models import vit  # pylint: disable=g-import-not-at-top

  loaded = load_params(path)
  flat_new = ocp.tree.to_flat_dict(state["params"])
  flat_old = ocp.tree.to_flat_dict(loaded)
  merged = {}
  for key, new in flat_new.items():
    old = flat_old.get(key)
    name = "/".join(key)
    if old is None:
      raise ValueError(f"init_from={path!r} has no parameter {name}; it was trained "
                       "with another architecture.")
    old = np.asarray(old)
    if old.shape == new.shape:
      merged[key] = old
    elif key[-1] == "pos_embed":
      num_prefix = new.shape[1] - grid * grid
      old_grid = int(round((old.shape[1] - num_prefix) ** 0.5))
      merged[key] = np.asarray(vit.resize_pos_embed(
          jnp.asarray(old), (old_grid, old_grid), (grid, grid), num_prefix))
      logging.info("init_from: resized %s from %s to %s.", name, old.shape, new.shape)
    elif any(k.startswith("head") for k in key):
      merged[key] = np.asarray(new)
      logging.info("init_from: %s re-initialised (%s -> %s).", name, old.shape,
                   new.shape)
    else:
      raise ValueError(f"init_from: parameter {name} has shape {old.shape} in "
                       f"{path!r} but {new.shape} in this model.")
  params = ocp.tree.from_flat_dict(merged, target=state["params"])
  params = jax.tree_util.tree_map(
      lambda x, s: jax.device_put(jnp.asarray(x), s), params, shardings["params"])
  new_state = dict(state, params=params)
  if state["ema_params"]:
    new_state["ema_params"] = jax.tree_util.tree_map(jnp.copy, params)
  return new_state
