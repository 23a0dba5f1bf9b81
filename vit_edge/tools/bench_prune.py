"""Structured-pruning benchmarks that print Markdown tables (not run by the tests).

1. Size and 1-thread latency of the unpruned vs the pruned fp32 TFLite file per
   family, at the same ratios (each file exported through vit_edge.export with its
   parity guard; random weights, the shapes are what counts for size and speed)::

       python -m vit_edge.tools.bench_prune --models=deit_tiny_patch16,edgevit_xxs,tformer_s \
           --image_size=224 --heads=0.5 --hidden=0.5

2. With ``--workdir`` (a trained run): the importance scores side by side at one
   ratio. For L2, Taylor and HSIC it prunes the run (python -m vit_edge.compress.prune),
   evaluates the pruned run before any fine-tuning, and prints top-1, the rank
   correlation of the scores and the overlap of the kept units::

       python -m vit_edge.tools.bench_prune --models= --workdir=workdir/deit \
           --heads=0.5 --hidden=0.5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vit_edge import bench
from vit_edge import complexity
from vit_edge import hugepages
from vit_edge import models
from vit_edge.compress import groups as groups_lib
from vit_edge.compress import importance
from vit_edge.compress import prune


def pruned_widths(name: str, image_size: int, ratios: prune.Ratios,
                  num_classes: int) -> dict[str, int]:
  """unit_widths of `name` pruned by L2 at `ratios` (random init, seed 0)."""
  model = models.create_model_at_size(name, image_size, num_classes=num_classes)
  params = jax.jit(model.init)(jax.random.key(0),
                               jnp.zeros((1, image_size, image_size, 3)))["params"]
  groups = groups_lib.find_groups(model, params)
  keep = prune.select_units(groups, importance.l2_scores(params, groups), ratios)
  return prune.unit_widths(groups, keep)


def _export_and_time(name: str, image_size: int, overrides: dict[str, Any], out: str,
                     num_classes: int, runs: int, warmup: int) -> dict[str, Any]:
  from vit_edge import export  # pylint: disable=g-import-not-at-top
  report = export.export_from_registry(
      name, out, image_size=image_size, num_classes=num_classes,
      num_parity_samples=4, max_eval_examples=0, overrides=overrides)
  model = models.create_model_at_size(name, image_size, num_classes=num_classes,
                                      **overrides)
  cplx = complexity.model_complexity(model, image_size)
  latency = bench._latency(out, threads=1, runs=runs, warmup=warmup)  # pylint: disable=protected-access
  return {"size_mb": os.path.getsize(out) / 1e6, "median_ms": latency["median_ms"],
          "params": cplx.params, "gmacs": cplx.macs / 1e9,
          "parity": report.max_abs_logit_diff}


def size_latency_table(names: Sequence[str], image_size: int, ratios: prune.Ratios,
                       out_dir: str, num_classes: int = 10, runs: int = 30,
                       warmup: int = 5) -> str:
  """Markdown: unpruned vs pruned fp32 TFLite per family."""
  lines = ["| model | variant | params | GMACs | file MB | 1-thread ms | size | speed-up |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
  for name in names:
    widths = pruned_widths(name, image_size, ratios, num_classes)
    base = _export_and_time(name, image_size, {}, os.path.join(out_dir, f"{name}.tflite"),
                            num_classes, runs, warmup)
    small = _export_and_time(name, image_size, {"unit_widths": widths},
                             os.path.join(out_dir, f"{name}_pruned.tflite"),
                             num_classes, runs, warmup)
    for variant, r in (("unpruned", base), ("pruned", small)):
      lines.append(
          f"| {name} | {variant} | {r['params'] / 1e6:.2f}M | {r['gmacs']:.3f} | "
          f"{r['size_mb']:.2f} | {r['median_ms']:.2f} | "
          f"{r['size_mb'] / base['size_mb']:.0%} | "
          f"{base['median_ms'] / r['median_ms']:.2f}x |")
    print(lines[-2] + "\n" + lines[-1], flush=True)
  return "\n".join(lines)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
  ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  if ra.std() == 0 or rb.std() == 0:
    return float("nan")
  return float(np.corrcoef(ra, rb)[0, 1])


def importance_table(workdir: str, ratios: prune.Ratios, out_dir: str,
                     num_batches: int = 4, batch_size: int = 64) -> str:
  """Markdown: L2 vs Taylor vs HSIC at one ratio on a trained run (no fine-tuning)."""
  from vit_edge import rundir  # pylint: disable=g-import-not-at-top
  from vit_edge import train  # pylint: disable=g-import-not-at-top
  base = train.evaluate(rundir.load_config(workdir), workdir)
  results = {}
  for method in importance.METHODS:
    out = os.path.join(out_dir, f"pruned_{method}")
    summary = prune.prune_run(workdir, out, importance_method=method, ratios=ratios,
                              num_batches=num_batches, batch_size=batch_size)
    results[method] = (summary, train.evaluate(rundir.load_config(out), out))
  lines = [f"Unpruned top-1: {base['eval/top1']:.4f}", "",
           "| importance | params | top-1 after pruning (no fine-tune) | "
           "mean Spearman vs L2 | kept-unit overlap with L2 |",
           "|---|---:|---:|---:|---:|"]
  l2 = results["l2"][0]
  for method, (summary, ev) in results.items():
    rho = np.nanmean([_spearman(np.array(summary["scores"][k]), np.array(v))
                      for k, v in l2["scores"].items()])
    overlap = np.mean([len(set(summary["kept"][k]) & set(v)) / max(1, len(v))
                       for k, v in l2["kept"].items()])
    lines.append(f"| {method} | {summary['params_after']:,} | {ev['eval/top1']:.4f} | "
                 f"{rho:.2f} | {overlap:.0%} |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vit_edge.tools.bench_prune",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="deit_tiny_patch16,edgevit_xxs,tformer_s")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--heads", type=float, default=0.5)
  parser.add_argument("--hidden", type=float, default=0.5)
  parser.add_argument("--runs", type=int, default=30)
  parser.add_argument("--workdir", default=None,
                      help="trained run for the importance comparison")
  parser.add_argument("--out_dir", default=None)
  args = parser.parse_args(argv)
  out_dir = args.out_dir or tempfile.mkdtemp(prefix="bench_prune_")
  ratios = prune.Ratios(heads=args.heads, hidden=args.hidden)
  names = [n for n in args.models.split(",") if n]
  if names:
    print(f"Unpruned vs pruned fp32 TFLite at {args.image_size}px, heads {args.heads}, "
          f"hidden {args.hidden} (L2), {args.runs} runs, 1 thread; files in {out_dir}")
    print(size_latency_table(names, args.image_size, ratios, out_dir, runs=args.runs))
  if args.workdir:
    print(importance_table(args.workdir, ratios, out_dir))
  return 0


if __name__ == "__main__":
  hugepages.restart_with_hugepages()  # Before JAX starts (glibc reads it at exec).
  sys.exit(main())
