"""The light runtime: metadata, preprocessing parity, Classifier, CLI, latency, errors."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from vit_edge import export
from vit_edge import input_pipeline
from vit_edge.runtime import classifier
from vit_edge.runtime import classify
from vit_edge.runtime import latency
from vit_edge.runtime import metadata as metadata_lib
from vit_edge.runtime import transforms
from vit_edge.tools import digit_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TFORMER = {"depths": (1, 1, 1, 1), "widths": (8, 16, 24, 32)}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("model") / "tformer_tiny.tflite")
  export.export_from_registry("tformer_s", path, image_size=32, num_classes=10,
                              num_parity_samples=4, max_eval_examples=0,
                              overrides=TINY_TFORMER)
  return path


@pytest.fixture(scope="module")
def digit_images(tmp_path_factory):
  """A digits test image as PNG and JPEG (upscaled so JPEG keeps the shape)."""
  folder = tmp_path_factory.mktemp("images")
  png, jpg = str(folder / "digit.png"), str(folder / "digit.jpg")
  label = digit_image.write_digit(png, index=0, size=64)
  assert digit_image.write_digit(jpg, index=0, size=64) == label
  return {"png": png, "jpg": jpg, "label": label}


def test_digit_image_tool_writes_the_test_digit(tmp_path):
  images, labels = input_pipeline.digits_arrays()["test"]
  out = str(tmp_path / "d.png")
  assert digit_image.write_digit(out, index=7, size=16) == labels[7]
  pixels = np.asarray(Image.open(out))
  assert pixels.shape == (16, 16, 3)
  np.testing.assert_array_equal(pixels[::2, ::2, 0], images[7][..., 0])
  with pytest.raises(ValueError, match="out of range"):
    digit_image.write_digit(out, index=360)


def test_metadata_reader_agrees_with_flatbuffer_schema(model_path):
  from ai_edge_litert import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  data = open(model_path, "rb").read()
  model = schema.Model.GetRootAsModel(data, 0)
  expected = {}
  for i in range(model.MetadataLength()):
    entry = model.Metadata(i)
    expected[entry.Name().decode()] = model.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
  assert metadata_lib.read_all_metadata(data) == expected
  meta = metadata_lib.read_metadata(model_path)
  assert meta["model"] == "tformer_s" and meta["image_size"] == 32
  assert meta["label_names"] == [str(i) for i in range(10)]
  assert meta["signature"] == "serving_default" and meta["outputs"] == ["logits", "probs"]


def test_metadata_errors(tmp_path, model_path):
  not_tflite = tmp_path / "x.tflite"
  not_tflite.write_bytes(b"hello world, not a model")
  with pytest.raises(metadata_lib.MetadataError, match="Not a TFLite model"):
    metadata_lib.read_metadata(not_tflite)
  data = open(model_path, "rb").read()
  # A model whose metadata entry is renamed: a TFLite file without ours.
  renamed = data.replace(b"vit_edge\x00", b"vit_edgX\x00")
  with pytest.raises(metadata_lib.MetadataError, match="no 'vit_edge' metadata"):
    metadata_lib.parse_metadata(renamed)
  with pytest.raises(metadata_lib.MetadataError, match="Corrupt"):
    metadata_lib.parse_metadata(data[:len(data) // 50])


@pytest.mark.parametrize("crop_pct,interpolation,shape", [
    (0.875, "bilinear", (8, 8)),
    (1.0, "bilinear", (40, 30)),
    (0.9, "bicubic", (30, 50)),
])
def test_preprocessing_matches_training_eval_pipeline(crop_pct, interpolation, shape):
  rng = np.random.default_rng(0)
  raw = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
  raw = np.asarray(Image.fromarray(raw).filter(_smooth()))  # Natural-ish images.
  config = ml_collections.ConfigDict(dict(
      image_size=16, aug=dict(crop_pct=crop_pct, interpolation=interpolation)))
  expected = input_pipeline._eval_preprocess(config)(tf.constant(raw))  # pylint: disable=protected-access
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  expected = (np.asarray(expected, np.float32) / 255 - mean) / std
  got = transforms.preprocess(raw, 16, mean, std, crop_pct, interpolation)
  assert got.shape == (16, 16, 3) and got.dtype == np.float32
  # Within a couple of 8-bit levels (resampling kernels round differently).
  levels = np.abs(got - expected) * np.asarray(std) * 255
  assert levels.max() <= 2.0 and levels.mean() <= 0.5


def _smooth():
  from PIL import ImageFilter  # pylint: disable=g-import-not-at-top
  return ImageFilter.GaussianBlur(1.5)


def test_classifier_matches_exported_model(model_path, digit_images):
  clf = classifier.Classifier(model_path, num_threads=1)
  top = clf.classify(digit_images["png"], top_k=3)
  assert len(top) == 3 and [p.label for p in top] == [str(p.index) for p in top]
  assert top[0].probability >= top[1].probability >= top[2].probability
  x = clf.preprocess(digit_images["png"])
  probs = clf.predict(x[None])[0]
  assert probs.sum() == pytest.approx(1.0, abs=1e-5)
  logits = export.tflite_predict(open(model_path, "rb").read(), x[None])[0]
  np.testing.assert_allclose(probs, np.exp(logits) / np.exp(logits).sum(), atol=1e-5)
  assert top[0].index == int(np.argmax(probs))
  assert len(clf.classify(digit_images["jpg"], top_k=50)) == 10  # Capped at K.


def test_cli_prints_labels_and_probabilities_without_jax_or_tf(model_path,
                                                               digit_images):
  # Blocking the imports proves the runtime needs neither JAX nor TensorFlow.
  code = ("import sys\n"
          "for m in ('jax', 'jaxlib', 'tensorflow', 'flax'): sys.modules[m] = None\n"
          "from vit_edge.runtime import classify\n"
          "sys.exit(classify.main(sys.argv[1:]))\n")
  result = subprocess.run(
      [sys.executable, "-c", code, model_path, digit_images["png"],
       digit_images["jpg"], "--threads", "1", "--top_k", "2"],
      capture_output=True, text=True, cwd=REPO, check=False,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].startswith(digit_images["png"]) and "tformer_s" in lines[0]
  assert lines[1].strip().startswith("1. ") and lines[2].strip().startswith("2. ")
  assert len(lines) == 6
  probability = float(lines[1].split()[-1])
  assert 0.0 < probability <= 1.0


def test_cli_json_and_module_entry_point(model_path, digit_images):
  result = subprocess.run(
      [sys.executable, "-m", "vit_edge.runtime.classify", model_path,
       digit_images["png"], "--json", "--top_k", "3"],
      capture_output=True, text=True, cwd=REPO, check=False,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert result.returncode == 0, result.stderr
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["model"] == "tformer_s" and len(out["predictions"]) == 3


def test_cli_bad_inputs(model_path, tmp_path, capsys):
  unreadable = tmp_path / "notes.jpg"
  unreadable.write_text("this is not an image")
  assert classify.main([model_path, str(unreadable)]) == 2
  assert "Cannot read" in capsys.readouterr().err
  assert classify.main([model_path, str(tmp_path / "missing.png")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert classify.main([str(tmp_path / "missing.tflite"), str(unreadable)]) == 2
  assert "Model file" in capsys.readouterr().err
  assert classify.main([model_path, str(unreadable), "--top_k", "0"]) == 2


def test_wrong_input_size_is_a_clear_error(model_path):
  clf = classifier.Classifier(model_path)
  with pytest.raises(ValueError, match=r"takes images of shape \(32, 32, 3\).*got "
                                       r"\(31, 31, 3\)"):
    clf.predict(np.zeros((1, 31, 31, 3), np.float32))
  with pytest.raises(ValueError, match="num_threads=0"):
    classifier.TFLiteModel(model_path, num_threads=0)
  with pytest.raises(transforms.ImageReadError, match="Image array of shape"):
    clf.classify(np.zeros((4, 4, 2), np.uint8))


def test_latency_measure(model_path):
  stats = latency.measure(model_path, num_threads=1, runs=3, warmup=1)
  assert stats["median_ms"] > 0 and stats["p90_ms"] >= stats["min_ms"]
  assert stats["peak_mb"] >= 0 and stats["delegate_partitions"] >= 1
  assert stats["undelegated_ops"] == {}  # The tiny TFormer runs fully on XNNPACK.


def test_file_macs_counts_the_products_the_file_computes(tmp_path):
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
  weights = rng.standard_normal((144, 5)).astype(np.float32)

  @tf.function(input_signature=[tf.TensorSpec([1, 6, 6, 3], tf.float32)])
  def conv_then_dense(x):
    y = tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME"))
    return tf.reshape(y, [1, 144]) @ weights

  path = tmp_path / "tiny.tflite"
  path.write_bytes(tf.lite.TFLiteConverter.from_concrete_functions(
      [conv_then_dense.get_concrete_function()]).convert())
  # 6 x 6 x 4 outputs of 3 x 3 x 3 MACs each, then 5 outputs of 144 MACs.
  assert latency.file_macs(str(path)) == 6 * 6 * 4 * 27 + 5 * 144


def test_latency_paired_times_two_files_in_turn(model_path, tmp_path, capsys):
  stats = latency.paired(model_path, model_path, num_threads=1, pairs=4, warmup=1)
  assert stats["pairs"] == 4 and stats["a_min_ms"] > 0 and stats["b_min_ms"] > 0
  assert 0 < stats["ratio_q25"] <= stats["ratio_median"] <= stats["ratio_q75"]
  assert latency.main([model_path, "--against", model_path, "--runs", "3",
                       "--warmup", "1"]) == 0
  assert json.loads(capsys.readouterr().out.splitlines()[-1])["pairs"] == 3
  with pytest.raises(ValueError, match="pairs=0"):
    latency.paired(model_path, model_path, pairs=0)
  missing = str(tmp_path / "before.tflite")
  assert latency.main([model_path, "--against", missing]) == 2
  assert missing in capsys.readouterr().err


def test_profile_ops_by_isolation(model_path):
  rows = latency.profile_ops(model_path, num_threads=1, runs=2)
  ops = {r["op"] for r in rows}
  assert {"CONV_2D", "GELU"} <= ops
  conv = next(r for r in rows if r["op"] == "CONV_2D")
  assert conv["xnnpack"] and conv["macs"] > 0 and conv["gflops"] > 0
  assert all(r["ms"] > 0 for r in rows)


def test_cli_classifies_every_image_and_reports_each_bad_one(model_path, digit_images,
                                                             tmp_path, capsys):
  unreadable = tmp_path / "notes.jpg"
  unreadable.write_text("this is not an image")
  missing = tmp_path / "missing.png"
  status = classify.main([model_path, str(unreadable), digit_images["png"],
                          str(missing), digit_images["jpg"], "--top_k", "1"])
  assert status == 2
  out, err = capsys.readouterr()
  printed = [l for l in out.splitlines() if not l.startswith(" ")]
  assert [l.split(" ")[0] for l in printed] == [digit_images["png"], digit_images["jpg"]]
  errors = err.splitlines()
  assert len(errors) == 3 and all(l.startswith("error: ") for l in errors)
  assert errors[0].startswith(f"error: {unreadable}: ") and "Cannot read" in errors[0]
  assert errors[1].startswith(f"error: {missing}: ") and "does not exist" in errors[1]
  assert errors[2] == "error: 2 of 4 images could not be classified."
  assert classify.main([model_path, digit_images["png"], "--top_k", "0"]) == 2
  assert "--top_k=0 must be >= 1" in capsys.readouterr().err


def test_digit_image_tool_needs_no_tensorflow(tmp_path):
  out = str(tmp_path / "d.png")
  # Blocking the imports proves the tool needs neither TensorFlow nor JAX.
  code = ("import sys\n"
          "for m in ('jax', 'jaxlib', 'tensorflow', 'flax'): sys.modules[m] = None\n"
          "from vit_edge.tools import digit_image\n"
          f"print(digit_image.write_digit({out!r}, index=5, size=16))\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, cwd=REPO, check=False)
  assert result.returncode == 0, result.stderr
  images, labels = input_pipeline.digits_arrays()["test"]  # What training serves.
  assert int(result.stdout.strip()) == labels[5]
  np.testing.assert_array_equal(np.asarray(Image.open(out))[::2, ::2, 0],
                                images[5][..., 0])
  bad = subprocess.run([sys.executable, "-m", "vit_edge.tools.digit_image",
                        f"--out={out}", "--index=360"], capture_output=True,
                       text=True, cwd=REPO, check=False)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
      "error: --index=360 is out of range: the digits test split has 360 images "
      "(0..359)."]


def test_latency_cli_on_a_non_tflite_file_is_one_clear_line(tmp_path, capsys):
  bogus = tmp_path / "notes.tflite"
  bogus.write_text("this is not a flatbuffer")
  assert latency.main([str(bogus)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and str(bogus) in err
  assert err.startswith("error:") and "is not a TFLite model" in err
  assert latency.main([str(tmp_path / "missing.tflite")]) == 2
  assert "does not exist" in capsys.readouterr().err
