r"""Benchmark of the routed MobileViTv2 variants against the dense ones (Markdown tables).

Table 1, one row per model: parameters, MACs per image the graph computes
(convolutions and matmuls, every expert slot included), MACs the tokens use,
float TFLite size, 1-thread latency (median, LiteRT/XNNPACK, batch 1), the
dropped-token rate at the eval capacity factor on 16 eval images (routed models;
the run's own eval split, or embedded digits), and top-1 when ``--workdirs``
names trained runs (otherwise the models are randomly initialised and there is
no accuracy).

Table 2, one row per routed layer shape of ``--moe_model``: the TFLite time of the
mixture-of-experts layer alone, with "gather" dispatch (the training form) and
"dense" dispatch (the same outputs; the export form takes it for top-2 layers),
next to the dense FFN it replaces (same tokens, same width), each exported
through the export pipeline's converter. Table 1's MACs are those of the
exported form.

Usage::

    nice -n 5 python -m vit_edge.tools.bench_moe --image_size=256 --runs=30
    python -m vit_edge.tools.bench_moe \
        --workdirs=mobilevitv2_moe_xs=workdir/moe_xs_fashion,mobilevitv2_050=workdir/m050

Latencies depend on the machine and its load: report them with ``uptime``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vit_edge import complexity
from vit_edge import export
from vit_edge import hugepages
from vit_edge import models
from vit_edge.export import inference
from vit_edge.export import serving as serving_lib
from vit_edge.models import layers
from vit_edge.models import mobilevitv2_moe
from vit_edge.models import moe
from vit_edge.runtime import latency

DEFAULT_MODELS = ("mobilevitv2_100", "mobilevitv2_050", "mobilevitv2_moe_xs",
                  "mobilevitv2_moe_s", "mobilevitv2_moe_m")


def _eval_images(image_size: int, count: int, mean, std, run_config=None
                 ) -> np.ndarray:
  """The first `count` eval images of a run's data set, else of embedded digits."""
  from vit_edge import input_pipeline  # pylint: disable=g-import-not-at-top
  from vit_edge.export import data  # pylint: disable=g-import-not-at-top
  config = run_config or data.digits_config(image_size, input_pipeline.DEFAULT_CROP_PCT,
                                            "bilinear")
  batches = input_pipeline.create_eval_iterator(config, mean=mean, std=std,
                                                local_batch_size=count)
  return data.first_images(batches, count)


def dropped_rate(model, variables, images: np.ndarray) -> Optional[float]:
  """Fraction of token choices without a slot at eval, over all routed layers."""
  _, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  routed = moe.routed_layers(aux)
  if not routed:
    return None
  return 1.0 - float(np.mean([np.mean(aux[f"{l}/moe_kept"]) for l in routed]))


def model_row(name: str, image_size: int, num_classes: int, out_dir: str,
              runs: int, warmup: int, workdir: Optional[str]) -> dict[str, Any]:
  """One row of table 1 (see the module docstring)."""
  path = os.path.join(out_dir, f"{name}_{image_size}.tflite")
  if workdir:
    from vit_edge import train  # pylint: disable=g-import-not-at-top
    model, variables, config, info = train.load_trained_model(workdir)
    image_size, num_classes = int(config.image_size), int(info["num_classes"])
    report = export.export_from_workdir(workdir, path, num_parity_samples=4)
    top1 = report.eval_top1_jax
    mean, std = info["mean"], info["std"]
  else:
    info = models.get_model_info(name)
    model = models.create_model(name, num_classes=num_classes)
    variables = jax.jit(model.init)(jax.random.key(0),
                                    jnp.zeros((1, image_size, image_size, 3)))
    report = export.export_from_registry(name, path, image_size=image_size,
                                         num_classes=num_classes,
                                         num_parity_samples=4, max_eval_examples=0)
    top1, mean, std, config = None, info.mean, info.std, None
  exported = inference.export_model(model)  # What the .tflite file computes.
  stats = complexity.model_complexity(exported, image_size)
  used = stats.macs
  if isinstance(exported, mobilevitv2_moe.RoutedMobileViTv2):
    routed = mobilevitv2_moe.routed_complexity(exported, image_size)
    used = stats.macs - routed["computed"] + routed["used"]
  timing = latency.measure(path, num_threads=1, runs=runs, warmup=warmup)
  images = _eval_images(image_size, 16, mean, std, config)
  return {"model": name, "image_size": image_size, "params": stats.params,
          "macs": stats.macs, "macs_used": used, "size_mb": report.size_bytes / 1e6,
          "latency_ms": timing["median_ms"], "top1": top1,
          "dropped": dropped_rate(model, variables, images)}


def _layer_ms(module, tokens_shape: tuple[int, ...], path: str, runs: int,
              warmup: int) -> float:
  x = jnp.zeros(tokens_shape)
  variables = jax.jit(module.init)(jax.random.key(0), x)

  def serve(model, variables, tokens):
    y = model.apply(variables, tokens)
    return {"y": y[0] if isinstance(y, tuple) else y}

  spec = serving_lib.ServingSpec(
      inputs=[serving_lib.TensorSpec("tokens", tuple(tokens_shape))],
      outputs=[serving_lib.OutputSpec("y", "tensor")], fn=serve)
  with open(path, "wb") as f:
    f.write(export.to_tflite(module, variables, serving=spec))
  return latency.measure(path, num_threads=1, runs=runs, warmup=warmup)["median_ms"]


def layer_rows(name: str, image_size: int, out_dir: str, runs: int,
               warmup: int) -> list[dict[str, Any]]:
  """Table 2: each routed layer shape of `name` against its dense FFN."""
  model = models.create_model(name, num_classes=10)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  _, aux = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  rows, seen = [], set()
  for layer in moe.routed_layers(aux):
    stage, index = layer.split("_")
    ffn = variables["params"][f"stages_{int(stage[5:]) - 1}_1"][
        f"transformer_{index[5:]}"]["mlp"]
    num_experts, dim, _ = ffn["wi"].shape
    tokens = aux[f"{layer}/moe_expert"].shape[1]
    if (dim, tokens) in seen:
      continue
    seen.add((dim, tokens))
    patch_pixels = 4
    shape = (1, patch_pixels, tokens // patch_pixels, dim)
    dense_hidden = int(dim * 2.0)
    routed = moe.MoeFfn(hidden_features=dense_hidden, num_experts=model.num_experts,
                        num_selected=model.num_selected,
                        expert_hidden_ratio=model.expert_hidden_ratio,
                        capacity_factor_eval=model.capacity_factor_eval)
    dense = layers.Mlp(hidden_features=dense_hidden, act=jax.nn.silu)
    gather_ms = _layer_ms(routed, shape, os.path.join(out_dir, f"{layer}_moe.tflite"),
                          runs, warmup)
    dense_dispatch_ms = _layer_ms(routed.clone(dispatch="dense"), shape,
                                  os.path.join(out_dir, f"{layer}_moe_dense.tflite"),
                                  runs, warmup)
    dense_ms = _layer_ms(dense, shape, os.path.join(out_dir, f"{layer}_dense.tflite"),
                         runs, warmup)
    rows.append({"layer": f"{stage} ({name})", "tokens": tokens, "dim": dim,
                 "experts": f"{num_experts} top-{model.num_selected}",
                 "capacity": routed.capacity(tokens, train=False),
                 "exported": routed.clone(dispatch="auto").resolved_dispatch(
                     tokens, train=False),
                 "gather_ms": gather_ms, "dense_dispatch_ms": dense_dispatch_ms,
                 "dense_ms": dense_ms})
  return rows


def _fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def models_table(rows: Sequence[dict[str, Any]]) -> str:
  lines = ["| model | input | params | MACs computed (M) | MACs used (M) | top-1 "
           "| TFLite MB | 1-thread ms | dropped |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['model']} | {r['image_size']} | {r['params']:,} | "
        f"{r['macs'] / 1e6:.1f} | {r['macs_used'] / 1e6:.1f} | "
        f"{_fmt(r['top1'] and 100 * r['top1'], '.2f')} | {r['size_mb']:.2f} | "
        f"{r['latency_ms']:.2f} | {_fmt(r['dropped'], '.1%')} |")
  return "\n".join(lines)


def layers_table(rows: Sequence[dict[str, Any]]) -> str:
  lines = ["| layer | tokens | d | experts | capacity | MoE ms, gather dispatch "
           "| MoE ms, dense dispatch | dense FFN ms | gather / FFN | dense / FFN "
           "| exported form |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['layer']} | {r['tokens']} | {r['dim']} | {r['experts']} | "
                 f"{r['capacity']} | {r['gather_ms']:.3f} | {r['dense_dispatch_ms']:.3f} | "
                 f"{r['dense_ms']:.3f} | {r['gather_ms'] / r['dense_ms']:.2f}x | "
                 f"{r['dense_dispatch_ms'] / r['dense_ms']:.2f}x | {r['exported']} |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--workdirs", default="",
                      help="name=workdir,... trained runs to use for those rows.")
  parser.add_argument("--moe_model", default="mobilevitv2_moe_xs",
                      help="Routed model whose layers table 2 times ('' skips it).")
  parser.add_argument("--skip_models", action="store_true", help="Table 2 only.")
  parser.add_argument("--runs", type=int, default=30)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--out_dir", default="", help="Where the .tflite files go "
                      "(default: a temporary directory).")
  args = parser.parse_args(argv)
  workdirs = dict(w.split("=", 1) for w in args.workdirs.split(",") if w)
  out_dir = args.out_dir or tempfile.mkdtemp(prefix="bench_moe_")
  os.makedirs(out_dir, exist_ok=True)
  if not args.skip_models:
    rows = [model_row(n, args.image_size, args.num_classes, out_dir, args.runs,
                      args.warmup, workdirs.get(n))
            for n in args.models.split(",") if n]
    print(models_table(rows))
    print()
  if args.moe_model:
    print(layers_table(layer_rows(args.moe_model, args.image_size, out_dir,
                                  args.runs, args.warmup)))


if __name__ == "__main__":
  hugepages.restart_with_hugepages()  # Before JAX starts (glibc reads it at exec).
  main()
