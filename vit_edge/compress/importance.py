"""Importance of each prunable unit: L2 magnitude, first-order Taylor, DeViT's HSIC.

Every scorer returns ``{group.key: float64 [group.num_units]}``; higher = keep.

* ``l2``: the L2 norm of all the unit's weights (every member slice of its group).
* ``taylor``: ``sum |w * dL/dw|`` over the unit's weights, L the cross-entropy on
  labelled batches, summed over the batches (Molchanov et al. 2019; Torch-Pruning's
  ``TaylorImportance`` on the same coupled group).
* ``hsic``: DeViT's scores (falcon-xu/DeViT ``core/imp_rank.py``, commit 6676996),
  computed on the unit's output, i.e. the consumer's (proj / fc2) input, per sample a
  token (or pixel) sequence:

  - hidden unit j: ``0.1 minmax(HSIC(a_j, softmax f(x))) + 0.9 minmax(sum |a_j|)``;
  - head h (the mean over its channels): ``HSIC(a_h, softmax f(x)) - 0.1 mean_{h' != h}
    HSIC_rbf(a_h, a_h')`` (relevance minus redundancy).

  HSIC = ``tr(center(K_X) center(K_Y))``, K_X the mean of Gaussian kernels with sigma
  1, 2, 4, 8, 16, K_Y linear for relevance (Gaussian for redundancy). Fixed here: the
  reference standardises with ``x - mean / (std + 1e-12)`` (an operator-precedence
  slip that subtracts mean/std); this module computes ``(x - mean) / (std + 1e-12)``.
  Multi-channel units (PCS-FFN shuffle units) use the mean over their channels, as
  the reference does for heads.

Example::

    scores = importance.score_units("taylor", model, variables, groups, batches)
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_edge.compress import groups as groups_lib

METHODS = ("l2", "taylor", "hsic")
_SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)


def _per_channel(x: np.ndarray, axis: int) -> np.ndarray:
  """Sum over every axis but `axis`."""
  return np.sum(x, axis=tuple(a for a in range(x.ndim) if a != axis % x.ndim))


def _unit_sums(group: groups_lib.Group, tensors: Sequence[np.ndarray]) -> np.ndarray:
  """Sum over each unit's channels of every member (tensors: per member, per channel)."""
  out = np.zeros(group.num_units, np.float64)
  for member, per_channel in zip(group.weights, tensors):
    for u in range(group.num_units):
      out[u] += per_channel[member.channels([u])].sum()
  return out


def _leaf(tree: Any, path: Sequence[str]) -> np.ndarray:
  for p in path:
    tree = tree[p]
  return np.asarray(tree, np.float64)


def l2_scores(params: Any, groups: Sequence[groups_lib.Group]) -> dict[str, np.ndarray]:
  """L2 norm of each unit's weights."""
  out = {}
  for g in groups:
    sq = [_per_channel(_leaf(params, m.path) ** 2, m.axis) for m in g.weights]
    out[g.key] = np.sqrt(_unit_sums(g, sq))
  return out


def _cross_entropy(model: nn.Module, variables: Any):
  def loss(params, images, labels):
    logits, _ = model.apply({**variables, "params": params}, images, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels).mean()
  return jax.jit(jax.grad(loss))


def taylor_scores(model: nn.Module, variables: Any, groups: Sequence[groups_lib.Group],
                  batches: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """First-order Taylor ``sum |w * dL/dw|`` per unit, summed over `batches`."""
  grad_fn = _cross_entropy(model, variables)
  params = variables["params"]
  out = {g.key: np.zeros(g.num_units) for g in groups}
  seen = 0
  for batch in batches:
    grads = grad_fn(params, batch["image"], batch["label"])
    for g in groups:
      terms = [_per_channel(np.abs(_leaf(params, m.path) * _leaf(grads, m.path)), m.axis)
               for m in g.weights]
      out[g.key] += _unit_sums(g, terms)
    seen += 1
  if not seen:
    raise ValueError("taylor importance needs at least one labelled batch; got none.")
  return out


def consumer_inputs(model: nn.Module, variables: Any, images: jax.Array,
                    consumers: Sequence[str]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(logits, {module path: its input}) for the modules named in `consumers`."""
  wanted = set(consumers)

  def run(variables, images):
    seen = {}

    def record(next_fun, args, kwargs, context):
      if context.method_name == "__call__":
        path = "/".join(context.module.scope.path)
        if path in wanted:
          seen[path] = args[0]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      logits, _ = model.apply(variables, images, train=False)
    return logits, seen

  logits, seen = jax.jit(run)(variables, images)
  missing = wanted - set(seen)
  if missing:
    raise ValueError(f"No module at {sorted(missing)} was called; the prunable groups "
                     "do not match the model (was it built from another config?).")
  return logits, seen


def _gaussian_gram(x: np.ndarray, sigma: float) -> np.ndarray:
  sq = np.sum(x * x, axis=1)
  dist = sq[:, None] + sq[None, :] - 2.0 * x @ x.T
  return np.exp(-dist / (2.0 * sigma * sigma))


def _center(k: np.ndarray) -> np.ndarray:
  return k - k.mean(0, keepdims=True) - k.mean(1, keepdims=True) + k.mean()


def hsic(x: np.ndarray, y: np.ndarray, y_kernel: str = "linear",
         standardise: bool = False) -> float:
  """DeViT's HSIC between per-sample features x [B, ...] and y [B, ...]."""
  x = x.reshape(x.shape[0], -1).astype(np.float64)
  y = y.reshape(y.shape[0], -1).astype(np.float64)
  if standardise:
    x = (x - x.mean(0)) / (x.std(0) + 1e-12)
    y = y - y.mean(0)
  gx = _center(np.mean([_gaussian_gram(x, s) for s in _SIGMAS], axis=0))
  if y_kernel == "linear":
    gy = _center(y @ y.T)
  else:
    gy = _center(np.mean([_gaussian_gram(y, s) for s in _SIGMAS], axis=0))
  return float(np.trace(gx @ gy))


def _minmax(v: np.ndarray) -> np.ndarray:
  span = v.max() - v.min()
  return (v - v.min()) / span if span > 0 else np.zeros_like(v)


def _unit_activations(group: groups_lib.Group, act: np.ndarray) -> np.ndarray:
  """[units, B, S]: each unit's output, the mean over its consumer channels."""
  act = act.reshape(act.shape[0], -1, act.shape[-1])
  return np.stack([act[..., group.consumer_channels([u])].mean(-1)
                   for u in range(group.num_units)])


def hsic_scores(model: nn.Module, variables: Any, groups: Sequence[groups_lib.Group],
                batches: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """DeViT's neuron / head scores (module docstring), summed over `batches`."""
  out = {g.key: np.zeros(g.num_units) for g in groups}
  seen = 0
  for batch in batches:
    logits, acts = consumer_inputs(model, variables, batch["image"],
                                   [g.consumer for g in groups])
    probs = np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
    for g in groups:
      act = np.asarray(acts[g.consumer], np.float64)
      units = _unit_activations(g, act)
      if g.kind == "heads":
        score = np.zeros(g.num_units)
        for h in range(g.num_units):
          relevance = hsic(units[h], probs, "linear", standardise=True)
          others = [hsic(units[h], units[o], "rbf") for o in range(g.num_units) if o != h]
          score[h] = relevance - 0.1 * (np.mean(others) if others else 0.0)
      else:
        rel = np.array([hsic(units[u], probs, "linear", standardise=True)
                        for u in range(g.num_units)])
        flat = np.abs(act.reshape(-1, act.shape[-1]))
        magnitude = np.array([flat[:, g.consumer_channels([u])].sum()
                              for u in range(g.num_units)])
        score = 0.1 * _minmax(rel) + 0.9 * _minmax(magnitude)
      out[g.key] += score
    seen += 1
  if not seen:
    raise ValueError("hsic importance needs at least one batch; got none.")
  return out


def score_units(method: str, model: nn.Module, variables: Any,
                groups: Sequence[groups_lib.Group],
                batches: Iterable[dict[str, np.ndarray]] = ()) -> dict[str, np.ndarray]:
  """Importance of every unit of `groups` by `method` ("l2", "taylor" or "hsic")."""
  if method == "l2":
    return l2_scores(variables["params"], groups)
  if method == "taylor":
    return taylor_scores(model, variables, groups, batches)
  if method == "hsic":
    return hsic_scores(model, variables, groups, batches)
  raise ValueError(f"Unknown importance {method!r}; expected one of {list(METHODS)}.")
