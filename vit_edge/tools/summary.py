"""Prints a model's parameters, MACs and the output shape of every stage.

Usage::

    python -m vit_edge.tools.summary --model=edgevit_xxs
    python -m vit_edge.tools.summary --model=mobilevitv2_050 --image_size=192 --num_classes=10

MACs are counted from the convolutions and matrix products of the jaxpr (the
figure papers publish); XLA's cost analysis of the jitted forward is printed next
to it: its FLOP count includes elementwise ops, norms, softmax and pooling, so
``XLA FLOPs / 2`` sits slightly above the MACs (see vit_edge/complexity.py).
"""

from __future__ import annotations

from absl import app
from absl import flags

from vit_edge import complexity
from vit_edge import models
from vit_edge.models import mobilevitv2_moe

_MODEL = flags.DEFINE_string("model", None, "Registered model name (see list_models).")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "Input resolution; defaults to the model's reference size.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Classifier width.")


def summarize(name: str, image_size: int | None = None,
              num_classes: int = 1000) -> str:
  """The summary text of one registered model.

  Example: ``print(summarize("edgevit_xxs"))``.
  """
  info = models.get_model_info(name)
  image_size = image_size or info.image_size
  model = models.create_model_at_size(name, image_size, num_classes=num_classes)
  stats = complexity.model_complexity(model, image_size)
  lines = [
      f"model:        {name} ({info.family}; {info.reference})",
      f"input:        1x{image_size}x{image_size}x3 (NHWC), total stride {info.stride}",
      f"parameters:   {stats.params:,}",
      f"MACs:         {stats.macs / 1e9:.3f} G (convolutions and matmuls)",
      f"XLA FLOPs:    {stats.xla_flops / 1e9:.3f} G "
      f"(/2 = {stats.xla_flops / 2e9:.3f} G; includes elementwise ops)",
  ]
  if isinstance(model, mobilevitv2_moe.RoutedMobileViTv2):
    # A routed model computes every expert slot but a token uses K experts.
    routed = mobilevitv2_moe.routed_complexity(model, image_size)
    used = stats.macs - routed["computed"] + routed["used"]
    lines += [
        f"params/token: {stats.params - routed['idle_expert_params']:,} (router "
        f"and the {model.num_selected} chosen of {model.num_experts} experts)",
        f"MACs used:    {used / 1e9:.3f} G by the tokens (the MACs above include "
        f"empty expert slots at capacity factor {model.capacity_factor_eval} and "
        "the dispatch)",
    ]
    for layer, (computed, layer_used, tokens, capacity) in routed["layers"].items():
      lines.append(f"  {layer:<14}{tokens} tokens, capacity {capacity}: "
                   f"{computed / 1e6:.2f} M MACs computed, {layer_used / 1e6:.2f} M used")
  lines.append("outputs:")
  for key, shape in stats.aux_shapes.items():
    if "/moe_" not in key:  # Per-layer routing tensors: see the lines above.
      lines.append(f"  {key:<12}{shape}")
  lines.append(f"  {'logits':<12}{stats.logits_shape}")
  return "\n".join(lines)


def main(argv):
  del argv
  if not _MODEL.value:
    raise app.UsageError(
        "--model is required, one of: " + ", ".join(models.list_models()))
  try:
    print(summarize(_MODEL.value, _IMAGE_SIZE.value, _NUM_CLASSES.value))
  except KeyError as e:  # Unknown name: the message lists close names.
    raise app.UsageError(e.args[0]) from e


if __name__ == "__main__":
  app.run(main)
