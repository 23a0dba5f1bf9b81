"""Tests for the ViT / DeiT family (vit_edge.models.vit); tiny resolutions, no torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_edge.models import registry
from vit_edge.models import vit

SIZE = 32  # 2x2 patches of 16: 4 + prefix tokens, fast on CPU.


def _init(model, size=SIZE, batch=2, seed=0):
  x = jax.random.uniform(jax.random.key(seed), (batch, size, size, 3))
  return model.init(jax.random.key(1), x), x


def _apply(model, variables, x, train=False, rngs=None):
  return model.apply(variables, x, train=train, rngs=rngs)


@pytest.mark.parametrize("distilled", [False, True])
def test_forward_shapes(distilled):
  name = "deit_tiny_distilled_patch16" if distilled else "deit_tiny_patch16"
  # The full 12 blocks once; shallower elsewhere to keep the suite fast on CPU.
  depth = {} if not distilled else {"depth": 2}
  model = registry.create_model(name, num_classes=10, image_size=SIZE, qkv_block=-1,
                                **depth)
  variables, x = _init(model)
  logits, aux = _apply(model, variables, x)
  prefix = 2 if distilled else 1
  assert logits.shape == (2, 10)
  assert aux["stem"].shape == (2, 4, 192)
  assert aux["tokens"].shape == (2, prefix + 4, 192)
  assert aux["pre_logits"].shape == (2, 192)
  np.testing.assert_array_equal(aux["pre_logits"], aux["tokens"][:, 0])
  np.testing.assert_array_equal(aux["prefix_tokens"], aux["tokens"][:, :prefix])
  for key in "qkv":
    assert aux[key].shape == (2, 3, prefix + 4, 64)
  assert "blocks" not in aux
  if distilled:
    assert aux["logits_cls"].shape == aux["logits_dist"].shape == (2, 10)
    np.testing.assert_allclose(
        logits, (aux["logits_cls"] + aux["logits_dist"]) / 2, rtol=1e-6, atol=1e-6)
    assert "head_dist" in variables["params"]
    assert variables["params"]["pos_embed"].shape == (1, 6, 192)
  else:
    assert "logits_cls" not in aux and "dist_token" not in variables["params"]


def test_no_qkv_unless_asked():
  model = vit.VisionTransformer(image_size=SIZE, embed_dim=32, depth=2, num_heads=2,
                                num_classes=3)
  variables, x = _init(model)
  _, aux = _apply(model, variables, x)
  assert not {"q", "k", "v"} & set(aux)


def test_qkv_block_out_of_range():
  model = vit.VisionTransformer(image_size=SIZE, embed_dim=32, depth=2, num_heads=2,
                                qkv_block=2)
  with pytest.raises(ValueError, match="qkv_block=2"):
    _init(model)


def test_custom_small_vit_and_overrides():
  model = vit.VisionTransformer(image_size=16, patch_size=4, embed_dim=48, depth=3,
                                num_heads=4, mlp_ratio=2.0, num_classes=5, qkv_block=1)
  variables, x = _init(model, size=16)
  logits, aux = _apply(model, variables, x)
  assert logits.shape == (2, 5) and aux["q"].shape == (2, 4, 17, 12)
  assert variables["params"]["blocks_0"]["mlp"]["fc1"]["kernel"].shape == (48, 96)
  assert "blocks_2" in variables["params"] and "blocks_3" not in variables["params"]
  # Registered sizes accept architecture overrides too (e.g. a shallower DeiT-Tiny).
  shallow = registry.create_model("deit_tiny_patch16", depth=2, image_size=SIZE)
  assert shallow.depth == 2 and shallow.embed_dim == 192


@pytest.mark.parametrize("distilled", [False, True])
def test_num_classes_zero(distilled):
  model = vit.VisionTransformer(image_size=SIZE, embed_dim=32, depth=1, num_heads=2,
                                num_classes=0, distilled=distilled)
  variables, x = _init(model)
  logits, aux = _apply(model, variables, x)
  assert "head" not in variables["params"] and "head_dist" not in variables["params"]
  expected = ((aux["tokens"][:, 0] + aux["tokens"][:, 1]) / 2 if distilled
              else aux["pre_logits"])
  np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)


def test_wrong_resolution_raises():
  model = registry.create_model("deit_tiny_patch16", image_size=SIZE, depth=1)
  variables, _ = _init(model)
  with pytest.raises(ValueError, match=r"32x32.*48x48.*image_size=48"):
    model.apply(variables, jnp.zeros((1, 48, 48, 3)))
  with pytest.raises(ValueError, match="rank 4"):
    model.apply(variables, jnp.zeros((SIZE, SIZE, 3)))
  bad = vit.VisionTransformer(image_size=40, embed_dim=32, depth=1, num_heads=2)
  with pytest.raises(ValueError, match="patch_size=16"):
    _init(bad, size=40)


def test_train_vs_eval():
  model = vit.VisionTransformer(image_size=SIZE, embed_dim=32, depth=2, num_heads=2,
                                num_classes=4, drop_path_rate=0.5, dropout_rate=0.5)
  variables, x = _init(model)
  assert set(variables) == {"params"}  # No BatchNorm: nothing mutable to update.
  eval1, _ = _apply(model, variables, x)
  eval2, _ = _apply(model, variables, x, train=False)
  np.testing.assert_array_equal(eval1, eval2)
  rngs = {"dropout": jax.random.key(3)}
  train1, _ = _apply(model, variables, x, train=True, rngs=rngs)
  train2, _ = _apply(model, variables, x, train=True,
                     rngs={"dropout": jax.random.key(4)})
  assert not np.allclose(train1, eval1)
  assert not np.allclose(train1, train2)
  # Without drop rates, train and eval compute the same function.
  plain = model.clone(drop_path_rate=0.0, dropout_rate=0.0)
  np.testing.assert_allclose(_apply(plain, variables, x, train=True)[0], eval1,
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_block_split_computes_the_same_rows(train):
  # The last block computes the prefix tokens apart from the patch tokens; with the
  # same parameters and dropout key both parts are the unsplit block's rows, and
  # stochastic depth keeps or drops a sample's parts together.
  block = vit.Block(num_heads=2, drop_path_rate=0.5)
  x = jax.random.normal(jax.random.key(0), (8, 6, 32))
  variables = block.init(jax.random.key(1), x)
  rngs = {"dropout": jax.random.key(2)}
  (whole,), qkv = block.apply(variables, x, train, rngs=rngs)
  (prefix, patches), split_qkv = block.apply(variables, x, train, 2, rngs=rngs)
  np.testing.assert_allclose(prefix, whole[:, :2], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(patches, whole[:, 2:], rtol=1e-6, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, split_qkv, qkv)
  if train:  # Some samples dropped, some kept: the check above saw both.
    residual_only = np.all(np.isclose(whole, x, atol=1e-6), axis=(1, 2))
    assert 0 < residual_only.sum() < 8


def test_patch_tokens_of_the_last_block_are_dead_code_for_the_logits():
  # Logits alone compile without the last block's patch-token projection and MLP.
  dim, hidden, patches = 32, 128, (64 // 16) ** 2
  model = vit.VisionTransformer(image_size=64, embed_dim=dim, depth=2, num_heads=2,
                                num_classes=3)
  variables, x = _init(model, size=64, batch=1)

  def flops(fn):
    return jax.jit(fn).lower(variables, x).compile().cost_analysis()["flops"]

  logits_only = flops(lambda v, x: model.apply(v, x)[0])
  with_tokens = flops(lambda v, x: model.apply(v, x))
  patch_macs = patches * (dim * dim + 2 * dim * hidden)  # proj, fc1, fc2.
  assert with_tokens - logits_only >= 2 * patch_macs


def test_bf16_forward():
  model = registry.create_model("deit_tiny_distilled_patch16", num_classes=10,
                                image_size=SIZE, depth=2)
  variables, x = _init(model)
  ref, _ = _apply(model, variables, x)
  low, aux = _apply(model.clone(dtype=jnp.bfloat16), variables, x)
  assert low.dtype == jnp.bfloat16 and aux["tokens"].dtype == jnp.bfloat16
  assert jax.tree.leaves(variables)[0].dtype == jnp.float32
  low = np.asarray(low, np.float32)
  assert np.isfinite(low).all()
  np.testing.assert_allclose(low, ref, atol=0.1 * float(np.abs(ref).max()) + 0.05)


def test_jit_matches_eager():
  # Shallow: the eager reference runs op by op.
  model = registry.create_model("deit_tiny_patch16", num_classes=7, image_size=SIZE,
                                depth=2)
  variables, x = _init(model)
  eager, _ = model.apply(variables, x)
  jitted, aux = jax.jit(model.apply)(variables, x)
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
  assert aux["tokens"].shape == (2, 5, 192)


def _to_torch_state_dict(params):
  """Inverse of the converter, written independently: Flax params -> timm names."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [k.key for k in path]
    *mods, last = keys
    mods = ["blocks." + m[len("blocks_"):] if m.startswith("blocks_") else m
            for m in mods]
    value = np.asarray(leaf)
    if last == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      last = "weight"
    elif last == "scale":
      last = "weight"
    out[".".join(mods + [last])] = value
  return out


@pytest.mark.parametrize("distilled", [False, True])
def test_converter_round_trip(distilled):
  model = vit.VisionTransformer(image_size=SIZE, embed_dim=32, depth=2, num_heads=2,
                                num_classes=3, distilled=distilled)
  variables, x = _init(model)
  state_dict = _to_torch_state_dict(variables["params"])
  # Spot-check the timm names the inverse produced.
  assert "patch_embed.proj.weight" in state_dict
  assert state_dict["patch_embed.proj.weight"].shape == (32, 3, 16, 16)
  assert state_dict["blocks.1.attn.qkv.weight"].shape == (96, 32)
  assert "blocks.0.norm1.weight" in state_dict and "norm.bias" in state_dict
  assert ("dist_token" in state_dict) == distilled
  converted = vit.convert_torch_state_dict(state_dict, model)
  assert set(converted) == {"params"}
  assert (jax.tree_util.tree_structure(converted["params"])
          == jax.tree_util.tree_structure(variables["params"]))
  jax.tree.map(np.testing.assert_array_equal, converted["params"], variables["params"])
  np.testing.assert_array_equal(_apply(model, converted, x)[0],
                                _apply(model, variables, x)[0])


def test_converter_rejects_mismatch():
  model = vit.VisionTransformer(image_size=SIZE, embed_dim=32, depth=1, num_heads=2,
                                num_classes=3)
  variables, _ = _init(model)
  state_dict = _to_torch_state_dict(variables["params"])
  with pytest.raises(KeyError, match="dist_token"):
    vit.convert_torch_state_dict(state_dict, model.clone(distilled=True))
  with pytest.raises(ValueError, match="pos_embed"):
    vit.convert_torch_state_dict(state_dict, model.clone(image_size=48))
  with pytest.raises(KeyError, match="extra"):
    vit.convert_torch_state_dict({**state_dict, "extra": np.zeros(1)}, model)


@pytest.mark.parametrize("prefix", [1, 2])
def test_resize_pos_embed(prefix):
  pos = jax.random.normal(jax.random.key(0), (1, prefix + 4, 8))
  same = vit.resize_pos_embed(pos, 2, (2, 2), prefix)
  np.testing.assert_allclose(same, pos, rtol=1e-6, atol=1e-6)
  big = vit.resize_pos_embed(pos, 2, 3, prefix)
  assert big.shape == (1, prefix + 9, 8)
  np.testing.assert_array_equal(big[:, :prefix], pos[:, :prefix])
  # A constant grid stays constant under interpolation.
  const = jnp.ones((1, prefix + 4, 8))
  np.testing.assert_allclose(vit.resize_pos_embed(const, 2, 3, prefix), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="prefix"):
    vit.resize_pos_embed(pos, 3, 4, prefix)


def test_fine_tune_at_new_resolution():
  model = registry.create_model("deit_tiny_distilled_patch16", num_classes=3,
                                image_size=SIZE, depth=1)
  variables, _ = _init(model)
  params = dict(variables["params"])
  params["pos_embed"] = vit.resize_pos_embed(params["pos_embed"], 2, 3, 2)
  bigger = model.clone(image_size=48)
  logits, aux = _apply(bigger, {"params": params}, jnp.zeros((2, 48, 48, 3)))
  assert logits.shape == (2, 3) and aux["tokens"].shape == (2, 11, 192)


def test_registry_entries():
  deit = ["deit_base_distilled_patch16", "deit_base_patch16",
          "deit_small_distilled_patch16", "deit_small_patch16",
          "deit_tiny_distilled_patch16", "deit_tiny_patch16"]
  assert registry.list_models("deit_*") == deit
  assert registry.list_models("vit_*_patch16") == ["vit_base_patch16",
                                                   "vit_large_patch16"]
  top1 = {"deit_tiny_patch16": 72.2, "deit_small_patch16": 79.8,
          "deit_base_patch16": 81.8, "deit_tiny_distilled_patch16": 74.5,
          "deit_small_distilled_patch16": 81.2, "deit_base_distilled_patch16": 83.4,
          "vit_base_patch16": None, "vit_large_patch16": None}
  for name, acc in top1.items():
    info = registry.get_model_info(name)
    assert info.family == ("vit" if name.startswith("vit") else "deit")
    assert (info.image_size, info.stride, info.fixed_resolution) == (224, 16, True)
    assert info.top1 == acc


def test_full_size_shapes_abstract():
  model = registry.create_model("vit_large_patch16", qkv_block=12)
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  logits, aux = jax.eval_shape(model.apply, variables, x)
  assert logits.shape == (1, 1000)
  assert aux["stem"].shape == (1, 196, 1024)
  assert aux["tokens"].shape == (1, 197, 1024)
  assert aux["q"].shape == (1, 16, 197, 64)
