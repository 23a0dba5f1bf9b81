"""Registry, pinned parameter counts and the module contract shared by all families."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_edge import complexity
from vit_edge import models

# Exact trainable parameter counts with a 1000-class head (../shared/reference/
# architectures.md). Every registered model must appear here.
PINNED_PARAMS = {
    "edgevit_xxs": 4_067_704,
    "edgevit_xs": 6_770_056,
    "edgevit_s": 13_108_168,
    "mobilevitv2_050": 1_370_593,
    "mobilevitv2_075": 2_866_009,
    "mobilevitv2_100": 4_901_841,
    "mobilevitv2_125": 7_478_089,
    "mobilevitv2_150": 10_594_753,
    "mobilevitv2_175": 14_251_833,
    "mobilevitv2_200": 18_449_329,
    "deit_tiny_patch16": 5_717_416,
    "deit_small_patch16": 22_050_664,
    "deit_base_patch16": 86_567_656,
    "deit_tiny_distilled_patch16": 5_910_800,
    "deit_small_distilled_patch16": 22_436_432,
    "deit_base_distilled_patch16": 87_338_192,
    "vit_base_patch16": 86_567_656,
    "vit_large_patch16": 304_326_632,
    # TFormer is a documented reconstruction (no public code); see tformer.py.
    "tformer_s": 8_379_560,
    "tformer_m": 14_317_736,
    "tformer_l": 20_255_912,
    # DeViT ensemble (vit_edge/devit/ensemble.py): N=4 DeiT-Ti sub-models + fusion.
    "devit_tiny_patch16": 23_910_888,
    # Routed MobileViTv2 (mixture of experts), a reconstruction: mobilevitv2_moe.py.
    "mobilevitv2_moe_s": 1_375_969,
    "mobilevitv2_moe_xs": 1_203_169,
    "mobilevitv2_moe_m": 1_446_471,
    # Segmentation heads (vit_edge/models/segmentation.py; FPN width 64) with a
    # 1000-class 1x1 classifier: the backbone without its classifier + the head.
    "fpn_edgevit_xxs": 4_285_176,
    "fpn_edgevit_xs": 6_906_120,
    "fpn_mobilevitv2_050": 1_626_465,
    "fpn_mobilevitv2_100": 4_942_673,
    "fpn_tformer_s": 8_404_008,
    "upernet_edgevit_xxs": 4_506_488,
    "upernet_edgevit_xs": 7_201_160,
    "upernet_mobilevitv2_050": 1_823_201,
    "upernet_mobilevitv2_100": 5_336_017,
    "upernet_tformer_s": 8_797_352,
}

# The smallest model of each family, for the (slower) behavioural tests.
SMALLEST = {
    "edgevit": "edgevit_xxs",
    "mobilevitv2": "mobilevitv2_050",
    "tformer": "tformer_s",
    "deit": "deit_tiny_patch16",
}


def _param_count(name: str, num_classes: int = 1000) -> int:
  info = models.get_model_info(name)
  model = models.create_model(name, num_classes=num_classes)
  x = jnp.zeros((1, info.image_size, info.image_size, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  return complexity.count_params(variables["params"])


def test_every_registered_model_has_a_pinned_count():
  missing = sorted(set(models.list_models()) - set(PINNED_PARAMS))
  assert not missing, f"Pin the parameter counts of {missing} in PINNED_PARAMS."
  unknown = sorted(set(PINNED_PARAMS) - set(models.list_models()))
  assert not unknown, f"PINNED_PARAMS names unregistered models {unknown}."


@pytest.mark.parametrize("name", sorted(PINNED_PARAMS))
def test_exact_param_count(name):
  assert _param_count(name) == PINNED_PARAMS[name]


@pytest.mark.parametrize("name,published_millions,digits", [
    ("tformer_s", 8.4, 1), ("tformer_m", 14, 0), ("tformer_l", 20, 0)])
def test_tformer_matches_published_params_at_published_precision(
    name, published_millions, digits):
  # The paper gives 8.4M / 14M / 20M; the reconstruction's 8.38M / 14.32M / 20.26M
  # round to exactly those figures (14M is 2.3% from 14.32M: it is a rounded value).
  assert round(_param_count(name) / 1e6, digits) == published_millions


def test_list_models_patterns():
  assert models.list_models("edgevit_*") == ["edgevit_s", "edgevit_xs", "edgevit_xxs"]
  assert len(models.list_models("mobilevitv2_[0-9]*")) == 7
  assert models.list_models("mobilevitv2_moe_*") == [
      "mobilevitv2_moe_m", "mobilevitv2_moe_s", "mobilevitv2_moe_xs"]
  assert models.list_models("no_such_*") == []
  assert set(SMALLEST.values()) <= set(models.list_models())


def test_unknown_name_lists_close_names():
  with pytest.raises(KeyError, match="edgevit_xxs"):
    models.create_model("edgevit_xxxs")


def test_unknown_override_names_the_valid_fields():
  with pytest.raises(TypeError, match="drop_path_rate"):
    models.create_model("tformer_s", drop_path=0.1)


def test_create_model_at_size_sets_the_resolution_only_where_it_is_fixed():
  deit = models.create_model_at_size("deit_tiny_patch16", 160, num_classes=10)
  assert deit.image_size == 160
  shapes = jax.eval_shape(deit.init, jax.random.key(0), jnp.zeros((1, 160, 160, 3)))
  assert shapes["params"]["pos_embed"].shape == (1, 1 + 10 * 10, 192)
  # An explicit override wins; a model without a fixed resolution is unchanged.
  assert models.create_model_at_size("deit_tiny_patch16", 160, image_size=96).image_size == 96
  assert (models.create_model_at_size("edgevit_xxs", 160, num_classes=10)
          == models.create_model("edgevit_xxs", num_classes=10))


def test_image_size_check_names_the_value_the_stride_and_a_fix():
  models.check_image_size("edgevit_xxs", 160)  # A multiple of 32: no error.
  with pytest.raises(ValueError, match=r"config.image_size=200 is not a positive "
                     r"multiple of the total stride 32 of edgevit_xxs; use e.g. 192"):
    models.check_image_size("edgevit_xxs", 200, "config.image_size")
  with pytest.raises(ValueError, match=r"image_size=0 .* use e.g. 16\."):
    models.check_image_size("deit_tiny_patch16", 0)


def test_num_classes_changes_only_the_head():
  delta = _param_count("edgevit_xxs", 1000) - _param_count("edgevit_xxs", 10)
  assert delta == 990 * (288 + 1)


@pytest.mark.parametrize("family", sorted(SMALLEST))
def test_contract_logits_and_aux(family):
  name = SMALLEST[family]
  info = models.get_model_info(name)
  size = 32 if info.fixed_resolution else 2 * info.stride
  overrides = {"image_size": size} if info.fixed_resolution else {}
  model = models.create_model(name, num_classes=7, **overrides)
  x = jax.random.uniform(jax.random.key(1), (2, size, size, 3))
  variables = model.init(jax.random.key(0), x)
  logits, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert logits.shape == (2, 7)
  assert {"stem", "pre_logits"} <= set(aux)
  assert aux["pre_logits"].shape[0] == 2
  assert bool(jnp.all(jnp.isfinite(logits)))


# Architecture fields that define each family's sizes, with small values.
_ARCHITECTURE_OVERRIDES = {
    "edgevit_xxs": dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), head_dim=8),
    "mobilevitv2_050": dict(width_multiplier=0.25),
    "tformer_s": dict(depths=(1, 1, 1, 1), widths=(8, 16, 24, 32)),
    "deit_tiny_patch16": dict(embed_dim=32, depth=2, num_heads=2, image_size=32),
    "deit_tiny_distilled_patch16": dict(embed_dim=32, depth=1, num_heads=2,
                                        image_size=32, distilled=False),
}


@pytest.mark.parametrize("name", sorted(_ARCHITECTURE_OVERRIDES))
def test_every_architecture_field_can_be_overridden(name):
  overrides = _ARCHITECTURE_OVERRIDES[name]
  model = models.create_model(name, num_classes=3, **overrides)
  for field, value in overrides.items():
    assert getattr(model, field) == value, field
  default = models.create_model(name, num_classes=3)
  size = 64
  x = jnp.zeros((1, size, size, 3)) if "deit" not in name else jnp.zeros((1, 32, 32, 3))
  small = complexity.count_params(jax.eval_shape(model.init, jax.random.key(0), x)
                                  ["params"])
  if "deit" in name:  # The default is built for 224: count it there.
    x = jnp.zeros((1, 224, 224, 3))
  full = complexity.count_params(jax.eval_shape(default.init, jax.random.key(0), x)
                                 ["params"])
  assert small < full


def test_batchnorm_running_variance_is_unbiased_like_pytorch():
  from vit_edge.models import layers  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).normal(2.0, 3.0, (2, 3, 2, 4)).astype(np.float32)
  bn = layers.batch_norm(True, jnp.float32)
  variables = bn.init(jax.random.key(0), x)
  assert jax.tree_util.tree_map(jnp.shape, variables) == {
      "params": {"scale": (4,), "bias": (4,)},
      "batch_stats": {"mean": (4,), "var": (4,)}}  # Flax's names: trees unchanged.
  y, updates = bn.apply(variables, x, mutable=["batch_stats"])
  flat = x.reshape(-1, 4)  # n = 2 * 3 * 2 = 12 values per channel.
  # torch.nn.BatchNorm2d(momentum=0.1) from running (0, 1) after one train batch:
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * flat.mean(0),
                             rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["var"],
                             0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
  # ... and it normalises with the biased batch variance.
  np.testing.assert_allclose(y, (x - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5),
                             rtol=1e-4, atol=1e-5)
  eval_y = layers.batch_norm(False, jnp.float32).apply(
      {"params": variables["params"], "batch_stats": updates["batch_stats"]}, x)
  np.testing.assert_allclose(
      eval_y, (x - updates["batch_stats"]["mean"]) /
      np.sqrt(updates["batch_stats"]["var"] + 1e-5), rtol=1e-4, atol=1e-5)
