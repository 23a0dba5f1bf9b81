"""Quantisation-aware training (vit_edge/compress/qat.py): fake-quant training,
export parity of the int8 file with the fake-quantised model, unsupported ops.

Needs the optional extra (``pip install -e .[qat]``: qwix, litert-converter);
skipped without it.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("qwix", reason="QAT needs the optional extra: pip install -e .[qat]")
pytest.importorskip("litert_converter",
                    reason="QAT export needs the optional extra: pip install -e .[qat]")

from vit_edge import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from vit_edge.compress import qat  # pylint: disable=g-import-not-at-top,wrong-import-position
from vit_edge.export import validate  # pylint: disable=g-import-not-at-top,wrong-import-position

SIZE = 32
# The patch embedding stays float here: the converter runs the concatenation of
# its int8 output with the class token in int8, quantising the class token with
# the patch embedding's output scale, which the fake-quantised model does not
# do (a known gap, see vit_edge/compress/qat.py); the parity check is exact
# for the layers whose int8 arithmetic QAT does model.
LAYERS = "blocks_.*|head"


@pytest.fixture(scope="module")
def tiny():
  """A one-block DeiT, its float params, and a QAT state after one training step."""
  model = models.create_model("deit_tiny_patch16", num_classes=5, embed_dim=32,
                              depth=1, num_heads=2, image_size=SIZE, patch_size=16)
  images = jax.random.normal(jax.random.key(1), (8, SIZE, SIZE, 3))
  labels = jnp.arange(8) % 5
  # jit throughout: Qwix's interception makes eager calls slow.
  params = jax.jit(model.init)(jax.random.key(0), images[:1])["params"]
  qmodel = qat.qat_model(model, params, LAYERS)
  stats = jax.jit(qmodel.init)(jax.random.key(0), images[:1])["batch_stats"]

  def loss_fn(params, stats):
    (logits, _), updates = qmodel.apply({"params": params, "batch_stats": stats},
                                        images, train=True, mutable=["batch_stats"])
    onehot = jax.nn.one_hot(labels, 5)
    return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), updates

  (loss, updates), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, stats)
  trained = jax.tree_util.tree_map(lambda p, g: p - 0.01 * g, params, grads)
  # A second step's statistics: ranges that see the trained weights, as the
  # running means of a real run do (ranges from the old weights saturate).
  (_, updates), _ = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      trained, updates["batch_stats"])
  variables = {"params": trained, "batch_stats": updates["batch_stats"]}
  fake = jax.jit(lambda v, x: qmodel.apply(v, x, train=False)[0])(variables, images)
  real = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False)[0])(
      trained, images)
  return dict(model=model, qmodel=qmodel, images=images, params=params,
              trained=trained, stats=updates["batch_stats"], loss=loss, grads=grads,
              fake=np.asarray(fake), real=np.asarray(real))


def test_fake_quant_training_step_runs_and_differs_from_float(tiny):
  assert np.isfinite(float(tiny["loss"]))
  grads = jax.tree_util.tree_leaves(tiny["grads"])
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  assert any(float(jnp.abs(g).max()) > 0 for g in grads)
  # Every quantised layer kept ranges for its input and output, updated in training.
  quant, _ = qat.split_stats(tiny["stats"])
  assert sorted(quant) == ["blocks_0", "head"], sorted(quant)
  counts = [int(v) for p, v in jax.tree_util.tree_leaves_with_path(quant)
            if "count" in jax.tree_util.keystr(p)]
  assert counts and min(counts) >= 1
  # Fake quantisation changes the outputs (ranges from one batch: coarse).
  assert np.isfinite(tiny["fake"]).all()
  assert np.abs(tiny["fake"] - tiny["real"]).max() > 0


def test_int8_file_matches_the_fake_quantised_model(tiny):
  params, stats = tiny["trained"], tiny["stats"]
  cmodel = qat.conversion_model(tiny["model"], params, stats, LAYERS)
  fake = tiny["fake"]
  simulated = jax.jit(lambda x: cmodel.apply({"params": params}, x, train=False)[0])(
      tiny["images"])
  np.testing.assert_allclose(np.asarray(simulated), fake, rtol=1e-6, atol=1e-6)
  # Exact GELU here: the export's default (TFLite's tanh GELU) would add the
  # tanh approximation's error to the int8 one.
  tflite_model = qat.to_tflite(cmodel, {"params": params}, SIZE, gelu="exact")
  ops = qat.op_counts(tflite_model)
  assert ops[("FULLY_CONNECTED", "int8")] == 5
  assert not any(name == "FULLY_CONNECTED" and dtype != "int8" for name, dtype in ops)
  got = validate.tflite_outputs(tflite_model, {"image": np.asarray(tiny["images"])})
  # TFLite requantises with fixed-point multipliers and rounds half away from
  # zero where JAX's fake-quant rounds half to even in float, so an int8 value
  # may land one step off, and the head's inputs then move its output by about
  # a step: allow two steps of the head's output range.
  head = stats["head"]
  name = next(k for k in head if k.startswith("layer_output"))
  lo = float(head[name]["sum_of_min"].ravel()[0]) / int(head[name]["count"])
  hi = float(head[name]["sum_of_max"].ravel()[0]) / int(head[name]["count"])
  step = (hi - min(lo, 0.0)) / 255
  diff = np.abs(got["logits"] - fake).max()
  assert diff <= 2 * step, (diff, step)
  assert len(np.unique(fake)) > 10  # a real check, not a collapsed model


class MatmulLayer(nn.Module):
  """A layer that applies its kernel with ``@`` (jnp.matmul): Qwix misses it."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 4))
    return x @ kernel


class TwoLayers(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(4, name="dense")(x) + MatmulLayer(name="mm")(x), {}


def test_an_op_the_quantiser_does_not_handle_is_named():
  with pytest.raises(ValueError, match=r"'mm' \(op 'dot_general'\).*jnp.matmul"):
    qat.check_supported(TwoLayers(), (1, 4, 4, 3))


def test_unlowered_ops_are_named():
  # A graph whose fake-quant composite the converter keeps (strict mode off).
  @jax.jit
  def fn(x):
    fq = jax.lax.composite(lambda x, **_: jnp.round(x * 10) / 10,
                            name="quant.fake_quant")
    return fq(x, scale=np.array([0.1], np.float32), dtype="i8", narrow_range=False)

  exported = jax.export.export(fn, platforms=["cpu"])(
      jax.ShapeDtypeStruct((1, 4), jnp.float32))
  flat = qat.convert_exported(exported, strict=False)  # Composites stay.
  with pytest.raises(ValueError, match="STABLEHLO_COMPOSITE"):
    qat.check_lowered(flat)


def test_config_seam_is_off_by_default():
  from vit_edge import recipes  # pylint: disable=g-import-not-at-top
  config = recipes.base_config("deit_tiny_patch16")
  assert not qat.enabled(config)
  model = models.create_model("deit_tiny_patch16", num_classes=5, embed_dim=32,
                              depth=1, num_heads=2, image_size=SIZE, patch_size=16)
  assert qat.adapt(model, config) is model


def test_a_family_the_converter_cannot_take_is_refused_before_training():
  from tests import tiny_config  # pylint: disable=g-import-not-at-top
  from vit_edge import train  # pylint: disable=g-import-not-at-top
  config = tiny_config.make("model=edgevit_xxs", **{"qat.enabled": True})
  model = train.build_model(config, 10)
  with pytest.raises(ValueError, match=r"QAT cannot export edgevit_xxs.*batch_matmul.*"
                                       r"post-training int8"):
    qat.adapt(model, config)
