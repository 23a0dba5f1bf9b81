"""Porting PyTorch state dicts: one checker and one error type for every family.

Each family's ``convert_torch_state_dict`` says only what differs between families:
the PyTorch key of each Flax variable (``torch_name``) and how a tensor is laid out
for Flax (``to_flax``). :func:`convert_state_dict` walks the model's variables, and
when the state dict does not fit, raises one :class:`StateDictMismatchError` naming
every missing, unexpected and mis-shaped key (with shapes), the same way for all.

Example::

    shapes = variable_shapes(model, 64)
    variables = convert_state_dict(
        state_dict, shapes, torch_name=lambda path: ".".join(path[1:]),
        to_flax=lambda path, value, shape: value, family="MyNet")
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Path = tuple[str, ...]  # (collection, module, ..., leaf), e.g. ("params", "head", "bias").
# PyTorch bookkeeping tensors that have no Flax counterpart.
IGNORED_SUFFIXES = ("num_batches_tracked",)
_MAX_LISTED = 12


class StateDictMismatchError(KeyError, ValueError):
  """A state dict that does not fit the model: missing, unexpected, mis-shaped keys.

  A KeyError and a ValueError at once, so callers that caught either before the
  families shared this checker still catch it.

  Attributes:
    missing: ``(torch key, Flax path, expected Flax shape)`` for each key the model
      needs that the state dict lacks.
    unexpected: ``(torch key, shape)`` for each tensor the model does not use.
    misshaped: ``(torch key, shape in the state dict, Flax path, expected Flax
      shape)`` for each tensor whose shape does not fit.
  """

  def __init__(self, family: str, missing: Sequence[tuple[str, str, tuple]],
               unexpected: Sequence[tuple[str, tuple]],
               misshaped: Sequence[tuple[str, tuple, str, tuple]], hint: str = ""):
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.misshaped = list(misshaped)
    lines = [f"The {family} state dict does not fit the model: {len(self.missing)} "
             f"missing, {len(self.unexpected)} unexpected and {len(self.misshaped)} "
             "mis-shaped key(s)."]
    lines += _section("missing (the state dict lacks them)", [
        f"{key} (for Flax {path}, shape {shape})" for key, path, shape in self.missing])
    lines += _section("unexpected (not used by the model)", [
        f"{key} {shape}" for key, shape in self.unexpected])
    lines += _section("mis-shaped", [
        f"{key} has shape {got}; Flax {path} expects {want} (Flax layout)"
        for key, got, path, want in self.misshaped])
    if hint:
      lines.append(hint)
    super().__init__("\n".join(lines))

  def __str__(self) -> str:  # KeyError would quote the message.
    return str(self.args[0])


def _section(title: str, items: list[str]) -> list[str]:
  if not items:
    return []
  more = len(items) - _MAX_LISTED
  shown = items[:_MAX_LISTED] + ([f"... and {more} more"] if more > 0 else [])
  return [f"  {title}:"] + [f"    {item}" for item in shown]


def variable_shapes(model: nn.Module, image_size: int, **init_kwargs: Any
                    ) -> dict[Path, tuple[int, ...]]:
  """``{(collection, *path): shape}`` of every variable of `model`, without compute.

  Example: ``variable_shapes(model, 32)[("params", "head", "bias")] == (10,)``.
  """
  init = functools.partial(model.init, **init_kwargs)
  abstract = jax.eval_shape(init, jax.random.key(0),
                            jnp.zeros((1, image_size, image_size, 3), jnp.float32))
  abstract = nn.unbox(dict(abstract))
  return {tuple(k.key for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}


def convert_state_dict(
    state_dict: Mapping[str, Any], shapes: Mapping[Path, tuple[int, ...]], *,
    torch_name: Callable[[Path], str],
    to_flax: Callable[[Path, np.ndarray, tuple[int, ...]], np.ndarray],
    family: str, hint: str = "") -> dict[str, Any]:
  """Ports `state_dict` onto the variables `shapes` describes; checks every key.

  Args:
    state_dict: PyTorch key -> array (numpy, or anything ``np.asarray`` takes).
    shapes: the model's variables, from :func:`variable_shapes`.
    torch_name: the PyTorch key of a Flax variable path (collection first).
    to_flax: ``(path, float32 tensor, expected shape) -> Flax-layout array``; a
      ValueError (e.g. a failed transpose) counts as a mis-shaped key.
    family: named in the error, e.g. "EdgeViT".
    hint: appended to the error, e.g. which sizes to check.

  Returns:
    ``{collection: nested dict of float32 numpy arrays}``.

  Raises:
    StateDictMismatchError: listing every missing, unexpected and mis-shaped key.
  """
  plan = {torch_name(path): path for path in shapes}
  missing = [(key, "/".join(path), shapes[path]) for key, path in plan.items()
             if key not in state_dict]
  unexpected = [(key, tuple(np.shape(value))) for key, value in state_dict.items()
                if key not in plan and not key.endswith(IGNORED_SUFFIXES)]
  out: dict[str, Any] = {}
  misshaped = []
  for key, path in plan.items():
    if key not in state_dict:
      continue
    value = np.asarray(state_dict[key], np.float32)
    try:
      converted = to_flax(path, value, shapes[path])
    except ValueError:
      converted = None
    if converted is None or tuple(converted.shape) != tuple(shapes[path]):
      misshaped.append((key, value.shape, "/".join(path), shapes[path]))
      continue
    node = out
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = converted
  if missing or unexpected or misshaped:
    raise StateDictMismatchError(family, missing, sorted(unexpected), misshaped, hint)
  return out


def torch_layout_to_flax(path: Path, value: np.ndarray,
                         shape: tuple[int, ...]) -> np.ndarray:
  """The common re-layout: conv OIHW -> HWIO and Linear (out, in) -> (in, out) for
  ``kernel`` leaves; everything else as is. Example: a (8, 3, 3, 3) conv weight
  becomes a (3, 3, 3, 8) kernel."""
  del shape
  if path[-1] != "kernel":
    return value
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value.T if value.ndim == 2 else value
