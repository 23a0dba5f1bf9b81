"""Structured pruning: group slicing per family, importance scores, bad ratios.

The core property: the pruned (smaller) network built from ``unit_widths`` with the
sliced parameters equals the unpruned network with the removed units' outputs zeroed.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_edge import models
from vit_edge.compress import groups as groups_lib
from vit_edge.compress import importance
from vit_edge.compress import prune

# Tiny shapes: every family's prunable groups, compiled in seconds.
FAMILIES = {
    "deit_tiny_patch16": dict(embed_dim=32, depth=2, num_heads=4, image_size=32,
                              patch_size=8),
    # Stage 4 has sr_ratio 1: its heads are prunable.
    "edgevit_xxs": dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), head_dim=8),
    # Layer scale 1 (not 1e-5) so that the FFNs visibly change the output.
    "tformer_s": dict(depths=(1, 1, 1, 1), widths=(8, 16, 24, 32),
                      layer_scale_init=1.0),
    # Inverted-residual hidden channels (with BatchNorm statistics) and FFN units.
    "mobilevitv2_050": dict(width_multiplier=0.5),
}


@functools.lru_cache(maxsize=None)
def _init_once(name):
  model = models.create_model(name, num_classes=5, **FAMILIES[name])
  return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def _init(name):
  """(model, variables as writable numpy copies); initialised once per family."""
  model, variables = _init_once(name)
  return model, jax.tree_util.tree_map(np.array, variables)


def _apply(model, variables, x):
  return np.asarray(jax.jit(model.apply)(variables, x)[0])


def _randomise_biases(variables, seed=1):
  """Non-zero biases and BatchNorm statistics, so that mis-slicing one would show."""
  rng = np.random.default_rng(seed)
  def visit(path, x):
    if path[-1].key in ("bias", "mean"):
      return rng.normal(0, 0.1, x.shape).astype(x.dtype)
    if path[-1].key == "var":
      return rng.uniform(0.5, 2.0, x.shape).astype(x.dtype)
    return x
  return jax.tree_util.tree_map_with_path(visit, variables)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_pruned_network_equals_unpruned_with_units_zeroed(name):
  model, variables = _init(name)
  variables = _randomise_biases(variables)
  params = variables["params"]
  groups = groups_lib.find_groups(model, params)
  kinds = {g.kind for g in groups}
  assert kinds == {"heads", "hidden"} or name.startswith(("tformer", "mobilevitv2"))
  rng = np.random.default_rng(0)
  scores = {g.key: rng.normal(size=g.num_units) for g in groups}
  keep = prune.select_units(groups, scores, prune.Ratios(heads=0.5, hidden=0.5))
  drop = {g.key: sorted(set(range(g.num_units)) - set(keep[g.key].tolist()))
          for g in groups}
  assert all(drop.values())

  widths = prune.unit_widths(groups, keep)
  small = models.create_model(name, num_classes=5, **FAMILIES[name], unit_widths=widths)
  small_params = prune.slice_params(params, groups, keep)
  # The sliced tree is exactly what the widths build.
  built = jax.eval_shape(small.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert (jax.tree_util.tree_map(np.shape, built["params"])
          == jax.tree_util.tree_map(np.shape, small_params))
  count = lambda t: sum(x.size for x in jax.tree_util.tree_leaves(t))
  assert count(small_params) < count(params)

  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  zeroed = {**variables, "params": prune.zero_units(params, groups, drop)}
  apply = jax.jit(model.apply)  # One compilation for both unpruned variants.
  want = np.asarray(apply(zeroed, x)[0])
  small_variables = {"params": small_params}
  if "batch_stats" in variables:
    small_variables["batch_stats"] = prune.slice_params(
        variables["batch_stats"], groups, keep, "batch_stats")
  got = _apply(small, small_variables, x)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  # And the pruning changed something (the zeroed units did contribute).
  assert np.abs(np.asarray(apply(variables, x)[0]) - want).max() > 1e-3


def test_tformer_export_form_runs_the_pruned_ffn():
  model, variables = _init("tformer_s")
  groups = groups_lib.find_groups(model, variables["params"])
  keep = prune.select_units(groups, {g.key: np.arange(g.num_units, dtype=float)
                                     for g in groups}, prune.Ratios(hidden=0.5))
  small = models.create_model("tformer_s", num_classes=5, **FAMILIES["tformer_s"],
                              unit_widths=prune.unit_widths(groups, keep))
  v = {**variables, "params": prune.slice_params(variables["params"], groups, keep)}
  x = jax.random.normal(jax.random.key(3), (1, 32, 32, 3))
  np.testing.assert_allclose(_apply(small.export_form(), v, x), _apply(small, v, x),
                             atol=1e-5)
  # Widths are whole shuffle units: groups^2 = 4 channels each.
  assert all(w % 4 == 0 for w in prune.unit_widths(groups, keep).values())


def test_pruning_twice_composes():
  model, variables = _init("deit_tiny_patch16")
  params = variables["params"]
  groups = groups_lib.find_groups(model, params)
  scores = importance.l2_scores(params, groups)
  keep = prune.select_units(groups, scores, prune.Ratios(heads=0.25, hidden=0.25))
  widths = prune.unit_widths(groups, keep)
  small = models.create_model("deit_tiny_patch16", num_classes=5,
                              **FAMILIES["deit_tiny_patch16"], unit_widths=widths)
  small_params = prune.slice_params(params, groups, keep)
  again = groups_lib.find_groups(small, small_params)
  assert [g.num_units for g in again] == [3, 96, 3, 96]


@pytest.mark.parametrize("method", importance.METHODS)
def test_a_dead_unit_scores_lowest(method):
  """A hidden unit with all-zero weights contributes nothing and ranks last."""
  model, variables = _init("deit_tiny_patch16")
  variables = _randomise_biases(variables)
  params = variables["params"]
  groups = groups_lib.find_groups(model, params)
  mlp = next(g for g in groups if g.key == "blocks_1/mlp")
  dead = 7
  for m in mlp.members:
    node = params
    for p in m.path[:-1]:
      node = node[p]
    index = [slice(None)] * node[m.path[-1]].ndim
    index[m.axis] = m.channels([dead])
    node[m.path[-1]][tuple(index)] = 0.0
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
              "label": rng.integers(0, 5, 8).astype(np.int32)}]
  scores = importance.score_units(method, model, variables, groups, batches)
  assert {k: v.shape for k, v in scores.items()} == {g.key: (g.num_units,)
                                                    for g in groups}
  assert int(np.argmin(scores["blocks_1/mlp"])) == dead
  assert np.all(np.isfinite(np.concatenate(list(scores.values()))))


def test_l2_of_a_head_is_the_norm_of_its_slices():
  model, variables = _init("deit_tiny_patch16")
  params = variables["params"]
  g = next(g for g in groups_lib.find_groups(model, params) if g.key == "blocks_0/attn")
  attn = params["blocks_0"]["attn"]
  inner, hd = 32, 8
  cols = np.concatenate([np.arange(s * inner + 8, s * inner + 16) for s in range(3)])
  want = np.sqrt((attn["qkv"]["kernel"][:, cols] ** 2).sum()
                 + (attn["qkv"]["bias"][cols] ** 2).sum()
                 + (attn["proj"]["kernel"][hd:2 * hd] ** 2).sum())
  assert importance.l2_scores(params, [g])[g.key][1] == pytest.approx(want, rel=1e-6)


def test_ratio_that_removes_a_whole_head_set_names_layer_and_working_value():
  model, variables = _init("deit_tiny_patch16")
  groups = groups_lib.find_groups(model, variables["params"])
  scores = importance.l2_scores(variables["params"], groups)
  with pytest.raises(prune.PruningError, match=r"blocks_0/attn.*ratio <= 0.75"):
    prune.select_units(groups, scores, prune.Ratios(heads=0.9))  # 4 heads.
  with pytest.raises(prune.PruningError, match=r"blocks_0/mlp.*ratio <= 0.99"):
    prune.select_units(groups, scores,
                       prune.Ratios(per_layer={"blocks_0/mlp": 0.999}))
  with pytest.raises(prune.PruningError, match=r"outside \[0, 1\)"):
    prune.select_units(groups, scores, prune.Ratios(hidden=1.0))
  with pytest.raises(prune.PruningError, match=r"names no prunable layer.*blocks_9"):
    prune.select_units(groups, scores, prune.Ratios(per_layer={"blocks_9/mlp": 0.5}))


def test_global_ratio_ranks_across_layers_and_refuses_to_empty_one():
  model, variables = _init("deit_tiny_patch16")  # 128 hidden units per block.
  groups = groups_lib.find_groups(model, variables["params"])
  scores = {g.key: np.ones(g.num_units) for g in groups}
  # Per layer scores are divided by their mean: blocks_0's top half (3x its
  # mean-normalised bottom half) outranks blocks_1's uniform units.
  scores["blocks_0/mlp"] = np.repeat([0.5, 1.5], 64)
  keep = prune.select_units(groups, scores, prune.Ratios(hidden=0.5, scope="global"))
  assert len(keep["blocks_0/mlp"]) + len(keep["blocks_1/mlp"]) == 128
  assert len(keep["blocks_0/mlp"]) == 64 and np.all(keep["blocks_0/mlp"] >= 64)
  scores["blocks_0/mlp"] = np.repeat([1e-3, 100.0], 64)
  with pytest.raises(prune.PruningError,
                     match="removes every hidden unit of blocks_1/mlp"):
    prune.select_units(groups, scores, prune.Ratios(hidden=0.75, scope="global"))


def test_family_without_groups_is_a_clear_error():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  with pytest.raises(NotImplementedError, match="Dense.*supported: VisionTransformer"):
    groups_lib.find_groups(nn.Dense(3), {})
