"""Declared outputs (ServingSpec): features, dense maps and a two-input export, end to end."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_edge import export
from vit_edge import models
from vit_edge.export import serving
from vit_edge.runtime import classifier
from vit_edge.runtime import metadata as metadata_lib

TINY_TFORMER = {"depths": (1, 1, 1, 1), "widths": (8, 16, 24, 32)}


def _tiny_tformer(size=32):
  model = models.create_model("tformer_s", num_classes=10, **TINY_TFORMER)
  variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
  return model, variables


def test_features_export_end_to_end(tmp_path):
  out = str(tmp_path / "features.tflite")
  spec = serving.features(32, "pre_logits")
  report = export.export_from_registry(
      "tformer_s", out, image_size=32, num_classes=10, num_parity_samples=3,
      max_eval_examples=0, overrides=TINY_TFORMER, serving=spec)
  assert report.outputs["pre_logits"]["max_abs_diff"] <= (
      report.outputs["pre_logits"]["tolerance"])
  meta = metadata_lib.read_metadata(out)
  assert metadata_lib.output_kinds(meta) == {"pre_logits": "features"}
  assert meta["outputs"] == ["pre_logits"] and meta["input"] == "image"
  runner = classifier.TFLiteModel(out)
  assert runner.output_names == ["pre_logits"]
  model, variables = _tiny_tformer()
  images = np.random.RandomState(0).rand(2, 32, 32, 3).astype(np.float32)
  want = model.apply(variables, images, train=False)[1]["pre_logits"]
  np.testing.assert_allclose(runner.predict(images)["pre_logits"], want, atol=1e-4,
                             rtol=1e-3)
  with pytest.raises(metadata_lib.MetadataError, match="not a classification export"):
    classifier.Classifier(out)


def test_classification_metadata_is_unchanged_plus_serving(tmp_path):
  out = str(tmp_path / "cls.tflite")
  export.export_from_registry("tformer_s", out, image_size=32, num_classes=10,
                              num_parity_samples=2, max_eval_examples=0,
                              overrides=TINY_TFORMER)
  meta = metadata_lib.read_metadata(out)
  assert (meta["signature"], meta["input"], meta["outputs"]) == (
      "serving_default", "image", ["logits", "probs"])
  assert meta["input_shape"] == [1, 32, 32, 3] and meta["layout"] == "NHWC"
  assert meta["serving"]["outputs"] == [{"name": "logits", "kind": "logits"},
                                        {"name": "probs", "kind": "probs"}]


def test_dense_spec_upsamples_and_argmaxes():
  model, variables = _tiny_tformer()
  spec = serving.dense(32, source="stage1")
  fn = jax.jit(export.inference_function(model, variables, serving=spec))
  image = jnp.asarray(np.random.RandomState(0).rand(1, 32, 32, 3), jnp.float32)
  out = fn(image)
  assert out["dense_logits"].shape == (1, 32, 32, 8)
  assert out["class_map"].shape == (1, 32, 32) and out["class_map"].dtype == jnp.int32
  np.testing.assert_array_equal(out["class_map"], out["dense_logits"].argmax(-1))
  # Upsampling a constant map keeps it constant; the weights sum to one.
  up = serving.upsample_bilinear(jnp.ones((1, 4, 4, 2)), 16)
  np.testing.assert_allclose(up, np.ones((1, 16, 16, 2)), atol=1e-6)


class MaskedTokenPool(nn.Module):
  """N token vectors and a presence mask -> class logits (a two-input model)."""

  num_classes: int = 3

  @nn.compact
  def __call__(self, tokens, mask, train=False):
    del train
    h = nn.gelu(nn.Dense(16, name="embed")(tokens), approximate=False)
    weights = mask[..., None]
    pooled = (h * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    return nn.Dense(self.num_classes, name="head")(pooled), {"pooled": pooled}


def _token_spec(num_tokens, dim):
  def serve(model, variables, tokens, mask):
    logits, aux = model.apply(variables, tokens, mask)
    return {"logits": logits, "pooled": aux["pooled"]}

  return serving.ServingSpec(
      inputs=[serving.TensorSpec("tokens", (1, num_tokens, dim)),
              serving.TensorSpec("mask", (1, num_tokens))],
      outputs=[serving.OutputSpec("logits", "logits"),
               serving.OutputSpec("pooled", "features")],
      fn=serve)


def test_two_input_export_end_to_end(tmp_path):
  num_tokens, dim = 5, 8
  model = MaskedTokenPool()
  rng = np.random.RandomState(0)
  tokens = rng.randn(4, num_tokens, dim).astype(np.float32)
  mask = (rng.rand(4, num_tokens) > 0.4).astype(np.float32)
  variables = model.init(jax.random.key(0), tokens[:1], mask[:1])
  out = str(tmp_path / "tokens.tflite")
  report = export.export(model, variables, out, metadata={"model": "token_pool"},
                         parity_images={"tokens": tokens, "mask": mask},
                         serving=_token_spec(num_tokens, dim))
  assert set(report.outputs) == {"logits", "pooled"}
  assert report.num_parity_samples == 4 and report.parity_top1_agreement == 1.0
  meta = metadata_lib.read_metadata(out)
  assert [t["name"] for t in meta["serving"]["inputs"]] == ["tokens", "mask"]
  runner = classifier.TFLiteModel(out)
  assert runner.input_names == ["mask", "tokens"]
  got = runner.run({"tokens": tokens, "mask": mask})
  want, aux = model.apply(variables, tokens, mask)
  np.testing.assert_allclose(got["logits"], want, atol=1e-3, rtol=1e-3)  # tanh GELU
  np.testing.assert_allclose(got["pooled"], aux["pooled"], atol=1e-3, rtol=1e-3)
  with pytest.raises(ValueError, match="call run"):
    runner.predict(tokens)


def test_parity_guard_checks_every_declared_output(tmp_path, monkeypatch):
  """Only the second output is off: the guard must still refuse the export."""
  from vit_edge.export import validate  # pylint: disable=g-import-not-at-top
  real_outputs = validate.tflite_outputs

  def corrupted(tflite_model, inputs, num_threads=None):
    out = real_outputs(tflite_model, inputs, num_threads)
    return dict(out, pooled=out["pooled"] + 0.5)

  monkeypatch.setattr(validate, "tflite_outputs", corrupted)
  model = MaskedTokenPool()
  tokens, mask = np.ones((2, 5, 8), np.float32), np.ones((2, 5), np.float32)
  variables = model.init(jax.random.key(0), tokens[:1], mask[:1])
  with pytest.raises(export.ParityError, match="pooled_tflite"):
    export.export(model, variables, str(tmp_path / "m.tflite"),
                  metadata={"model": "token_pool"},
                  parity_images={"tokens": tokens, "mask": mask},
                  serving=_token_spec(5, 8))
  assert not list(tmp_path.iterdir())


def test_spec_errors_name_the_problem():
  with pytest.raises(ValueError, match="kind='heatmap'"):
    serving.OutputSpec("x", "heatmap")
  with pytest.raises(ValueError, match="static batch of 1"):
    serving.TensorSpec("x", (2, 3))
  with pytest.raises(ValueError, match="distinct names"):
    serving.ServingSpec([serving.TensorSpec("x", (1, 3))],
                        [serving.OutputSpec("x", "tensor")], fn=None)
