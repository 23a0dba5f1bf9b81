"""Tests of the MobileViTv2 family (vit_edge/models/mobilevitv2.py); no torch needed."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_edge import models
from vit_edge.models import layers
from vit_edge.models import mobilevitv2 as mv2

RES = 64  # smallest multiple of the stride 32 whose last layer still has 2x2 patches.


def _images(batch=2, res=RES, seed=0):
  return jax.random.uniform(jax.random.key(seed), (batch, res, res, 3))


@pytest.fixture(scope="module")
def model_and_vars():
  model = models.create_model("mobilevitv2_050", num_classes=10)
  variables = jax.jit(model.init)(jax.random.key(0), _images())
  return model, variables


def _apply(model, variables, x, **kwargs):
  """Jitted apply: eager dispatch of the whole net is far slower on CPU."""
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, x)


def test_registry_info():
  names = models.list_models("mobilevitv2_[0-9]*")  # not the routed mobilevitv2_moe_*
  assert names == ["mobilevitv2_050", "mobilevitv2_075", "mobilevitv2_100",
                   "mobilevitv2_125", "mobilevitv2_150", "mobilevitv2_175",
                   "mobilevitv2_200"]
  info = models.get_model_info("mobilevitv2_100")
  assert (info.image_size, info.stride, info.top1) == (256, 32, 78.09)
  assert info.mean == (0.0, 0.0, 0.0) and info.std == (1.0, 1.0, 1.0)
  assert not info.fixed_resolution


def test_channels_match_timm_rounding():
  assert mv2.mobilevitv2_channels(0.5) == (16, (32, 64, 128, 192, 256),
                                           (64, 96, 128))
  assert mv2.mobilevitv2_channels(0.75) == (24, (48, 96, 192, 288, 384),
                                            (96, 144, 192))
  assert mv2.mobilevitv2_channels(2.0) == (64, (128, 256, 512, 768, 1024),
                                           (256, 384, 512))


def test_forward_shapes(model_and_vars):
  model, variables = model_and_vars
  logits, aux = _apply(model, variables, _images())
  assert logits.shape == (2, 10)
  shapes = {k: v.shape for k, v in aux.items()}
  assert shapes == {
      "stem": (2, 32, 32, 16), "stage1": (2, 32, 32, 32),
      "stage2": (2, 16, 16, 64), "stage3": (2, 8, 8, 128),
      "stage4": (2, 4, 4, 192), "stage5": (2, 2, 2, 256),
      "pre_logits": (2, 256)}
  assert np.all(np.isfinite(logits))


def test_full_size_shapes_eval_shape():
  model = models.create_model("mobilevitv2_200")
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  logits, aux = jax.eval_shape(model.apply, variables, x)
  assert logits.shape == (1, 1000)
  assert aux["stage5"].shape == (1, 8, 8, 1024)
  assert aux["pre_logits"].shape == (1, 1024)


def test_odd_patch_grid_is_resized_like_timm():
  # 96 / 32 = 3: the last layer's 3x3 map is resized to 4x4, as in timm/ml-cvnets.
  model = models.create_model("mobilevitv2_050", num_classes=0)
  x = jax.ShapeDtypeStruct((1, 96, 96, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  logits, aux = jax.eval_shape(model.apply, variables, x)
  assert aux["stage5"].shape == (1, 4, 4, 256)
  assert logits.shape == (1, 256)  # num_classes=0: pooled features.


@pytest.mark.parametrize("res", [48, 65, 100])
def test_non_divisible_resolution_raises(model_and_vars, res):
  model, variables = model_and_vars
  with pytest.raises(ValueError, match=f"{res}x{res}"):
    model.apply(variables, jnp.zeros((1, res, res, 3)))


def test_train_vs_eval(model_and_vars):
  _, variables = model_and_vars
  x = _images()
  base = models.create_model("mobilevitv2_050", num_classes=10)
  noisy = models.create_model("mobilevitv2_050", num_classes=10,
                              dropout_rate=0.5, drop_path_rate=0.5)
  (ref, _), eval_state = _apply(base, variables, x, mutable=["batch_stats"])
  out, _ = _apply(noisy, variables, x)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  # BN running statistics do not move in eval mode.
  old = jax.tree_util.tree_leaves(variables["batch_stats"])
  for a, b in zip(old, jax.tree_util.tree_leaves(eval_state["batch_stats"])):
    np.testing.assert_array_equal(a, b)

  def train_fn(model):
    return jax.jit(lambda v, x, key: model.apply(
        v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}))

  noisy_train = train_fn(noisy)
  (t1, _), _ = noisy_train(variables, x, jax.random.key(1))
  (t2, _), _ = noisy_train(variables, x, jax.random.key(2))
  assert not np.allclose(t1, t2)
  # Without dropout/drop-path, train mode is deterministic; BN stats move.
  base_train = train_fn(base)
  (d1, _), state = base_train(variables, x, jax.random.key(1))
  (d2, _), _ = base_train(variables, x, jax.random.key(2))
  np.testing.assert_allclose(d1, d2, rtol=1e-6, atol=1e-6)
  new = jax.tree_util.tree_leaves(state["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(old, new))


def test_bf16_forward(model_and_vars):
  _, variables = model_and_vars
  x = _images()
  ref, _ = _apply(models.create_model("mobilevitv2_050", num_classes=10),
                  variables, x)
  model = models.create_model("mobilevitv2_050", num_classes=10,
                              dtype=jnp.bfloat16)
  out, aux = _apply(model, variables, x)
  assert out.dtype == jnp.bfloat16 and aux["stage3"].dtype == jnp.bfloat16
  out = np.asarray(out, np.float32)
  assert np.all(np.isfinite(out))
  # Loose: a random-init net (BN running stats 0/1, nothing normalised) amplifies
  # bf16 rounding stage after stage (~15% here); a broken cast gives ~100%.
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.3
  for p in jax.tree_util.tree_leaves(variables["params"]):
    assert p.dtype == jnp.float32


def test_bf16_block_close_to_f32():
  # One well-conditioned MobileViTv2 block: bf16 stays within rounding error.
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
  block = mv2.MobileViTv2Block(features=32, attn_features=16, depth=2)
  variables = jax.jit(block.init)(jax.random.key(1), x)
  ref = jax.jit(block.apply)(variables, x)
  out = jax.jit(mv2.MobileViTv2Block(features=32, attn_features=16, depth=2,
                                     dtype=jnp.bfloat16).apply)(variables, x)
  assert out.dtype == jnp.bfloat16
  out = np.asarray(out, np.float32)
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.02


def test_jit_matches_eager_block():
  # The model-level tests all run jitted; check jit against eager on one block.
  block = mv2.MobileViTv2Block(features=16, attn_features=8, depth=1)
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 16))
  variables = block.init(jax.random.key(1), x)
  ref = block.apply(variables, x)
  out = jax.jit(block.apply)(variables, x)
  assert out.shape == x.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_unfold_fold_round_trip():
  x = jax.random.normal(jax.random.key(0), (2, 6, 4, 3))
  tokens = mv2.unfold_patches(x, 2)
  assert tokens.shape == (2, 4, 6, 3)
  # Token [b, p, n] is pixel p (row-major in the 2x2 patch) of patch n.
  np.testing.assert_array_equal(tokens[:, 3, 4], x[:, 5, 1])
  np.testing.assert_array_equal(mv2.fold_patches(tokens, 2, 6, 4), x)


def test_resize_align_corners():
  x = jnp.arange(3.0).reshape(1, 3, 1, 1) * jnp.ones((1, 3, 3, 2))
  y = mv2.resize_bilinear_align_corners(x, 4, 5)
  assert y.shape == (1, 4, 5, 2)
  # align_corners=True keeps the corners and spaces samples evenly in between.
  np.testing.assert_allclose(y[0, :, 0, 0], [0.0, 2 / 3, 4 / 3, 2.0], rtol=1e-6)
  np.testing.assert_allclose(y[0, 1, :, 1], np.full(5, 2 / 3), rtol=1e-6)


class _DoubleFfn(nn.Module):
  """A stand-in for a mixture-of-experts FFN: two ConvMlps, summed."""

  hidden_features: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):
    assert x.ndim == 4  # [B, P, N, d]
    mlp = functools.partial(layers.Mlp, self.hidden_features, act=nn.silu,
                            dtype=self.dtype)
    return (mlp(name="expert_0")(x, deterministic)
            + mlp(name="expert_1")(x, deterministic))


def test_ffn_hook_swaps_chosen_layers():
  model = models.create_model(
      "mobilevitv2_050", num_classes=10,
      ffn_for_layer=lambda stage, layer: _DoubleFfn if (stage, layer) == (5, 2)
      else None)
  x = jax.ShapeDtypeStruct((2, RES, RES, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  stage5 = variables["params"]["stages_4_1"]
  assert set(stage5["transformer_2"]["mlp"]) == {"expert_0", "expert_1"}
  assert set(stage5["transformer_1"]["mlp"]) == {"fc1", "fc2"}
  assert set(variables["params"]["stages_2_1"]["transformer_1"]["mlp"]) == {
      "fc1", "fc2"}
  logits, _ = jax.eval_shape(model.apply, variables, x)
  assert logits.shape == (2, 10)


def test_transformer_block_standalone():
  block = mv2.LinearTransformerBlock(ffn=_DoubleFfn)
  x = jax.random.normal(jax.random.key(0), (2, 4, 9, 16))
  variables = block.init(jax.random.key(1), x)
  assert variables["params"]["attn"]["qkv_proj"]["kernel"].shape == (16, 33)
  assert block.apply(variables, x).shape == x.shape


def _to_torch_layout(path, value):
  """Inverse of the converter's re-layout, to fake a timm state_dict."""
  value = np.asarray(value)
  if value.ndim == 4:  # HWIO -> OIHW
    return value.transpose(3, 2, 0, 1)
  if value.ndim == 2:  # Dense (I, O) -> Linear (O, I) or 1x1 Conv2d (O, I, 1, 1)
    return value.T if path[0] == "head" else value.T[:, :, None, None]
  return value


def _fake_state_dict(variables):
  sd = {}
  for collection in ("params", "batch_stats"):
    for path, value in jax.tree_util.tree_leaves_with_path(variables[collection]):
      keys = tuple(k.key for k in path)
      sd[mv2.torch_name(keys)] = _to_torch_layout(keys, value)
  sd["stem.bn.num_batches_tracked"] = np.zeros((), np.int64)
  return sd


def test_converter_round_trip(model_and_vars):
  model, variables = model_and_vars
  sd = _fake_state_dict(variables)
  assert "stages.2.1.transformer.0.attn.qkv_proj.weight" in sd
  assert sd["stages.2.1.transformer.0.attn.qkv_proj.weight"].shape == (129, 64, 1, 1)
  assert sd["stages.0.0.conv2_kxk.conv.weight"].shape == (32, 1, 3, 3)
  assert sd["head.fc.weight"].shape == (10, 256)
  assert "stages.4.1.conv_proj.bn.running_var" in sd
  converted = mv2.convert_torch_state_dict(sd, model)
  assert (jax.tree_util.tree_structure(converted)
          == jax.tree_util.tree_structure(variables))
  for a, b in zip(jax.tree_util.tree_leaves(converted),
                  jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(a, b)


def test_converter_errors(model_and_vars):
  model, variables = model_and_vars
  sd = _fake_state_dict(variables)
  with pytest.raises(KeyError, match="not used"):
    mv2.convert_torch_state_dict({**sd, "extra.weight": np.zeros(3)}, model)
  missing = dict(sd)
  del missing["stem.conv.weight"]
  with pytest.raises(KeyError, match="stem.conv.weight"):
    mv2.convert_torch_state_dict(missing, model)
  with pytest.raises(ValueError, match=r"head\.fc\."):
    mv2.convert_torch_state_dict(
        {**sd, "head.fc.weight": np.zeros((1000, 256), np.float32),
         "head.fc.bias": np.zeros(1000, np.float32)}, model)


def _train_state(model, num_classes_seed=0):
  """A train-state-shaped dict (what checkpoints hold) for checkpointing.init_from."""
  variables = jax.jit(model.init)(jax.random.key(num_classes_seed), _images())
  return {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
          "batch_stats": variables["batch_stats"], "opt_state": {}, "ema_params": {}}


def test_init_from_keeps_batchnorm_statistics(tmp_path):
  from vit_edge import checkpointing  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  tiny = dict(width_multiplier=0.25)
  pretrained = _train_state(models.create_model("mobilevitv2_050", num_classes=5,
                                                **tiny))
  # Statistics a pretraining run would have moved away from the init (0 and 1).
  pretrained["batch_stats"] = jax.tree_util.tree_map(
      lambda x: x + jax.random.uniform(jax.random.key(3), x.shape),
      pretrained["batch_stats"])
  manager = checkpointing.CheckpointManager(
      str(tmp_path / "checkpoints"), ml_collections.ConfigDict(
          dict(every_steps=1, keep=1, keep_best=False, async_save=False)))
  manager.save(7, pretrained, None)
  manager.wait()

  fresh = _train_state(models.create_model("mobilevitv2_050", num_classes=3, **tiny),
                       num_classes_seed=1)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree_util.tree_map(lambda _: device, fresh)
  tuned = checkpointing.init_from(fresh, str(tmp_path), shardings, grid=2)
  jax.tree_util.tree_map(np.testing.assert_array_equal, tuned["batch_stats"],
                         pretrained["batch_stats"])
  np.testing.assert_array_equal(tuned["params"]["stem"]["conv"]["kernel"],
                                pretrained["params"]["stem"]["conv"]["kernel"])
  assert tuned["params"]["head"]["kernel"].shape[-1] == 3  # New head kept.
