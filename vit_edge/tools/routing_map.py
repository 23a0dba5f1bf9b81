"""Routing picture of a routed (mixture-of-experts) model: which expert each token took.

Writes one PNG: a row per eval image (the image, then one map per routed layer with
each token coloured by its first-choice expert, grey where every choice of the
token was dropped for lack of capacity), and a last row with each layer's
per-expert load (tokens processed, over the shown images). Eval-mode routing, the
routing an exported file computes.

Usage::

    # A trained run:
    python -m vit_edge.tools.routing_map --workdir=workdir/mobilevitv2_moe_xs \
        --out=/tmp/routing.png
    # A randomly initialised registry model on the embedded digits:
    python -m vit_edge.tools.routing_map --model=mobilevitv2_moe_xs --image_size=64 \
        --out=/tmp/routing.png
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vit_edge.models import mobilevitv2
from vit_edge.models import moe

PATCH_SIZE = 2  # MobileViTv2's unfold: token [p, n] is pixel p of 2x2 patch n.


def expert_maps(aux: dict[str, Any], layer: str) -> np.ndarray:
  """[B, H, W] first-choice expert of each token of `layer`; -1 where dropped.

  Tokens are laid back on the layer's feature map (the inverse of the unfold);
  H, W are those of the stage's output (``aux["stage{s}"]``).
  """
  expert = np.asarray(aux[f"{layer}/moe_expert"])[..., 0]
  kept = np.asarray(aux[f"{layer}/moe_kept"]).any(-1)
  stage = layer.split("_")[0]
  b = expert.shape[0]
  h, w = np.asarray(aux[stage]).shape[1:3] if stage in aux else (None, None)
  p = PATCH_SIZE * PATCH_SIZE
  values = np.where(kept, expert, -1).reshape(b, p, -1, 1)
  if h is None or h * w != values.shape[1] * values.shape[2]:
    raise ValueError(f"aux has no feature map {stage!r} matching the "
                     f"{values.shape[1] * values.shape[2]} tokens of {layer}; "
                     "routing maps need a routed MobileViTv2.")
  return np.asarray(mobilevitv2.fold_patches(jnp.asarray(values), PATCH_SIZE,
                                             h, w))[..., 0]


def routing_figure(images: np.ndarray, aux: dict[str, Any], num_experts: int,
                   layers: Optional[Sequence[str]] = None):
  """A matplotlib figure of the routing of `images` (see the module docstring)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import colors  # pylint: disable=g-import-not-at-top

  all_layers = moe.routed_layers(aux)
  layers = list(layers or all_layers)
  unknown = sorted(set(layers) - set(all_layers))
  if unknown:
    raise ValueError(f"layers {unknown} are not routed layers of the model; "
                     f"choose from {all_layers}.")
  palette = plt.get_cmap("tab10" if num_experts <= 10 else "tab20")
  cmap = colors.ListedColormap(["#bbbbbb"] + [palette(i) for i in range(num_experts)])
  n = images.shape[0]
  cols = 1 + len(layers)
  fig, axes = plt.subplots(n + 1, cols, figsize=(2.2 * cols, 2.2 * (n + 1)),
                           squeeze=False)
  shown = (images - images.min()) / max(float(images.max() - images.min()), 1e-6)
  maps = {layer: expert_maps(aux, layer) for layer in layers}
  for i in range(n):
    axes[i, 0].imshow(shown[i].squeeze())
    axes[i, 0].set_title("image" if i == 0 else "")
    for j, layer in enumerate(layers, start=1):
      axes[i, j].imshow(maps[layer][i] + 1, cmap=cmap, vmin=0, vmax=num_experts,
                        interpolation="nearest")
      if i == 0:
        axes[i, j].set_title(layer, fontsize=8)
  for ax in axes[:n].ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  axes[n, 0].axis("off")
  axes[n, 0].text(0, 0.5, "tokens per expert\n(grey: dropped)", fontsize=8)
  for j, layer in enumerate(layers, start=1):
    load = np.asarray(aux[f"{layer}/moe_expert_load"]).sum(0)
    axes[n, j].bar(np.arange(num_experts), load,
                   color=[palette(i) for i in range(num_experts)])
    axes[n, j].set_xticks(np.arange(num_experts))
  fig.tight_layout()
  return fig


def routing_picture(model, variables, images: np.ndarray, out: str,
                    layers: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Writes the routing PNG of `images` to `out`; returns the model's aux.

  Example::

      routing_picture(model, variables, images[:4], "/tmp/routing.png")
  """
  _, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  aux = jax.device_get(aux)
  layers_present = moe.routed_layers(aux)
  if not layers_present:
    raise ValueError(f"{type(model).__name__} has no routed layers (no "
                     "'<layer>/moe_expert' in aux); use e.g. mobilevitv2_moe_xs.")
  num_experts = aux[f"{layers_present[0]}/moe_router_logits"].shape[-1]
  fig = routing_figure(np.asarray(images), aux, num_experts, layers)
  fig.savefig(out, dpi=80)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  plt.close(fig)
  return aux


def _model_and_images(args: argparse.Namespace):
  from vit_edge import input_pipeline  # pylint: disable=g-import-not-at-top
  from vit_edge import models  # pylint: disable=g-import-not-at-top
  from vit_edge import train  # pylint: disable=g-import-not-at-top
  from vit_edge.export import data  # pylint: disable=g-import-not-at-top

  batch = max(args.num_images, 8)
  if args.workdir:
    model, variables, config, info = train.load_trained_model(args.workdir)
    batches = input_pipeline.create_eval_iterator(
        config, mean=info["mean"], std=info["std"], local_batch_size=batch)
  else:
    info = models.get_model_info(args.model)
    size = args.image_size
    model = models.create_model(args.model, num_classes=10)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))
    config = data.digits_config(size, input_pipeline.DEFAULT_CROP_PCT, "bilinear")
    batches = input_pipeline.create_eval_iterator(
        config, mean=info.mean, std=info.std, local_batch_size=batch)
  return model, variables, data.first_images(batches, args.num_images)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="A training run of a routed model.")
  source.add_argument("--model", help="Or a registry name (random init), e.g. "
                      "mobilevitv2_moe_xs.")
  parser.add_argument("--image_size", type=int, default=64,
                      help="Input size with --model (a multiple of 32).")
  parser.add_argument("--num_images", type=int, default=4, help="Eval images.")
  parser.add_argument("--layers", default="", help="Routed layers to show "
                      "(default: all), e.g. stage5_layer0,stage5_layer2.")
  parser.add_argument("--out", default="routing.png", help="Output PNG path.")
  args = parser.parse_args(argv)
  try:
    model, variables, images = _model_and_images(args)
    layers = [l for l in args.layers.split(",") if l] or None
    aux = routing_picture(model, variables, images, args.out, layers)
  except (KeyError, ValueError, FileNotFoundError) as e:
    sys.exit(f"routing_map: error: {e}")
  for layer in moe.routed_layers(aux):
    load = np.asarray(aux[f"{layer}/moe_expert_load"]).sum(0)
    dropped = 1.0 - float(np.mean(aux[f"{layer}/moe_kept"]))
    print(f"{layer}: tokens per expert {load.astype(int).tolist()}, "
          f"dropped choices {dropped:.1%}")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
