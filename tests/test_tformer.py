"""Tests of the TFormer reconstruction (vit_edge/models/tformer.py).

Tiny resolutions and batch 2 keep them fast; full-size models only via jax.eval_shape.
Exact parameter counts are pinned in tests/test_models.py, not here.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_edge.models import layers
from vit_edge.models import registry
from vit_edge.models import tformer

RES = 64  # smallest size that keeps a 2x2 map in stage 4
# Behaviour tests use a one-block-per-stage narrow TFormer: XLA compile time of the
# full tformer_s dominates otherwise.
TINY = dict(depths=(1, 1, 1, 1), widths=(8, 16, 24, 32), num_classes=10)


def _input(res=RES, batch=2):
  return jax.random.normal(jax.random.key(1), (batch, res, res, 3))


def _key(seed=0):
  # The rbg PRNG compiles several times faster than threefry on CPU; initialisation
  # values do not matter to these tests.
  return jax.random.key(seed, impl="rbg")


def _init(model, x):
  return jax.jit(model.init)(_key(), x)


def _apply(model, variables, x, train=False, rngs=None):
  fn = jax.jit(lambda v, x, r: model.apply(v, x, train=train, rngs=r))
  return fn(variables, x, rngs)


@pytest.fixture(scope="module")
def small():
  """tformer_s at 64x64: (model, variables, x, (logits, aux)) from one compile."""
  model = tformer.tformer_s(num_classes=10)
  x = _input()
  out, variables = jax.jit(model.init_with_output)(_key(), x)
  return model, variables, x, out


@pytest.fixture(scope="module")
def tiny():
  model = tformer.TFormer(**TINY)
  x = _input()
  return model, _init(model, x), x


def test_forward_shapes(small):
  _, variables, _, (logits, aux) = small
  assert logits.shape == (2, 10)
  assert aux["stem"].shape == (2, 16, 16, 64)
  assert aux["stage1"].shape == (2, 16, 16, 64)
  assert aux["stage2"].shape == (2, 8, 8, 128)
  assert aux["stage3"].shape == (2, 4, 4, 320)
  assert aux["stage4"].shape == (2, 2, 2, 512)
  assert aux["pre_logits"].shape == (2, 512)
  assert set(variables) == {"params"}  # GroupNorm only: no batch statistics
  assert np.all(np.isfinite(logits))


def test_no_head_returns_pre_logits():
  model = tformer.TFormer(**{**TINY, "num_classes": 0})
  x = _input()
  variables = _init(model, x)
  logits, aux = _apply(model, variables, x)
  assert "head" not in variables["params"]
  np.testing.assert_array_equal(logits, aux["pre_logits"])


def test_non_divisible_resolution_raises(tiny):
  model, variables, _ = tiny
  with pytest.raises(ValueError, match="48x48"):
    model.apply(variables, jnp.zeros((1, 48, 48, 3)))


def test_param_naming_follows_poolformer_layout(small):
  variables = small[1]
  params = variables["params"]
  assert params["patch_embed"]["proj"]["kernel"].shape == (7, 7, 3, 64)
  assert params["network_1"]["proj"]["kernel"].shape == (3, 3, 64, 128)
  block = params["network_4_5"]  # stage 3, last block
  assert block["token_mixer"]["proj"]["kernel"].shape == (1, 1, 320, 320)
  assert block["mlp"]["fc1"]["kernel"].shape == (1, 1, 160, 1280)  # 2 groups
  assert block["mlp"]["fc2"]["kernel"].shape == (1, 1, 640, 320)
  np.testing.assert_allclose(block["layer_scale_1"], 1e-5)
  assert set(block["norm1"]) == {"scale", "bias"}


def test_avg_pool_excludes_padding():
  x = np.random.RandomState(0).randn(1, 6, 7, 2).astype(np.float32)
  for k in (3, 5, 7):
    p = k // 2
    want = np.zeros_like(x)
    for i in range(6):
      for j in range(7):
        win = x[0, max(i - p, 0):i + p + 1, max(j - p, 0):j + p + 1]
        want[0, i, j] = win.mean(axis=(0, 1))
    np.testing.assert_allclose(tformer.avg_pool_same(jnp.asarray(x), k), want,
                               rtol=1e-5, atol=1e-6)


def test_max_pool_same():
  x = np.random.RandomState(0).randn(1, 6, 5, 2).astype(np.float32) - 10.0
  p = 2
  want = np.zeros_like(x)
  for i in range(6):
    for j in range(5):
      want[0, i, j] = x[0, max(i - p, 0):i + p + 1, max(j - p, 0):j + p + 1].max(
          axis=(0, 1))
  np.testing.assert_array_equal(tformer.max_pool_same(jnp.asarray(x), 5), want)


@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_separable_max_pool_is_the_k_by_k_pool_with_its_gradient(kernel):
  """Same values and the same gradient routing (the first maximum, row-major) as
  one k x k pool, exactly, on data full of ties (small integers): the gradient
  values are integers too, so any difference is a routing difference."""
  rng = np.random.RandomState(kernel)
  x = jnp.asarray(rng.randint(0, 3, size=(2, 9, 8, 3)), jnp.float32)
  g = jnp.asarray(rng.randint(-4, 5, size=x.shape), jnp.float32)

  def pooled_and_grad(separable):
    y, vjp = jax.vjp(lambda x: tformer.max_pool_same(x, kernel, separable), x)
    return y, vjp(g)[0]

  (y2d, dx2d), (ysep, dxsep) = pooled_and_grad(False), pooled_and_grad(True)
  np.testing.assert_array_equal(ysep, y2d)
  np.testing.assert_array_equal(dxsep, dx2d)


@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_separable_average_is_the_window_ratio_export_form(kernel):
  x = jnp.asarray(np.random.RandomState(kernel).randn(2, 9, 8, 3), jnp.float32)
  g = jnp.asarray(np.random.RandomState(1).randn(*x.shape), jnp.float32)
  ours, ours_vjp = jax.vjp(lambda x: tformer.avg_pool_same(x, kernel), x)
  export, export_vjp = jax.vjp(
      lambda x: tformer.avg_pool_same_as_window_ratio(x, kernel), x)
  np.testing.assert_allclose(ours, export, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours_vjp(g)[0], export_vjp(g)[0], rtol=1e-5, atol=1e-5)


def test_channel_shuffle_order():
  x = jnp.arange(8.0).reshape(1, 1, 1, 8)
  np.testing.assert_array_equal(tformer.channel_shuffle(x, 2)[0, 0, 0],
                                [0, 4, 1, 5, 2, 6, 3, 7])


@pytest.mark.parametrize("groups,mlp_ratio", [(2, 4), (1, 4), (4, 4), (2, 2)])
def test_pcs_ffn_equals_explicit_shuffle_folded_or_not(groups, mlp_ratio):
  dim = 16
  x = jnp.asarray(np.random.RandomState(0).randn(2, 3, 5, dim), jnp.float32)
  ffn = tformer.PCSFFN(mlp_ratio, groups)
  params = ffn.init(jax.random.PRNGKey(1), x)["params"]
  # Random biases, so that their order matters too.
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.PRNGKey(2), p.shape),
                        params)

  def conv(p, y):
    return jax.lax.conv_general_dilated(
        y, p["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups) + p["bias"]

  hidden = tformer.channel_shuffle(conv(params["fc1"], x), groups)
  want = conv(params["fc2"], layers.gelu(hidden))
  np.testing.assert_allclose(ffn.apply({"params": params}, x), want, rtol=1e-5,
                             atol=1e-5)
  folded = tformer.PCSFFN(mlp_ratio, groups, fold_shuffle=True)
  np.testing.assert_allclose(folded.apply({"params": params}, x), want, rtol=1e-5,
                             atol=1e-5)


def test_export_friendly_model_is_the_same_function():
  model = tformer.TFormer(**TINY)
  x = _input()
  variables = _init(model, x)
  want, _ = _apply(model, variables, x)
  got, _ = _apply(model.clone(export_friendly=True), variables, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_shuffle_folding_orders_rejects_indivisible_width():
  with pytest.raises(ValueError, match="divisible by groups"):
    tformer.shuffle_folding_orders(6, 2)


def test_train_vs_eval_dropout_and_drop_path():
  # Layer scale 1 makes the drop-path effect on the outputs large enough to see.
  model = tformer.TFormer(**TINY, drop_path_rate=0.5, dropout_rate=0.5,
                          layer_scale_init=1.0)
  x = _input()
  variables = _init(model, x)
  plain = tformer.TFormer(**TINY, layer_scale_init=1.0)
  eval_a, _ = _apply(model, variables, x)
  eval_b, plain_aux = _apply(plain, variables, x)
  np.testing.assert_array_equal(eval_a, eval_b)  # both are identities in eval
  train = jax.jit(lambda v, x, key: model.apply(v, x, train=True,
                                               rngs={"dropout": key}))
  train_logits, train_aux = train(variables, x, _key(3))
  assert not np.allclose(train_logits, eval_a)
  # Drop path alone (dropout acts only after pooling) changes the stage outputs.
  assert not np.allclose(train_aux["stage4"], plain_aux["stage4"])
  again, _ = train(variables, x, _key(4))
  assert not np.allclose(train_logits, again)


def test_bf16_forward(tiny):
  model, variables, x = tiny
  model16 = tformer.TFormer(**TINY, dtype=jnp.bfloat16)
  logits16, aux16 = _apply(model16, variables, x)
  logits32, _ = _apply(model, variables, x)
  assert logits16.dtype == jnp.bfloat16
  assert aux16["stage4"].dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(logits16, np.float32)))
  np.testing.assert_allclose(np.asarray(logits16, np.float32), logits32,
                             atol=0.1 * float(np.abs(logits32).max()) + 0.05)
  params16 = jax.eval_shape(model16.init, jax.random.key(0), x)["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))


def test_jit_matches_eager(tiny):
  model, variables, x = tiny
  eager, _ = model.apply(variables, x)
  jitted, _ = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)


def _to_torch_state_dict(params):
  """Inverse of convert_torch_state_dict: Flax params -> PyTorch names and layouts."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [k.key for k in path]
    head, rest = keys[0], keys[1:]
    if head.startswith("network_"):
      head = head.replace("_", ".")  # network_4_1 -> network.4.1
    leaf = np.asarray(leaf)
    if rest[-1] in ("kernel", "scale"):
      rest[-1] = "weight"
    if leaf.ndim == 4:
      leaf = leaf.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif leaf.ndim == 2:
      leaf = leaf.T
    out[".".join([head] + rest)] = leaf
  return out


def test_converter_round_trip(small):
  model, variables = small[:2]
  state_dict = _to_torch_state_dict(variables["params"])
  assert "network.0.1.layer_scale_2" in state_dict
  assert "network.3.proj.weight" in state_dict
  assert state_dict["network.2.0.mlp.fc1.weight"].shape == (512, 64, 1, 1)
  state_dict["network.0.0.norm1.num_batches_tracked"] = np.array(0)  # ignored
  converted = tformer.convert_torch_state_dict(state_dict, model)
  assert jax.tree.structure(converted) == jax.tree.structure(
      {"params": variables["params"]})
  jax.tree.map(np.testing.assert_array_equal, converted,
               {"params": variables["params"]})


def test_converter_rejects_bad_tensors(small):
  model, variables = small[:2]
  state_dict = _to_torch_state_dict(variables["params"])
  bad = dict(state_dict)
  bad["head.weight"] = np.zeros((11, 512), np.float32)
  with pytest.raises(ValueError, match="head.weight"):
    tformer.convert_torch_state_dict(bad, model)
  missing = dict(state_dict)
  del missing["norm.bias"]
  with pytest.raises(KeyError, match="norm/bias"):
    tformer.convert_torch_state_dict(missing, model)
  extra = dict(state_dict)
  extra["network.0.9.norm1.weight"] = np.ones(64, np.float32)
  with pytest.raises(KeyError, match="network.0.9"):
    tformer.convert_torch_state_dict(extra, model)


@pytest.mark.parametrize("name,top1", [("tformer_s", 76.1), ("tformer_m", 79.7),
                                       ("tformer_l", 80.6)])
def test_registry_and_full_size_shapes(name, top1):
  info = registry.get_model_info(name)
  assert (info.family, info.image_size, info.stride, info.top1) == (
      "tformer", 224, 32, top1)
  assert "reconstruction" in info.reference
  assert info.mean == registry.IMAGENET_MEAN and info.std == registry.IMAGENET_STD
  model = registry.create_model(name)
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  logits, aux = jax.eval_shape(model.apply, variables, x)
  assert logits.shape == (1, 1000)
  assert aux["stage4"].shape == (1, 7, 7, 512)


def test_every_weight_goes_through_dense_or_conv():
  """Tools that intercept nn.Dense / nn.Conv calls see every parameter."""
  model = tformer.TFormer(**TINY)
  x = _input()
  variables = _init(model, x)
  seen = set()

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, (nn.Dense, nn.Conv)):
      seen.add(context.module.path)
    return next_fun(*args, **kwargs)

  for form in (model, model.export_form()):
    seen.clear()
    with nn.intercept_methods(record):
      form.apply(variables, x)
    kernels = {path[:-1] for path, _ in jax.tree_util.tree_flatten_with_path(
        variables["params"])[0] if path[-1].key == "kernel"}
    kernels = {tuple(k.key for k in path) for path in kernels}
    assert kernels and kernels <= seen, kernels - seen


def test_export_form_is_the_documented_protocol():
  from vit_edge import export  # pylint: disable=g-import-not-at-top
  model = tformer.TFormer(**TINY)
  assert isinstance(model, export.HasExportForm)
  assert model.export_form().export_friendly and not model.export_friendly
