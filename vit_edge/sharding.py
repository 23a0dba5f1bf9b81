"""Device mesh, parameter sharding rules and global-batch assembly.

The mesh has two axes: "data" (batch only) and "fsdp" (batch and parameters). With
fsdp = 1 every parameter is replicated and training is plain data parallelism; with
fsdp > 1 each parameter is split along its largest axis divisible by the fsdp size
(small tensors stay replicated), as in big_vision's "fsdp" rule.

Example::

    mesh = create_mesh(config.mesh)          # e.g. data=-1 (all devices), fsdp=1
    shardings = param_shardings(abstract_params, mesh)
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
# Parameters smaller than this stay replicated under FSDP: splitting them saves
# nothing and costs a collective.
_MIN_FSDP_SIZE = 2 ** 14


def create_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """A ("data", "fsdp") mesh over `config.num_devices` devices (-1 = all).

  config fields: num_devices (-1 = all), fsdp (size of the fsdp axis, 1 = none,
  -1 = all devices).
  """
  devices = jax.devices()
  num = len(devices) if config.num_devices in (-1, None) else config.num_devices
  if num > len(devices) or num < 1:
    raise ValueError(f"config.mesh.num_devices={config.num_devices} but "
                     f"{len(devices)} devices are visible; use -1 for all of them.")
  fsdp = num if config.fsdp == -1 else config.fsdp
  if fsdp < 1 or num % fsdp:
    raise ValueError(f"config.mesh.fsdp={config.fsdp} must divide the number of "
                     f"devices {num} (or be -1 for all of them).")
  # Auto axes: XLA's sharding propagation places the intermediates.
  axis_types = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((num // fsdp, fsdp), BATCH_AXES,
                       axis_types=axis_types, devices=devices[:num])


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over all mesh axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _leaf_sharding(leaf: Any, mesh: jax.sharding.Mesh) -> NamedSharding:
  fsdp = mesh.shape["fsdp"]
  shape = getattr(leaf, "shape", ())
  if fsdp == 1 or not shape or np.prod(shape) < _MIN_FSDP_SIZE:
    return replicated(mesh)
  for axis in np.argsort(shape)[::-1]:
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def param_shardings(abstract_tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Sharding of every leaf of a (possibly abstract) train-state tree."""
  return jax.tree_util.tree_map(lambda x: _leaf_sharding(x, mesh), abstract_tree)


def _divisible_suggestion(batch_size: int, num_devices: int) -> int:
  """The nearest multiple of num_devices at or below batch_size (at least one)."""
  return max(num_devices, batch_size // num_devices * num_devices)


def _not_divisible(fields: dict[str, int], num_devices: int) -> Optional[str]:
  bad = {name: size for name, size in fields.items() if size % num_devices}
  if not bad:
    return None
  values = " and ".join(f"{name}={size}" for name, size in bad.items())
  verb = "does" if len(bad) == 1 else "do"
  fixes = " ".join(f"--{name}={_divisible_suggestion(size, num_devices)}"
                   for name, size in bad.items())
  return (f"{values} {verb} not divide by the {num_devices} devices of the mesh; use "
          f"multiples of {num_devices}, e.g. {fixes}.")


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh,
                     what: str = "config.batch_size") -> int:
  """Returns the per-process batch; a clear error when the batch does not divide."""
  message = _not_divisible({what: global_batch_size}, mesh.devices.size)
  if message:
    raise ValueError(message)
  return global_batch_size // jax.process_count()


def check_batch_sizes(config: ml_collections.ConfigDict,
                      mesh: jax.sharding.Mesh) -> tuple[int, int]:
  """Per-process (train, eval) batch sizes; one error naming every bad one.

  Both config.batch_size and config.eval_batch_size must divide by the mesh's
  device count; checking them together saves a second failed start.

  Example::

      local_batch, local_eval_batch = check_batch_sizes(config, mesh)
  """
  message = _not_divisible({"config.batch_size": config.batch_size,
                            "config.eval_batch_size": config.eval_batch_size},
                           mesh.devices.size)
  if message:
    raise ValueError(message)
  count = jax.process_count()
  return config.batch_size // count, config.eval_batch_size // count


def make_global_batch(local_batch: dict[str, np.ndarray],
                      mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Assembles each process's local rows into one globally sharded batch."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
