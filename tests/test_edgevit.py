"""Tests for the EdgeViT family (vit_edge/models/edgevit.py); no torch needed.

Forward passes run under jax.jit (op-by-op dispatch of a whole model is far
slower than compiling it once). Variables come from numpy over the shapes of
jax.eval_shape(model.init): compiling the initialisers (hundreds of RNG calls)
costs more than all the forward tests together.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_edge.models import edgevit
from vit_edge.models import registry

RES = 64  # smallest size that keeps every stage's map divisible by its sample ratio


def _init(model, res=RES, batch=2):
  """Random variables with model.init's tree and shapes, plus an input batch."""
  x = jax.random.normal(jax.random.key(1), (batch, res, res, 3))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    if name == "var":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    value = rng.normal(0.0, 0.05, leaf.shape).astype(np.float32)
    return value + 1.0 if name == "scale" else value

  variables = jax.tree_util.tree_map_with_path(fill, nn.unbox(dict(shapes)))
  return variables, x


_JITTED = {}


def _apply(model, variables, x, **kwargs):
  """model.apply under jit, compiled once per (model, train, mutable)."""
  static = tuple((k, kwargs.pop(k)) for k in ("train", "mutable") if k in kwargs)
  key = (id(model), static)
  if key not in _JITTED:
    # Keeps `model` alive so that its id is not reused by another module.
    _JITTED[key] = (model, jax.jit(functools.partial(model.apply, **dict(static))))
  return _JITTED[key][1](variables, x, **kwargs)


@pytest.fixture(scope="module")
def xxs():
  model = edgevit.edgevit_xxs(num_classes=10)
  variables, x = _init(model)
  return model, variables, x


def test_forward_shapes(xxs):
  model, variables, x = xxs
  logits, aux = _apply(model, variables, x)
  assert logits.shape == (2, 10)
  expected = {
      "stem": (2, 16, 16, 36), "stage1": (2, 16, 16, 36), "stage2": (2, 8, 8, 72),
      "stage3": (2, 4, 4, 144), "stage4": (2, 2, 2, 288), "pre_logits": (2, 288)}
  assert {k: v.shape for k, v in aux.items()} == expected
  assert np.isfinite(np.asarray(logits)).all()


def test_no_head_returns_pre_logits(xxs):
  _, variables, x = xxs
  model = edgevit.edgevit_xxs(num_classes=0)
  params = {k: v for k, v in variables["params"].items() if k != "head"}
  logits, aux = _apply(model, {"params": params, "batch_stats": variables["batch_stats"]},
                        x)
  np.testing.assert_array_equal(logits, aux["pre_logits"])


@pytest.mark.parametrize("res", [40, 48, 100])
def test_non_divisible_resolution_raises(xxs, res):
  model, variables, _ = xxs
  with pytest.raises(ValueError, match=f"{res}x{res}"):
    model.apply(variables, jnp.zeros((1, res, res, 3)))


def test_other_divisible_resolution(xxs):
  model, variables, _ = xxs
  logits, aux = _apply(model, variables, jnp.zeros((1, 96, 128, 3)))
  assert logits.shape == (1, 10)
  assert aux["stage4"].shape == (1, 3, 4, 288)


def test_train_vs_eval():
  model = edgevit.edgevit_xxs(num_classes=10, drop_path_rate=0.3, dropout_rate=0.2)
  variables, x = _init(model)
  # Eval: deterministic, needs no RNG, and BN stats are read-only (not mutable here).
  eval1, _ = _apply(model, variables, x, rngs={"dropout": jax.random.key(4)})
  eval2, _ = _apply(model, variables, x, rngs={"dropout": jax.random.key(5)})
  np.testing.assert_array_equal(eval1, eval2)
  # Train: dropout / drop-path draw from the 'dropout' stream; BN stats update.
  (tr1, _), new1 = _apply(model, variables, x, train=True, mutable=("batch_stats",),
                          rngs={"dropout": jax.random.key(1)})
  (tr2, _), _ = _apply(model, variables, x, train=True, mutable=("batch_stats",),
                       rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(tr1, tr2)
  old = jax.tree_util.tree_leaves(variables["batch_stats"])
  new = jax.tree_util.tree_leaves(new1["batch_stats"])
  assert len(old) == len(new) > 0
  assert all(not np.allclose(a, b) for a, b in zip(old, new))


def test_train_needs_no_rng_without_dropout():
  model = edgevit.edgevit_xxs(num_classes=10)
  variables, x = _init(model)
  (_, _), new = _apply(model, variables, x, train=True, mutable=("batch_stats",))
  assert set(new) == {"batch_stats"}


def test_bf16_forward(xxs):
  model, variables, x = xxs
  logits32, _ = _apply(model, variables, x)
  model16 = edgevit.edgevit_xxs(num_classes=10, dtype=jnp.bfloat16)
  logits16, aux16 = _apply(model16, variables, x)
  assert logits16.dtype == jnp.bfloat16
  assert aux16["stage2"].dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(logits16, np.float32)).all()
  np.testing.assert_allclose(np.asarray(logits16, np.float32), logits32, atol=0.1, rtol=0.1)
  # Parameters stay float32 whatever the compute dtype.
  params16 = jax.eval_shape(model16.init, jax.random.key(0), x)["params"]
  assert {a.dtype for a in jax.tree_util.tree_leaves(params16)} == {jnp.dtype(jnp.float32)}


def test_jit_train_step_gradients(xxs):
  """A jitted training-mode gradient reaches every parameter, and is finite."""
  model, variables, x = xxs
  model = edgevit.edgevit_xxs(num_classes=10, drop_path_rate=0.1)
  x = x[:, :32, :32]  # smallest valid input: the backward pass compiles slowly

  @jax.jit
  def grads(params):
    def loss(p):
      (logits, _), _ = model.apply(
          {"params": p, "batch_stats": variables["batch_stats"]}, x, train=True,
          mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
      return jnp.mean(logits ** 2)
    return jax.grad(loss)(params)

  g = grads(variables["params"])
  flat = jax.tree_util.tree_leaves_with_path(g)
  assert len(flat) == len(jax.tree_util.tree_leaves(variables["params"]))
  for path, leaf in flat:
    leaf = np.asarray(leaf)
    assert np.isfinite(leaf).all(), jax.tree_util.keystr(path)
    assert np.abs(leaf).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("ratio", [2, 4])
def test_local_prop_equals_transposed_conv(ratio):
  """The broadcast-multiply LocalProp is exactly a depthwise transposed conv."""
  c = 6
  module = edgevit.DepthwiseConvTransposeNoOverlap(ratio)
  x = jax.random.normal(jax.random.key(0), (2, 3, 5, c))
  variables = module.init(jax.random.key(1), x)
  # Random bias (init may give near-zero values) so a missing add would show.
  variables = {"params": dict(variables["params"], bias=jnp.arange(c, dtype=jnp.float32))}
  kernel = variables["params"]["kernel"]  # (r, r, 1, C), torch (C, 1, r, r) as HWIO
  # torch ConvTranspose2d = input-dilated conv with the spatially flipped kernel.
  ref = jax.lax.conv_general_dilated(
      x, kernel[::-1, ::-1], window_strides=(1, 1),
      padding=[(ratio - 1, ratio - 1)] * 2, lhs_dilation=(ratio, ratio),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
  ref = ref + variables["params"]["bias"]
  out = module.apply(variables, x)
  assert out.shape == (2, 3 * ratio, 5 * ratio, c)
  np.testing.assert_allclose(out, ref, atol=1e-6)


def _to_torch_state_dict(variables):
  """Inverse of convert_torch_state_dict, written independently for the round trip."""
  sd = {}

  def walk(tree, prefix, collection):
    for key, value in tree.items():
      if isinstance(value, dict):
        walk(value, prefix + [key], collection)
        continue
      parts = []
      for p in prefix:
        if p.startswith("blocks") and "_" in p:
          stage, idx = p.split("_")
          parts += [stage, idx]
        else:
          parts.append(p)
      module = ".".join(parts)
      value = np.asarray(value)
      if collection == "batch_stats":
        sd[f"{module}.running_{'mean' if key == 'mean' else 'var'}"] = value
        sd[f"{module}.num_batches_tracked"] = np.array(3)
      elif key == "kernel":
        sd[f"{module}.weight"] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      elif key == "scale":
        sd[f"{module}.weight"] = value
      else:
        sd[f"{module}.{key}"] = value

  walk(variables["params"], [], "params")
  walk(variables["batch_stats"], [], "batch_stats")
  return sd


def test_converter_round_trip(xxs):
  model, variables, _ = xxs
  variables = jax.tree_util.tree_map(np.asarray, dict(variables))
  sd = _to_torch_state_dict(variables)
  # Names and layouts of the official code.
  assert sd["patch_embed1.proj.weight"].shape == (36, 3, 4, 4)
  assert sd["blocks1.0.LocalAgg.attn.weight"].shape == (36, 1, 5, 5)
  assert sd["blocks1.0.SelfAttn.attn.LocalProp.weight"].shape == (36, 1, 4, 4)
  assert sd["blocks3.2.SelfAttn.attn.qkv.weight"].shape == (3 * 144, 144)
  assert sd["blocks4.1.SelfAttn.mlp.fc1.weight"].shape == (4 * 288, 288)
  assert sd["norm.running_var"].shape == (288,)
  assert not any(k.startswith("blocks4.0.LocalAgg") for k in sd)  # r = 1: no LocalAgg
  assert "blocks4.0.SelfAttn.attn.norm.weight" not in sd
  converted = edgevit.convert_torch_state_dict(sd, model)
  assert jax.tree_util.tree_structure(converted) == jax.tree_util.tree_structure(variables)
  for a, b in zip(jax.tree_util.tree_leaves(converted), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(a, b)


def test_converter_rejects_wrong_size(xxs):
  _, variables, _ = xxs
  sd = _to_torch_state_dict(jax.tree_util.tree_map(np.asarray, dict(variables)))
  with pytest.raises(ValueError):
    edgevit.convert_torch_state_dict(sd, edgevit.edgevit_xs(num_classes=10))
  del sd["blocks2.0.SelfAttn.attn.proj.bias"]
  with pytest.raises(ValueError, match="lacks"):
    edgevit.convert_torch_state_dict(sd, edgevit.edgevit_xxs(num_classes=10))


@pytest.mark.parametrize("name,width", [("edgevit_xxs", 288), ("edgevit_xs", 384),
                                        ("edgevit_s", 384)])
def test_full_size_shapes_and_registry(name, width):
  info = registry.get_model_info(name)
  assert (info.family, info.image_size, info.stride) == ("edgevit", 224, 32)
  assert info.mean == registry.IMAGENET_MEAN and info.std == registry.IMAGENET_STD
  model = info.builder(num_classes=1000)
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  logits, aux = jax.eval_shape(model.apply, variables, x)
  assert logits.shape == (1, 1000)
  assert aux["stem"].shape[1:3] == (56, 56)
  assert aux["stage4"].shape == (1, 7, 7, width)
