"""Mixture of experts: routing, capacity and dispatch against a direct numpy
computation; the balance losses against numpy; per-image routing (batch 1 equals
the batch); routed MobileViTv2 in training; TFLite export parity."""

import functools
import math
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_edge import complexity
from vit_edge import export
from vit_edge import models
from vit_edge import objectives
from vit_edge.models import mobilevitv2 as mv2
from vit_edge.models import mobilevitv2_moe
from vit_edge.models import moe
from vit_edge.objectives import balance
from vit_edge.tools import routing_map

sys.path.insert(0, os.path.dirname(__file__))
import tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position

RNG = np.random.default_rng(0)
# A routed MobileViTv2 small enough for tests: width 0.25, experts in the first
# layer of stages 4 and 5 (fewer layers to compile).
TINY_ROUTED = {"width_multiplier": 0.25, "moe_layers": ((4, 0), (5, 0))}


def _numpy_route(probs, k, capacity):
  """Reference: per image, rank by rank, tokens in order take the next free slot."""
  b, s, e = probs.shape
  expert = np.zeros((b, s, k), int)
  slot = np.zeros((b, s, k), int)
  for i in range(b):
    order = np.argsort(-probs[i], axis=-1, kind="stable")
    used = np.zeros(e, int)
    for rank in range(k):
      for t in range(s):
        expert[i, t, rank] = order[t, rank]
        slot[i, t, rank] = used[order[t, rank]]
        used[order[t, rank]] += 1
  gate = np.take_along_axis(probs, expert, axis=-1)
  return expert, gate, slot, slot < capacity


@pytest.mark.parametrize("s,e,k,cf,expected", [
    (64, 4, 2, 1.05, 36),   # ceil(33.6) = 34, rounded up to 36.
    (256, 4, 1, 1.25, 80),  # 80 exactly.
    (10, 4, 1, 1.0, 4),     # ceil(2.5) = 3 -> 4.
    (4, 4, 2, 1.05, 4),     # ceil(2.1) = 3 -> 4 <= S.
    (2, 4, 1, 1.0, 2),      # 1 -> 4, capped at S = 2.
])
def test_capacity_matches_formula(s, e, k, cf, expected):
  assert moe.expert_capacity(s, e, k, cf) == expected
  assert expected == min(s, -(-math.ceil(s * k * cf / e) // 4) * 4)


def test_capacity_factor_must_be_positive():
  with pytest.raises(ValueError, match="capacity_factor=0"):
    moe.expert_capacity(16, 4, 1, 0.0)


@pytest.mark.parametrize("k,capacity", [(1, 3), (2, 4), (2, 16)])
def test_route_matches_numpy(k, capacity):
  probs = jax.nn.softmax(jnp.asarray(RNG.normal(size=(3, 16, 4)), jnp.float32))
  routing = moe.route(probs, k, capacity)
  expert, gate, slot, kept = _numpy_route(np.asarray(probs), k, capacity)
  np.testing.assert_array_equal(routing.expert, expert)
  np.testing.assert_array_equal(routing.slot, slot)
  np.testing.assert_array_equal(routing.kept, kept)
  np.testing.assert_allclose(routing.gate, gate, rtol=1e-6)


def test_second_choices_take_slots_after_every_first_choice():
  # Token 0: expert 0 then 1; tokens 1 and 2: expert 1 first. Token 0 comes first
  # but its second choice queues behind both first choices of expert 1.
  probs = jnp.asarray([[[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]]])
  routing = moe.route(probs, num_selected=2, capacity=2)
  np.testing.assert_array_equal(routing.expert[0, :, 0], [0, 1, 1])
  np.testing.assert_array_equal(routing.slot[0, :, 0], [0, 0, 1])
  assert int(routing.expert[0, 0, 1]) == 1 and int(routing.slot[0, 0, 1]) == 2
  assert not bool(routing.kept[0, 0, 1])  # Dropped: expert 1 is full.


def _numpy_moe(params, x, k, capacity):
  """Direct computation: y_t = sum over kept choices of gate * expert(x_t)."""
  tokens = x.reshape(x.shape[0], -1, x.shape[-1])
  logits = tokens @ np.asarray(params["router"]["kernel"])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  expert, gate, _, kept = _numpy_route(probs, k, capacity)
  wi, bi, wo, bo = (np.asarray(params[n]) for n in ("wi", "bi", "wo", "bo"))
  y = np.zeros_like(tokens)
  for b in range(tokens.shape[0]):
    for t in range(tokens.shape[1]):
      for r in range(k):
        if kept[b, t, r]:
          e = expert[b, t, r]
          h = tokens[b, t] @ wi[e] + bi[e]
          h = h / (1 + np.exp(-h))  # SiLU
          y[b, t] += gate[b, t, r] * (h @ wo[e] + bo[e])
  return y.reshape(x.shape), kept


@pytest.mark.parametrize("dispatch", ["gather", "dense"])
@pytest.mark.parametrize("k,cf", [(1, 0.5), (2, 0.6), (2, 2.0)])
def test_moe_ffn_matches_direct_computation(k, cf, dispatch):
  x = jnp.asarray(RNG.normal(size=(2, 4, 5, 8)), jnp.float32)
  layer = moe.MoeFfn(hidden_features=12, num_experts=4, num_selected=k,
                     capacity_factor_eval=cf, capacity_multiple=1, dispatch=dispatch)
  variables = layer.init(jax.random.key(0), x)
  y, aux = layer.apply(variables, x)
  capacity = layer.capacity(20, train=False)
  expected, kept = _numpy_moe(variables["params"], np.asarray(x), k, capacity)
  np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(aux["moe_kept"], kept)
  if cf < 1:
    assert not kept.all()  # Some choices were dropped...
    dropped = ~kept.any(-1)
    np.testing.assert_array_equal(np.asarray(y).reshape(2, 20, 8)[dropped], 0.0)
  np.testing.assert_array_equal(aux["moe_expert_load"].sum(-1), kept.sum((1, 2)))


class _ZeroFfn(nn.Module):
  hidden_features: int
  dtype: object = jnp.float32

  def __call__(self, x, deterministic=True):
    return jnp.zeros_like(x)


def test_dropped_tokens_pass_through_the_residual():
  x = jnp.asarray(RNG.normal(size=(2, 4, 6, 8)), jnp.float32)
  routed = mv2.LinearTransformerBlock(
      ffn=functools.partial(moe.MoeFfn, num_experts=4, capacity_factor_eval=0.25,
                            capacity_multiple=1), return_ffn_aux=True)
  variables = routed.init(jax.random.key(0), x)
  out, aux = routed.apply(variables, x)
  # The same layer with a zero FFN: attention and residual only.
  skip = mv2.LinearTransformerBlock(ffn=_ZeroFfn).apply(variables, x)
  dropped = ~np.asarray(aux["moe_kept"]).any(-1).reshape(2, 4, 6)
  assert dropped.any() and not dropped.all()
  np.testing.assert_allclose(np.asarray(out)[dropped], np.asarray(skip)[dropped],
                             atol=1e-6)
  assert not np.allclose(np.asarray(out)[~dropped], np.asarray(skip)[~dropped])


@pytest.mark.parametrize("dispatch", ["gather", "dense"])
def test_layer_macs_matches_the_jaxpr(dispatch):
  x = jnp.zeros((1, 4, 16, 24))
  layer = moe.MoeFfn(hidden_features=48, num_experts=4, num_selected=2,
                     expert_hidden_ratio=0.5, dispatch=dispatch)
  variables = jax.eval_shape(layer.init, jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(lambda v, x: layer.apply(v, x))(variables, x)
  computed, used = moe.layer_macs(64, 24, 24, 4, 2, layer.capacity(64, False),
                                  dispatch)
  assert complexity.jaxpr_macs(jaxpr.jaxpr) == computed
  assert used == 64 * 24 * 4 + 64 * 2 * 2 * 24 * 24


# ---------------------------------------------------------------------------
# Balance losses.

def _softmax(z):
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _cv2(v):
  return v.var(-1) / v.mean(-1) ** 2


def test_balance_losses_match_numpy():
  b, s, e, k, std = 3, 10, 4, 2, 0.25
  logits = RNG.normal(size=(b, s, e)).astype(np.float32)
  noisy = (logits + std * RNG.normal(size=(b, s, e))).astype(np.float32)
  expert = np.argsort(-noisy, -1, kind="stable")[..., :k]
  # Importance: CV^2 of the summed noise-free probabilities, per image.
  importance = np.mean(_cv2(_softmax(logits).sum(1)))
  assert float(balance.importance_loss(jnp.asarray(logits))) == pytest.approx(
      importance, rel=1e-5)
  # Load: P(logit_e + fresh noise > K-th largest noisy logit), CV^2 of its mean.
  threshold = np.sort(noisy, -1)[..., -k][..., None]
  z = (threshold - logits) / std
  p = 1 - 0.5 * (1 + np.vectorize(math.erf)(z / np.sqrt(2)))
  load = np.mean(_cv2(p.mean(1)))
  got = balance.load_loss(jnp.asarray(logits), jnp.asarray(noisy), jnp.float32(std),
                          jnp.asarray(expert))
  assert float(got) == pytest.approx(load, rel=1e-4)
  assert float(balance.load_loss(jnp.asarray(logits), jnp.asarray(logits),
                                 jnp.float32(0.0), jnp.asarray(expert))) == 0.0
  # Switch: E sum_e f_e P_e with f from the first choices.
  f = np.stack([np.mean(expert[..., 0] == i, 1) for i in range(e)], -1)
  switch = np.mean(e * np.sum(f * _softmax(noisy).mean(1), -1))
  assert float(balance.switch_loss(jnp.asarray(noisy), jnp.asarray(expert))
               ) == pytest.approx(switch, rel=1e-5)
  # z-loss: mean squared logsumexp.
  lse = np.log(np.exp(logits).sum(-1))
  assert float(balance.z_loss(jnp.asarray(logits))) == pytest.approx(
      np.mean(lse ** 2), rel=1e-5)


def test_balanced_routing_has_zero_importance_and_switch_at_one():
  logits = jnp.zeros((2, 8, 4))
  expert = jnp.tile(jnp.arange(4)[None, :, None], (2, 2, 1))
  assert float(balance.importance_loss(logits)) == 0.0
  assert float(balance.switch_loss(logits, expert)) == pytest.approx(1.0)


def _routed(num_classes=10, **overrides):
  return models.create_model("mobilevitv2_moe_xs", num_classes=num_classes,
                             **{**TINY_ROUTED, **overrides})


def test_balance_terms_sum_layers_with_weights_and_log_routing():
  model = _routed()
  x = jnp.asarray(RNG.uniform(size=(2, 64, 64, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  (logits, aux), _ = jax.jit(functools.partial(
      model.apply, train=True, mutable=["batch_stats"]))(
          variables, x, rngs={"dropout": jax.random.key(1)})
  assert moe.routed_layers(aux) == ["stage4_layer0", "stage5_layer0"]
  config = objectives.default_config()
  config.objective.name = "cross_entropy+moe_importance+moe_load+moe_switch+moe_z"
  config.objective.moe = balance.default_config()
  config.objective.moe.load = 0.5
  objective, _ = objectives.create_objective(
      config, student_image_size=64, student_mean=(0,) * 3, student_std=(1,) * 3)
  targets = jax.nn.one_hot(jnp.arange(2), 10)
  loss, metrics = objective(logits, aux, targets, None, {})
  expected_load = 0.5 * sum(
      balance.load_loss(aux[f"{l}/moe_router_logits"],
                        aux[f"{l}/moe_router_logits_noisy"],
                        aux[f"{l}/moe_noise_std"], aux[f"{l}/moe_expert"])
      for l in moe.routed_layers(aux))
  assert float(metrics["moe_load_loss"]) == pytest.approx(float(expected_load), rel=1e-5)
  assert float(aux["stage5_layer0/moe_noise_std"]) == pytest.approx(0.25)
  parts = sum(float(metrics[f"{n}_loss"]) for n in (
      "cross_entropy", "moe_importance", "moe_load", "moe_switch", "moe_z"))
  assert float(loss) == pytest.approx(parts, rel=1e-5)
  assert 0.0 <= float(metrics["moe_dropped_rate"]) <= 1.0
  assert 0.25 <= float(metrics["moe_max_load"]) <= 1.0
  assert set(objective.metric_names()) >= {"moe_dropped_rate", "moe_max_load"}


def test_balance_term_on_a_dense_model_is_a_clear_error():
  term = balance.ImportanceLoss(objectives.default_config().objective)
  out = objectives.StepOutputs(jnp.zeros((1, 3)), {"stage5": jnp.zeros(1)},
                               jnp.zeros((1, 3)))
  with pytest.raises(ValueError, match="mobilevitv2_moe_xs"):
    term(out, {})


# ---------------------------------------------------------------------------
# Per-image routing and export.

def test_batch_one_routing_equals_the_batched_routing():
  # The whole model at eval capacity (what an export computes).
  x = jnp.asarray(RNG.uniform(size=(3, 64, 64, 3)), jnp.float32)
  model = _routed(capacity_factor_eval=0.5)
  variables = jax.jit(model.init)(jax.random.key(0), x[:1])
  apply = jax.jit(functools.partial(model.apply, train=False))
  logits, aux = apply(variables, x)
  assert float(np.mean(aux["stage4_layer0/moe_kept"])) < 1.0  # Some drops.
  for i in range(3):
    one_logits, one_aux = apply(variables, x[i:i + 1])
    np.testing.assert_allclose(one_logits[0], logits[i], atol=1e-5, rtol=1e-5)
    for layer in moe.routed_layers(aux):
      for field in ("moe_expert", "moe_kept"):
        np.testing.assert_array_equal(one_aux[f"{layer}/{field}"][0],
                                      aux[f"{layer}/{field}"][i])
  # A layer at training capacity (the model's BatchNorm uses batch statistics in
  # training, so the layer is compared alone; noise off to compare).
  tokens = jnp.asarray(RNG.normal(size=(3, 4, 8, 16)), jnp.float32)
  layer = moe.MoeFfn(hidden_features=16, num_selected=2, noise_scale=0.0,
                     capacity_factor_train=0.6)
  layer_vars = layer.init(jax.random.key(0), tokens)
  y, layer_aux = layer.apply(layer_vars, tokens, deterministic=False)
  assert float(np.mean(layer_aux["moe_kept"])) < 1.0
  for i in range(3):
    one_y, one_aux = layer.apply(layer_vars, tokens[i:i + 1], deterministic=False)
    np.testing.assert_allclose(one_y[0], y[i], atol=1e-6)
    np.testing.assert_array_equal(one_aux["moe_kept"][0], layer_aux["moe_kept"][i])


def test_export_form_dispatches_top2_layers_densely_with_the_same_outputs():
  layer = moe.MoeFfn(hidden_features=16, num_experts=4, dispatch="auto")
  assert layer.clone(num_selected=2).resolved_dispatch(64, train=False) == "dense"
  assert layer.clone(num_selected=1).resolved_dispatch(64, train=False) == "gather"
  with pytest.raises(ValueError, match="dispatch='sparse'; expected 'gather'"):
    layer.clone(dispatch="sparse").resolved_dispatch(64, train=False)
  model = _routed(capacity_factor_eval=0.5)  # Top-2, with dropped tokens.
  x = jnp.asarray(RNG.uniform(size=(2, 64, 64, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x[:1])
  logits, _ = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  exported = export.inference.export_model(model)
  assert exported.moe_dispatch == "auto"
  exported_logits, _ = jax.jit(functools.partial(exported.apply, train=False))(
      variables, x)
  np.testing.assert_allclose(exported_logits, logits, atol=1e-5, rtol=1e-5)


def test_routed_models_pinned_near_their_targets():
  counts = {}
  for name in ("mobilevitv2_100", "mobilevitv2_050", "mobilevitv2_moe_xs",
               "mobilevitv2_moe_s", "mobilevitv2_moe_m"):
    model = models.create_model(name)
    variables = jax.eval_shape(model.init, jax.random.key(0),
                               jnp.zeros((1, 256, 256, 3)))
    counts[name] = complexity.count_params(variables["params"])
  assert counts["mobilevitv2_moe_xs"] <= 0.3 * counts["mobilevitv2_100"]
  assert counts["mobilevitv2_moe_m"] <= 0.3 * counts["mobilevitv2_100"]
  assert abs(counts["mobilevitv2_moe_s"] / counts["mobilevitv2_050"] - 1) < 0.01


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_routed_model_exports_through_the_parity_guard(quantize, tmp_path):
  # Eval capacity 0.5: tokens are dropped in the exported graph too.
  overrides = {**TINY_ROUTED, "capacity_factor_eval": 0.5}
  model = _routed(capacity_factor_eval=0.5)
  images = np.asarray(jax.random.uniform(jax.random.key(3), (2, 64, 64, 3)))
  variables = model.init(jax.random.key(0), images[:1])
  _, aux = model.apply(variables, images, train=False)
  assert float(np.mean(np.asarray(aux["stage4_layer0/moe_kept"]))) < 1.0
  # export_from_registry raises ParityError (and writes nothing) when a float
  # export's logits leave the tolerance; int8 reports its agreement and error.
  out = tmp_path / f"moe_{quantize}.tflite"
  report = export.export_from_registry(
      "mobilevitv2_moe_xs", str(out), image_size=64, num_classes=10,
      quantize=quantize, num_calibration_samples=8, num_parity_samples=4,
      max_eval_examples=0, overrides=overrides)
  assert out.stat().st_size == report.size_bytes > 0
  if quantize == "none":
    assert report.max_abs_logit_diff <= report.tolerance
  else:
    # Top-1 agreement on 4 random-weight images is a coin flip here (routes flip
    # under int8: 2 of 4 at db391c0, 1 of 4 after, while 16 images gave 6 and 7);
    # the relative logit error is the stable measure (0.54 and 0.45 on these 4;
    # a file unrelated to the float model reads about 1 or more).
    assert 0.0 <= report.parity_top1_agreement <= 1.0
    assert report.relative_logit_error < 0.75


def test_routing_map_lays_tokens_back_on_the_feature_map(tmp_path):
  # 4x4 feature map, 2x2 patches: token [p, n] is pixel p of patch n.
  h = w = 4
  token_ids = jnp.arange(16).reshape(1, 4, 4, 1)  # [B, P, N, 1] -> expert = id % 4
  pixel_of_token = np.asarray(mv2.fold_patches(token_ids, 2, h, w))[0, ..., 0]
  expert = (np.arange(16) % 4).reshape(1, 16, 1)
  kept = np.ones((1, 16, 1), np.float32)
  kept[0, 5] = 0.0  # token 5 dropped
  aux = {"stage4": np.zeros((1, h, w, 8)),
         "stage4_layer0/moe_expert": expert, "stage4_layer0/moe_kept": kept,
         "stage4_layer0/moe_router_logits": np.zeros((1, 16, 4)),
         "stage4_layer0/moe_expert_load": np.array([[4, 3, 4, 4]])}
  maps = routing_map.expert_maps(aux, "stage4_layer0")
  expected = np.where(pixel_of_token == 5, -1, pixel_of_token % 4)
  np.testing.assert_array_equal(maps[0], expected)
  fig = routing_map.routing_figure(np.zeros((1, 8, 8, 3)), aux, num_experts=4)
  fig.savefig(tmp_path / "routing.png")
  assert (tmp_path / "routing.png").stat().st_size > 0
  with pytest.raises(ValueError, match="stage5_layer0"):
    routing_map.routing_figure(np.zeros((1, 8, 8, 3)), aux, 4, ["stage5_layer0"])
