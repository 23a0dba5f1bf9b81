"""Routed MobileViTv2: per-token mixtures of experts in place of chosen FFNs.

Mensah et al. ("Towards Vision Mixture of Experts for Wildlife Monitoring on the
Edge", arXiv 2411.07834) route each patch of a MobileViT(v2) to its own experts and
report 4x fewer parameters than MobileViTv2-1.0 (4.9M -> about 1.2M) at a 1-point
drop. Their code is not public and the paper leaves expert placement, E, K and the
losses open, so every choice below is a reconstruction, with V-MoE
(google-research/vmoe) as the reference for the router and the losses
(`vit_edge.models.moe`, `vit_edge.objectives.balance`):

* Base: the MobileViTv2 of `vit_edge.models.mobilevitv2` at width 0.5 (the
  smallest published width, 1.37M parameters); nothing but the chosen FFNs
  changes, so parameter names stay timm's and the dense layers still convert.
* Placement: the FFNs of every transformer layer of stages 4 and 5 (7 of 9). V-MoE
  puts experts in late layers; routing cost grows with tokens (methods.md: prefer
  late stages), and stage 3 sees 16x the tokens of stage 5. Stage 3 stays dense.
* A routed token is one row of MobileViTv2's unfolded ``[B, P, N, d]`` tensor:
  pixel p of patch n, one feature-map position. The FFN is per token in the dense
  model, so each token is routed on its own (the paper's "per patch" at the
  granularity at which the FFN runs). Routing is per image.
* Experts: E = 4 SiLU FFNs d -> h_e -> d. ``mobilevitv2_moe_s`` keeps the dense
  model's FFN parameters (h_e = d / 2, four experts = one 2d-wide FFN) and runs a
  quarter of the FFN per token (top-1): near mobilevitv2_050's size.
  ``mobilevitv2_moe_xs`` halves them (h_e = d / 4) with top-2 so a token still
  sees two experts: near 1.2M parameters, a quarter of mobilevitv2_100.
* ``mobilevitv2_moe_m`` spends the routed FFNs' savings on width instead: width
  7/12, every transformer layer routed (stage 3 too), h_e = d / 8, top-2; 0.295x
  mobilevitv2_100's parameters. mobilevitv2_moe_xs ties mobilevitv2_050 on
  Fashion-MNIST with a quarter of its late FFN compute, so the FFN width is not
  what the dense model's extra accuracy comes from; the backbone width is.
* Capacity factors 1.05 (training, V-MoE) and 1.25 (eval/export); noise std 1/E.

Example::

    model = create_model("mobilevitv2_moe_xs", num_classes=10)
    logits, aux = model.apply(variables, images, train=False)
    aux["stage5_layer0/moe_expert"]  # [B, S, K] expert of each token
"""

from __future__ import annotations

import functools
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from vit_edge.models import mobilevitv2
from vit_edge.models import moe
from vit_edge.models import registry


class RoutedMobileViTv2(mobilevitv2.MobileViTv2):
  """MobileViTv2 whose chosen transformer FFNs are :class:`moe.MoeFfn` layers.

  Attributes (besides MobileViTv2's):
    moe_layers: (stage, layer) pairs whose FFN is routed; stage 3, 4 or 5 as in
      the aux names, layer 0-based within the stage.
    num_experts: E of every routed layer.
    num_selected: K (1 or 2).
    expert_hidden_ratio: expert hidden width over the dense FFN's (2d).
    capacity_factor_train / capacity_factor_eval: see :class:`moe.MoeFfn`.
    noise_scale: router noise std times E in training.
    moe_dispatch: "gather" (training), "dense", or "auto" (the export form);
      see :class:`moe.MoeFfn`.
  """

  moe_layers: Sequence[tuple[int, int]] = ()
  num_experts: int = 4
  num_selected: int = 1
  expert_hidden_ratio: float = 0.25
  capacity_factor_train: float = 1.05
  capacity_factor_eval: float = 1.25
  noise_scale: float = 1.0
  moe_dispatch: str = "gather"

  def export_form(self) -> "RoutedMobileViTv2":
    """The same model with "auto" dispatch: identical outputs; a top-2 layer
    runs every expert on every token (two plain matmuls, no gathers), a top-1
    layer keeps its slots (tools/bench_moe.py, table 2: the stage-4 top-2 layer
    of mobilevitv2_moe_xs took 2.7x its dense FFN's TFLite time with gathers,
    1.3x dense; a top-1 layer was faster with gathers)."""
    return self.clone(moe_dispatch="auto")

  def layer_ffn(self, stage: int, layer: int) -> Optional[mobilevitv2.FfnFactory]:
    routed = {tuple(int(v) for v in pair) for pair in self.moe_layers}
    if (stage, layer) not in routed:
      return super().layer_ffn(stage, layer)
    return functools.partial(
        moe.MoeFfn, num_experts=self.num_experts, num_selected=self.num_selected,
        expert_hidden_ratio=self.expert_hidden_ratio,
        capacity_factor_train=self.capacity_factor_train,
        capacity_factor_eval=self.capacity_factor_eval,
        noise_scale=self.noise_scale, dispatch=self.moe_dispatch)


# Every transformer layer of stages 4 (4 layers) and 5 (3 layers).
_LATE_LAYERS = tuple((4, i) for i in range(4)) + tuple((5, i) for i in range(3))
# Every transformer layer of the model: stage 3 (2 layers) too.
_ALL_LAYERS = tuple((3, i) for i in range(2)) + _LATE_LAYERS


def _register():
  return registry.register_model(
      family="mobilevitv2", image_size=256, stride=32, top1=None,
      reference="reconstruction of Mensah et al. 2411.07834 (no code); "
                "routing as google-research/vmoe",
      mean=registry.UNIT_MEAN, std=registry.UNIT_STD)


@_register()
def mobilevitv2_moe_s(**kwargs) -> RoutedMobileViTv2:
  """Width 0.5, 4 experts top-1 of hidden d/2 in stages 4-5 (1.37M params)."""
  return registry.build(RoutedMobileViTv2, dict(
      width_multiplier=0.5, moe_layers=_LATE_LAYERS, num_experts=4,
      num_selected=1, expert_hidden_ratio=0.25), kwargs)


@_register()
def mobilevitv2_moe_xs(**kwargs) -> RoutedMobileViTv2:
  """Width 0.5, 4 experts top-2 of hidden d/4 in stages 4-5 (1.20M params)."""
  return registry.build(RoutedMobileViTv2, dict(
      width_multiplier=0.5, moe_layers=_LATE_LAYERS, num_experts=4,
      num_selected=2, expert_hidden_ratio=0.125), kwargs)


@_register()
def mobilevitv2_moe_m(**kwargs) -> RoutedMobileViTv2:
  """Width 7/12, 4 experts top-2 of hidden d/8 in every FFN (1.45M params).

  The width, not the FFN, is what separates mobilevitv2_100 from mobilevitv2_050
  (mobilevitv2_moe_xs ties mobilevitv2_050 with a quarter of its late FFN compute),
  so this variant spends the parameters the routed FFNs save on a wider backbone:
  0.295x mobilevitv2_100's parameters at 1000 classes, 0.26x at 10.
  """
  return registry.build(RoutedMobileViTv2, dict(
      width_multiplier=7 / 12, moe_layers=_ALL_LAYERS, num_experts=4,
      num_selected=2, expert_hidden_ratio=0.0625), kwargs)


def routed_complexity(model: RoutedMobileViTv2, image_size: int) -> dict[str, Any]:
  """Per routed layer and in total: the MACs computed and the MACs tokens use.

  The MACs a graph computes include every expert slot (capacity C at the eval
  capacity factor, filled or not) and the dispatch products with "gather"
  dispatch, every expert on every token with "dense" (the export form: pass
  ``model.export_form()`` for the exported file's count); the MACs a token uses
  are its router and its K experts (:func:`moe.layer_macs`). Returns
  ``{"layers": {name: (computed, used, tokens, capacity)}, "computed": int,
  "used": int, "idle_expert_params": int}``, the last being the expert
  parameters a token does not use (E - K experts of each routed layer). Example::

      routed_complexity(create_model("mobilevitv2_moe_xs"), 256)["used"]
  """
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  _, aux = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  params = variables["params"]
  out: dict[str, Any] = {"layers": {}, "computed": 0, "used": 0,
                         "idle_expert_params": 0}
  for layer in moe.routed_layers(aux):
    stage, index = re.fullmatch(r"stage(\d+)_layer(\d+)", layer).groups()
    ffn = params[f"stages_{int(stage) - 1}_1"][f"transformer_{index}"]["mlp"]
    num_experts, dim, hidden = ffn["wi"].shape
    _, tokens, selected = aux[f"{layer}/moe_expert"].shape
    capacity = moe.expert_capacity(tokens, num_experts, selected,
                                   model.capacity_factor_eval)
    layer_dispatch = moe.MoeFfn(
        hidden_features=hidden, num_experts=num_experts, num_selected=selected,
        capacity_factor_eval=model.capacity_factor_eval,
        dispatch=model.moe_dispatch).resolved_dispatch(tokens, train=False)
    computed, used = moe.layer_macs(tokens, dim, hidden, num_experts, selected,
                                    capacity, layer_dispatch)
    out["layers"][layer] = (computed, used, tokens, capacity)
    out["computed"] += computed
    out["used"] += used
    out["idle_expert_params"] += (num_experts - selected) * (2 * dim * hidden
                                                             + hidden + dim)
  return out
