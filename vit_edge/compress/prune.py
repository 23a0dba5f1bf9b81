"""Structured pruning that removes units: slice the parameter tree, record the widths.

The pruned network is an ordinary registry model: the kept units per layer go into
``config.model_overrides.unit_widths`` (module path -> heads or hidden channels), so
``train.build_model``, evaluation, export, benchmarks and ``init_from`` rebuild the
same shapes with no new code.

Command (a trained run in, a pruned run directory out; then evaluate, fine-tune
and export it with the standard commands)::

    python -m vit_edge.compress.prune --workdir=workdir/deit --out=workdir/deit_pruned \
        --importance=taylor --heads=0.34 --hidden=0.5
    python -m vit_edge.main --config=configs/compress/finetune.py:pruned=workdir/deit_pruned \
        --workdir=workdir/deit_pruned_ft
    python -m vit_edge.export --workdir=workdir/deit_pruned_ft

Python::

    keep = prune.select_units(groups, scores, prune.Ratios(heads=0.5, hidden=0.5))
    small_params = prune.slice_params(params, groups, keep)
    widths = prune.unit_widths(groups, keep)   # {"blocks_0/attn": 2, ...}
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from vit_edge.compress import groups as groups_lib
from vit_edge.compress import importance


class PruningError(ValueError):
  """A ratio or width that cannot be applied (names the layer and what would work)."""


@dataclasses.dataclass(frozen=True)
class Ratios:
  """Fractions of units to remove.

  Attributes:
    heads: fraction of attention heads removed per layer (or overall, global).
    hidden: fraction of MLP / FFN hidden units removed.
    per_layer: overrides by group key, e.g. {"blocks_3/mlp": 0.25}.
    scope: "layer" (each layer loses its fraction) or "global" (units ranked
      across layers of one kind, scores normalised by each layer's mean, as
      Torch-Pruning's global pruning does).
  """

  heads: float = 0.0
  hidden: float = 0.0
  per_layer: Mapping[str, float] = dataclasses.field(default_factory=dict)
  scope: str = "layer"

  def for_group(self, group: groups_lib.Group) -> float:
    return float(self.per_layer.get(group.key, getattr(self, group.kind)))


def _check_ratio(name: str, value: float) -> None:
  if not 0.0 <= value < 1.0:
    raise PruningError(f"Pruning ratio {name}={value} is outside [0, 1); it is the "
                       "fraction of units removed, e.g. 0.5 removes half.")


def _largest_ratio(num_units: int) -> float:
  """The largest ratio that keeps one unit: (n - 1) / n, rounded down to 2 digits."""
  return math.floor(100 * (num_units - 1) / num_units) / 100


def _kept_count(group: groups_lib.Group, ratio: float) -> int:
  keep = int(round(group.num_units * (1.0 - ratio)))
  if keep < 1:
    raise PruningError(
        f"Ratio {ratio} removes every {group.unit_name} of {group.key} "
        f"({group.num_units} units): the layer would vanish. Use a ratio <= "
        f"{_largest_ratio(group.num_units)} for it (per layer: "
        f"--layer={group.key}={_largest_ratio(group.num_units)}).")
  return keep


def select_units(groups: Sequence[groups_lib.Group], scores: Mapping[str, np.ndarray],
                 ratios: Ratios) -> dict[str, np.ndarray]:
  """Kept units per group (sorted indices), highest scores first.

  Raises:
    PruningError: a ratio outside [0, 1), or one that removes a whole layer or
      head set (the message names the layer and the largest ratio that works).
  """
  _check_ratio("heads", ratios.heads)
  _check_ratio("hidden", ratios.hidden)
  for key, value in ratios.per_layer.items():
    _check_ratio(key, value)
  known = {g.key for g in groups}
  unknown = sorted(set(ratios.per_layer) - known)
  if unknown:
    raise PruningError(f"per_layer names no prunable layer: {unknown}; the layers are "
                       f"{sorted(known)}.")
  if ratios.scope == "layer":
    return {g.key: np.sort(np.argsort(-scores[g.key], kind="stable")[
        :_kept_count(g, ratios.for_group(g))]) for g in groups}
  if ratios.scope != "global":
    raise PruningError(f"scope={ratios.scope!r}; expected 'layer' or 'global'.")
  keep = {}
  for kind in ("heads", "hidden"):
    members = [g for g in groups if g.kind == kind]
    if not members:
      continue
    ratio = getattr(ratios, kind)
    entries = []
    for g in members:
      normalised = scores[g.key] / (np.mean(np.abs(scores[g.key])) + 1e-12)
      entries += [(float(normalised[u]), g.key, u) for u in range(g.num_units)]
    entries.sort(key=lambda e: -e[0])
    total = len(entries)
    n_keep = int(round(total * (1.0 - ratio)))
    kept = entries[:n_keep]
    for g in members:
      units = np.sort(np.array([u for _, key, u in kept if key == g.key], np.int64))
      if units.size == 0:
        raise PruningError(
            f"Global {kind} ratio {ratio} removes every {g.unit_name} of {g.key}: the "
            f"layer would vanish. Lower the ratio, or use scope='layer' (largest "
            f"per-layer ratio for it: {_largest_ratio(g.num_units)}).")
      keep[g.key] = units
  return keep


def ratio_for_budget(groups: Sequence[groups_lib.Group], scores: Mapping[str, np.ndarray],
                     macs_of: Any, budget: float, kinds: Sequence[str] = ("heads", "hidden"),
                     scope: str = "layer") -> tuple[Ratios, int]:
  """The smallest ratio (0.01 steps), shared by `kinds`, whose network fits `budget`.

  `macs_of(keep)` gives the MACs of the network that keeps `keep`. Returns the
  ratios and the MACs they give.

  Raises:
    PruningError: the budget is below what the largest ratio allowed gives (one
      unit left in the smallest layer); the message names both MAC counts.
  """
  pruned = [g for g in groups if g.kind in kinds]
  if not pruned:
    raise PruningError(f"A MAC budget needs prunable units of kinds {list(kinds)}; "
                       f"this model has {sorted({g.kind for g in groups})}.")
  ratios = lambda r: Ratios(heads=r if "heads" in kinds else 0.0,
                            hidden=r if "hidden" in kinds else 0.0, scope=scope)
  macs = lambda r: int(macs_of(select_units(groups, scores, ratios(r))))
  unpruned = macs(0.0)
  if unpruned <= budget:
    return ratios(0.0), unpruned
  high = min(_largest_ratio(g.num_units) for g in pruned)
  smallest = macs(high)
  if smallest > budget:
    raise PruningError(
        f"MAC budget {budget:,.0f} cannot be met by pruning {'/'.join(kinds)}: the "
        f"network computes {unpruned:,} MACs unpruned and {smallest:,} at the largest "
        f"ratio {high} (one unit left in the smallest layer). Use a budget >= "
        f"{smallest:,}, or prune more kinds of units.")
  lo, hi = 0, int(round(high * 100))  # macs(lo/100) > budget >= macs(hi/100)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if macs(mid / 100) <= budget:
      hi = mid
    else:
      lo = mid
  return ratios(hi / 100), macs(hi / 100)


def _take(tree: Any, member: groups_lib.Member, indices: np.ndarray) -> Any:
  """`tree` with the member's tensor gathered at `indices` along its axis."""
  *parents, leaf = member.path
  tree = dict(tree)
  node = tree
  for p in parents:
    node[p] = dict(node[p])
    node = node[p]
  node[leaf] = np.take(np.asarray(node[leaf]), indices, axis=member.axis)
  return tree


def slice_params(params: Any, groups: Sequence[groups_lib.Group],
                 keep: Mapping[str, np.ndarray], collection: str = "params") -> Any:
  """The tree with only the kept units' slices (the pruned model's layout).

  `collection` names what `params` is: "params" (also for EMA parameters) or
  "batch_stats" (BatchNorm running statistics of pruned channels).
  """
  params = jax.tree_util.tree_map(np.asarray, params)
  for g in groups:
    units = [int(u) for u in keep[g.key]]
    for m in g.members:
      if m.collection == collection:
        params = _take(params, m, m.channels(units))
  return params


def zero_units(params: Any, groups: Sequence[groups_lib.Group],
               drop: Mapping[str, Sequence[int]]) -> Any:
  """The unpruned tree with the dropped units' outputs zeroed (their consumer rows).

  The reference that a pruned network must equal (tests/test_prune.py).
  """
  params = jax.tree_util.tree_map(np.array, params)
  for g in groups:
    units = list(drop.get(g.key, ()))
    if not units:
      continue
    for m in g.members:
      if m.consumer:
        node = params
        for p in m.path[:-1]:
          node = node[p]
        index = [slice(None)] * node[m.path[-1]].ndim
        index[m.axis] = m.channels(units)
        node[m.path[-1]][tuple(index)] = 0.0
  return params


def unit_widths(groups: Sequence[groups_lib.Group],
                keep: Mapping[str, np.ndarray]) -> dict[str, int]:
  """``model_overrides.unit_widths`` of the pruned model: key -> heads / channels."""
  return {g.key: int(g.width(len(keep[g.key]))) for g in groups}


# ---------------------------------------------------------------------------
# Pruning a trained run into a new run directory.


def _scoring_batches(config, model_info, num_batches: int, batch_size: int):
  from vit_edge import input_pipeline  # pylint: disable=g-import-not-at-top
  it = input_pipeline.create_train_iterator(
      config, mean=model_info.mean, std=model_info.std, local_batch_size=batch_size)
  return list(itertools.islice(it, num_batches))


def prune_run(workdir: str, out: str, *, importance_method: str, ratios: Ratios,
              num_batches: int = 4, batch_size: int = 64,
              step: Optional[int] = None, macs_budget: float = 0.0) -> dict[str, Any]:
  """Prunes the trained run `workdir` into the run directory `out`.

  `out` gets config.json (the same config with ``model_overrides.unit_widths`` and a
  ``pruning`` record), dataset_info.json and one checkpoint whose params, EMA params
  and BatchNorm statistics are sliced; evaluation, export and ``init_from`` read it
  like any run. Returns a summary: widths, parameter counts, scores.

  With `macs_budget` > 0 the ratio is searched instead (`ratio_for_budget`): the
  smallest one, for the kinds whose ratio in `ratios` is non-zero (both when
  neither is), that brings the network to at most that many MACs per image.

  Example::

      prune_run("workdir/deit", "workdir/deit_pruned", importance_method="taylor",
                ratios=Ratios(heads=0.34, hidden=0.5))
  """
  # Imported here: the group / slicing functions above stay light to import.
  from vit_edge import checkpointing  # pylint: disable=g-import-not-at-top
  from vit_edge import rundir  # pylint: disable=g-import-not-at-top
  from vit_edge import train  # pylint: disable=g-import-not-at-top
  from vit_edge import models  # pylint: disable=g-import-not-at-top

  if os.path.abspath(out) == os.path.abspath(workdir):
    raise PruningError(f"--out={out} is the source run; write the pruned run to a new "
                       "directory.")
  if rundir.is_run_dir(out) and rundir.checkpoint_steps(out):
    raise PruningError(f"{out} already holds a run with checkpoints; choose a new "
                       "--out directory (or delete it).")
  config = rundir.load_config(workdir)
  dataset_info = rundir.load_dataset_info(workdir)
  model = train.build_model(config, dataset_info["num_classes"])
  state = checkpointing.load_state(workdir, step)
  params = state["ema_params"] if state.get("ema_params") else state["params"]
  variables = {"params": params}
  if state.get("batch_stats"):
    variables["batch_stats"] = state["batch_stats"]
  groups = groups_lib.find_groups(model, params)
  batches = ()
  if importance_method != "l2":
    batches = _scoring_batches(config, models.get_model_info(config.model),
                               num_batches, batch_size)
  scores = importance.score_units(importance_method, model, variables, groups, batches)

  pruned_config = rundir.load_config(workdir)
  previous = dict(pruned_config.model_overrides.get("unit_widths", None) or {})

  def macs_of(keep):
    from vit_edge import complexity  # pylint: disable=g-import-not-at-top
    pruned_config.model_overrides.unit_widths = {**previous, **unit_widths(groups, keep)}
    return complexity.model_macs(
        train.build_model(pruned_config, dataset_info["num_classes"]),
        config.image_size)

  budget_macs = None
  if macs_budget:
    kinds = [k for k in ("heads", "hidden") if getattr(ratios, k)] or ["heads", "hidden"]
    ratios, budget_macs = ratio_for_budget(groups, scores, macs_of, macs_budget, kinds,
                                           ratios.scope)
  keep = select_units(groups, scores, ratios)
  widths = unit_widths(groups, keep)
  pruned_config.model_overrides.unit_widths = {**previous, **widths}
  pruned_config.pruning = {
      "source": os.path.abspath(workdir), "importance": importance_method,
      "heads": ratios.heads, "hidden": ratios.hidden, "scope": ratios.scope,
      "per_layer": dict(ratios.per_layer), "macs_budget": float(macs_budget)}
  trainer = train.Trainer(pruned_config, out, for_training=False)
  fresh = jax.device_get(trainer.fresh_state())
  new_state = dict(fresh, step=np.asarray(state["step"]),
                   params=slice_params(state["params"], groups, keep))
  if state.get("ema_params"):
    new_state["ema_params"] = slice_params(state["ema_params"], groups, keep)
  if state.get("batch_stats"):
    new_state["batch_stats"] = slice_params(state["batch_stats"], groups, keep,
                                            "batch_stats")
  _check_same_shapes(fresh, new_state, out)
  trainer.checkpoints.save(int(state["step"]), new_state, metrics=None)
  trainer.checkpoints.wait()
  trainer.write_run_files()
  count = lambda tree: int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))
  summary = {"widths": widths, "params_before": count(state["params"]),
             "params_after": count(new_state["params"]),
             "ratios": {"heads": ratios.heads, "hidden": ratios.hidden},
             "macs_after": budget_macs,
             "scores": {k: v.tolist() for k, v in scores.items()},
             "kept": {k: v.tolist() for k, v in keep.items()}}
  with open(os.path.join(out, "pruning.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def _check_same_shapes(fresh: Any, pruned: Any, out: str) -> None:
  """The sliced tree must be exactly what the pruned config builds."""
  for name in ("params", "ema_params", "batch_stats"):
    want = jax.tree_util.tree_map(np.shape, fresh.get(name) or {})
    got = jax.tree_util.tree_map(np.shape, pruned.get(name) or {})
    if want != got:
      raise PruningError(f"The sliced {name} do not match the shapes the pruned config "
                         f"builds for {out}; a group's slicing and the model's "
                         "unit_widths disagree (a bug: please report it).")


def _parse_per_layer(items: Sequence[str]) -> dict[str, float]:
  out = {}
  for item in items:
    if "=" not in item:
      raise PruningError(f"--layer {item!r}: expected KEY=RATIO, e.g. blocks_3/mlp=0.25.")
    key, value = item.split("=", 1)
    out[key] = float(value)
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  """CLI: prune a trained run into a new run directory (module docstring)."""
  parser = argparse.ArgumentParser(
      prog="python -m vit_edge.compress.prune",
      description="Structured pruning of a trained run (removes heads / hidden units).")
  parser.add_argument("--workdir", required=True, help="the trained run")
  parser.add_argument("--out", required=True, help="new run directory for the result")
  parser.add_argument("--importance", default="taylor", choices=importance.METHODS)
  parser.add_argument("--heads", type=float, default=0.0,
                      help="fraction of attention heads removed")
  parser.add_argument("--hidden", type=float, default=0.0,
                      help="fraction of MLP/FFN hidden units removed")
  parser.add_argument("--layer", action="append", default=[],
                      help="per-layer ratio KEY=RATIO (repeatable), e.g. blocks_3/mlp=0.25")
  parser.add_argument("--scope", default="layer", choices=("layer", "global"))
  parser.add_argument("--macs_budget", type=float, default=0.0,
                      help="MACs per image to prune down to (e.g. 2e8): searches the "
                           "smallest ratio for the kinds given by --heads/--hidden "
                           "(both when neither is given) instead of using them")
  parser.add_argument("--batches", type=int, default=4,
                      help="training batches for the taylor / hsic scores")
  parser.add_argument("--batch_size", type=int, default=64)
  args = parser.parse_args(argv)
  try:
    summary = prune_run(
        args.workdir, args.out, importance_method=args.importance,
        ratios=Ratios(args.heads, args.hidden, _parse_per_layer(args.layer), args.scope),
        num_batches=args.batches, batch_size=args.batch_size,
        macs_budget=args.macs_budget)
  except (PruningError, FileNotFoundError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"Pruned {args.workdir} -> {args.out}: params {summary['params_before']:,} -> "
        f"{summary['params_after']:,}")
  if summary["macs_after"] is not None:
    print(f"MAC budget {args.macs_budget:,.0f}: ratios heads {summary['ratios']['heads']}, "
          f"hidden {summary['ratios']['hidden']} -> {summary['macs_after']:,} MACs")
  print("unit_widths: " + json.dumps(summary["widths"]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
