"""Segmentation: heads, pyramid pooling, metrics and loss against numpy, the mask
data pipeline (alignment under augmentation, bad folders), one training run, export."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from vit_edge import models
from vit_edge import objectives
from vit_edge import train
from vit_edge.models import segmentation
from vit_edge.objectives import dense
from vit_edge.segmentation import data
from vit_edge.segmentation import metrics
from vit_edge.segmentation import recipes

sys.path.insert(0, os.path.dirname(__file__))

# Backbone sizes small enough to compile in seconds.
TINY_BACKBONES = {
    "edgevit_xxs": (("depths", (1, 1, 1, 1)), ("embed_dims", (8, 16, 24, 32)),
                    ("head_dim", 8)),
    "mobilevitv2_050": (("width_multiplier", 0.25),),
    "tformer_s": (("depths", (1, 1, 1, 1)), ("widths", (8, 16, 24, 32))),
}


@pytest.mark.parametrize("name", ["fpn_edgevit_xxs", "upernet_edgevit_xxs",
                                  "fpn_mobilevitv2_100", "upernet_tformer_s"])
@pytest.mark.parametrize("size", [96, 160])  # MobileViTv2 rounds 3x3 / 5x5 maps up.
def test_full_size_heads_give_logits_at_the_input_size(name, size):
  model = models.create_model(name, num_classes=14, aux_head=True)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  logits, aux = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  assert logits.shape == (2, size, size, 14)
  assert aux["aux_logits"].shape == (2, size, size, 14)
  assert aux["logits_stride4"].shape == (2, size // 4, size // 4, 14)


@pytest.mark.parametrize("head,backbone", [("fpn", "edgevit_xxs"),
                                           ("upernet", "mobilevitv2_050"),
                                           ("upernet", "tformer_s")])
def test_heads_take_non_square_inputs(head, backbone):
  model = models.create_model(f"{head}_{backbone}", num_classes=5, fpn_width=8,
                              head_width=8, backbone_overrides=TINY_BACKBONES[backbone])
  x = jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  logits, _ = jax.eval_shape(model.apply, variables, x)
  assert logits.shape == (1, 64, 96, 5)


def test_width_and_aux_head_change_the_parameter_count():
  def count(**kw):
    model = models.create_model("upernet_edgevit_xxs", num_classes=14, **kw)
    v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(v["params"]))
  assert count(fpn_width=32) < count() < count(fpn_width=128) < count(aux_head=True,
                                                                          fpn_width=128)


def _torch_adaptive_avg_pool_1d(values, bins):
  n = len(values)
  return np.array([values[(i * n) // bins:-(-((i + 1) * n) // bins)].mean()
                   for i in range(bins)])


def test_backbone_initialises_from_a_classification_run():
  from vit_edge import checkpointing  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((1, 64, 64, 3))
  tiny = {"width_multiplier": 0.25}
  classifier = models.create_model("mobilevitv2_050", num_classes=10, **tiny)
  pretrained = jax.jit(classifier.init)(jax.random.key(1), x)
  segmenter = models.create_model("fpn_mobilevitv2_050", num_classes=4,
                                  backbone_overrides=tiny)
  fresh = jax.jit(segmenter.init)(jax.random.key(2), x)
  for collection in ("params", "batch_stats"):
    merged = checkpointing.merge_for_fine_tuning(fresh[collection],
                                                 pretrained[collection], "run",
                                                 collection, grid=0)
    jax.tree_util.tree_map(  # Every backbone variable from the classifier...
        np.testing.assert_array_equal, merged["backbone"],
        {k: pretrained[collection][k] for k in merged["backbone"]})
    for key, value in merged.items():  # ...the decoder heads as initialised.
      if key != "backbone":
        jax.tree_util.tree_map(np.testing.assert_array_equal, value,
                               fresh[collection][key])
  wider = jax.tree_util.tree_map(  # Another width: zeros of its shapes will do.
      lambda v: np.zeros(v.shape, v.dtype),
      jax.eval_shape(models.create_model("mobilevitv2_050", num_classes=10).init,
                     jax.random.key(0), x))
  with pytest.raises(ValueError, match=r"init_from: params/backbone/\S+ has shape "
                                       r"\(\d+,?[\d, ]*\) in 'run' but"):
    checkpointing.merge_for_fine_tuning(fresh["params"], wider["params"], "run",
                                        "params", grid=0)


@pytest.mark.parametrize("size", [2, 5, 7])
@pytest.mark.parametrize("bins", segmentation.PPM_BINS)
def test_pyramid_pooling_matches_adaptive_average_pooling(size, bins):
  x = np.random.default_rng(0).normal(size=(1, size, size + 1, 2)).astype(np.float32)
  got = np.asarray(segmentation.adaptive_avg_pool(jnp.asarray(x), bins))
  rows = np.stack([_torch_adaptive_avg_pool_1d(x[0, :, :, c].T[j], bins)
                   for c in range(2) for j in range(size + 1)])
  rows = rows.reshape(2, size + 1, bins).transpose(2, 1, 0)  # [bins(h), w, c]
  want = np.stack([[_torch_adaptive_avg_pool_1d(rows[i, :, c], bins)
                    for c in range(2)] for i in range(bins)]).transpose(0, 2, 1)
  np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------
# Metrics and loss.


def _numpy_scores(labels, preds, num_classes, ignore=255):
  keep = labels != ignore
  labels, preds = labels[keep], preds[keep]
  iou, dice = [], []
  for c in range(num_classes):
    tp = np.sum((labels == c) & (preds == c))
    fp = np.sum((labels != c) & (preds == c))
    fn = np.sum((labels == c) & (preds != c))
    if tp + fp + fn:
      iou.append(tp / (tp + fp + fn))
      dice.append(2 * tp / (2 * tp + fp + fn))
  return np.mean(iou), np.mean(dice), np.mean(labels == preds)


def test_miou_and_dice_match_numpy_over_merged_batches():
  rng = np.random.default_rng(0)
  num_classes = 6
  labels = rng.integers(0, num_classes, (4, 16, 16))
  labels[rng.uniform(size=labels.shape) < 0.1] = 255
  labels[labels == 5] = 255  # Class 5 in neither truth nor predictions: no score;
  logits = rng.normal(size=(4, 16, 16, num_classes)).astype(np.float32)
  logits[..., 4:] -= 100  # class 4 never predicted: scored, IoU 0.
  task = metrics.SegmentationEval(num_classes, [f"c{i}" for i in range(num_classes)])
  state = {"params": {}, "batch_stats": {}}

  class Fixed:  # A "model" returning the given logits.
    @staticmethod
    def apply(variables, images, train):
      del variables, train
      return images, {}

  total = None
  for b in range(2):  # Two batches, the second padded with one fake example.
    batch = {"image": jnp.asarray(np.concatenate([logits[2 * b:2 * b + 2],
                                                  logits[:1]])),
             "label": jnp.asarray(np.concatenate([labels[2 * b:2 * b + 2],
                                                  labels[:1]])),
             "mask": jnp.asarray([1.0, 1.0, 0.0])}
    m = task.eval_step(state, batch, model=Fixed, use_ema=False)
    total = m if total is None else total.merge(m)
  result = total.compute()
  miou, mdice, accuracy = _numpy_scores(labels, logits.argmax(-1), num_classes)
  assert result["miou"] == pytest.approx(miou, abs=1e-6)
  assert result["mdice"] == pytest.approx(mdice, abs=1e-6)
  assert result["top1"] == pytest.approx(accuracy, abs=1e-6)
  assert result["iou/c4"] == 0.0 and np.isnan(result["iou/c5"])


def test_pixel_cross_entropy_ignores_pixels_and_ohem_keeps_the_hardest():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, (2, 8, 8))
  labels[0, :2] = 255
  logits = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)  # Stride 2: resized.
  targets = jax.nn.one_hot(labels, 3)
  loss, kept = dense.pixel_cross_entropy(jnp.asarray(logits), targets)
  up = np.asarray(segmentation.resize_bilinear(jnp.asarray(logits), 8, 8))
  log_probs = up - np.log(np.exp(up).sum(-1, keepdims=True))
  valid = labels != 255
  ce = -np.take_along_axis(log_probs, np.clip(labels, 0, 2)[..., None], -1)[..., 0]
  assert float(loss) == pytest.approx(ce[valid].mean(), rel=1e-5) and float(kept) == 1.0
  # OHEM with a threshold no pixel passes keeps exactly the min_kept hardest.
  loss, kept = dense.pixel_cross_entropy(jnp.asarray(logits), targets,
                                         ohem_thresh=1e-9, ohem_min_kept=10)
  assert float(loss) == pytest.approx(np.sort(ce[valid])[-10:].mean(), rel=1e-5)
  assert float(kept) == pytest.approx(10 / valid.sum())


def test_train_accuracy_leaves_out_ignored_pixels():
  labels = np.array([[0, 1, 2, 255], [255, 255, 1, 1]])
  predicted = np.array([[0, 2, 2, 0], [0, 0, 1, 0]])
  logits = jax.nn.one_hot(predicted, 3)
  targets = jax.nn.one_hot(labels, 3)  # 255 -> an all-zero row.
  # 5 labelled pixels, 3 of them right; the ignored ones (all predicted 0, as an
  # all-zero row's argmax) would have counted as hits.
  assert float(objectives.label_accuracy(logits, targets)) == pytest.approx(3 / 5)
  assert float(objectives.label_accuracy(logits[:1, :3], targets[:1, :3])) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------
# Data.

_PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)


def _blocky_pair(rng, size=48):
  mask = np.kron(rng.integers(0, 4, (size // 8, size // 8)), np.ones((8, 8), int))
  return _PALETTE[mask], mask.astype(np.uint8)


def test_joint_augmentation_keeps_image_and_mask_aligned():
  rng = np.random.default_rng(0)
  image, mask = _blocky_pair(rng)
  lookup = {tuple(c): i for i, c in enumerate(_PALETTE)}
  flips = 0
  for seed in range(6):  # Scale 48/32 keeps the 48 px image: crop and flip exact.
    out_image, out_mask = data.augment_pair(image, mask, 32, np.random.default_rng(seed),
                                            scale_range=(1.5, 1.5), color_jitter=0.0)
    decoded = np.vectorize(lambda *c: lookup[c])(*np.moveaxis(out_image, -1, 0))
    np.testing.assert_array_equal(decoded, out_mask)
    flips += not np.array_equal(out_mask, mask[:32, :32])
  assert flips > 0
  for seed in range(6):  # Rescaled: nearest masks agree with the (blurred) image.
    out_image, out_mask = data.augment_pair(image, mask, 32, np.random.default_rng(seed),
                                            color_jitter=0.5)
    assert set(np.unique(out_mask)) <= {0, 1, 2, 3, 255}
    valid = out_mask != 255
    distance = np.linalg.norm(out_image[..., None, :].astype(float) / 255
                              - _PALETTE[None, None].astype(float) / 255, axis=-1)
    nearest_colour = distance.argmin(-1)
    assert np.mean(nearest_colour[valid] == out_mask[valid]) > 0.85


def _write_folder(root, pairs, classes=("a", "b", "c", "d")):
  os.makedirs(root / "images", exist_ok=True)
  os.makedirs(root / "masks", exist_ok=True)
  for i, (image, mask) in enumerate(pairs):
    Image.fromarray(image).save(root / "images" / f"{i:03d}.jpg")
    if mask is not None:
      Image.fromarray(mask).save(root / "masks" / f"{i:03d}.png")
  (root / "classes.txt").write_text("\n".join(classes))


def _folder_config(root, **kw):
  config = recipes.segmentation_config("model=fpn_tformer_s")
  config.dataset = "seg:folder"
  config.data_dir = str(root)
  config.train_split, config.eval_split = "train[:6]", "train[6:]"
  config.image_size = 32
  for k, v in kw.items():
    config[k] = v
  return config


def test_mask_folder_bad_inputs_name_the_file_and_the_fix(tmp_path):
  rng = np.random.default_rng(0)
  good = [_blocky_pair(rng) for _ in range(2)]

  missing = tmp_path / "missing"
  _write_folder(missing, good + [(good[0][0], None)])
  with pytest.raises(data.MaskFolderError, match=r"002\.jpg.*Add a mask"):
    data.get_info(_folder_config(missing, eval_split="train"))

  beyond = tmp_path / "beyond"
  bad_mask = good[0][1].copy()
  bad_mask[0, 0] = 9
  _write_folder(beyond, [good[0], (good[1][0], bad_mask)])
  source = data.get_source(_folder_config(beyond))
  source.load("train", 0)
  with pytest.raises(data.MaskFolderError, match=r"001\.png.*\[9\].*4 classes"):
    source.load("train", 1)

  sizes = tmp_path / "sizes"
  _write_folder(sizes, [(good[0][0], good[0][1][:40])])
  with pytest.raises(data.MaskFolderError, match=r"000\.png is 48x40.*000\.jpg is 48x48"
                     r".*NEAREST"):
    data.get_source(_folder_config(sizes)).load("train", 0)


def test_train_batches_resume_exactly(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "seg"
  _write_folder(root, [_blocky_pair(rng) for _ in range(8)])
  config = _folder_config(root)
  args = dict(mean=(0.5,) * 3, std=(0.5,) * 3, local_batch_size=4)
  stream = data.create_train_iterator(config, **args)
  batches = [next(stream) for _ in range(3)]
  resumed = next(data.create_train_iterator(config, start_step=2, **args))
  np.testing.assert_array_equal(resumed["label"], batches[2]["label"])
  np.testing.assert_array_equal(resumed["image"], batches[2]["image"])
  assert batches[0]["label"].shape == (4, 32, 32)


def test_embedded_set_is_real_objects_with_background_and_labels():
  splits, names = data.embedded_arrays()
  images, masks = splits["test"]
  assert images.shape == (500, 64, 64, 3) and masks.shape == (500, 64, 64)
  assert names[0] == "background" and len(names) == 11
  assert set(np.unique(masks)) == set(range(11))
  again, _ = data.embedded_arrays.__wrapped__()
  np.testing.assert_array_equal(again["test"][1][:5], masks[:5])


# ---------------------------------------------------------------------------------
# Training and export.


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("seg")
  rng = np.random.default_rng(0)
  _write_folder(root / "data", [_blocky_pair(rng) for _ in range(8)])
  config = _folder_config(root / "data", batch_size=8, eval_batch_size=8,
                          num_train_steps=2, eval_every_steps=2)
  config.model_overrides.update({"backbone_overrides": TINY_BACKBONES["tformer_s"],
                                 "fpn_width": 8, "head_width": 8})
  config.checkpoint.async_save = False
  workdir = str(root / "run")
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_training_reports_miou_and_dice_per_class(trained_run):
  config, workdir, results = trained_run
  assert results["step"] == 2
  assert {"eval/miou", "eval/mdice", "eval/iou/a", "eval/dice/d"} <= set(results)
  assert 0.0 <= results["eval/miou"] <= results["eval/mdice"] <= 1.0
  again = train.evaluate(config, workdir)
  assert again["eval/miou"] == pytest.approx(results["eval/miou"], abs=1e-6)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_export_serves_logits_and_class_map_and_segment_draws_them(trained_run, quantize,
                                                                   tmp_path, capsys):
  from vit_edge import export  # pylint: disable=g-import-not-at-top
  from vit_edge.runtime import metadata as metadata_lib  # pylint: disable=g-import-not-at-top
  from vit_edge.runtime import segment  # pylint: disable=g-import-not-at-top
  _, workdir, _ = trained_run
  path = str(tmp_path / f"seg_{quantize}.tflite")
  report = export.export_from_workdir(workdir, path, quantize=quantize,
                                      num_calibration_samples=4, num_parity_samples=2)
  assert set(report.outputs) == {"dense_logits", "class_map"}
  # Pixel agreement of the argmax maps, checked against the class_map output.
  assert report.parity_top1_agreement >= (0.999 if quantize == "none" else 0.8)
  assert report.outputs["class_map"]["agreement"] >= (
      0.999 if quantize == "none" else 0.8)
  meta = metadata_lib.read_metadata(path)
  assert metadata_lib.output_kinds(meta) == {"dense_logits": "dense_logits",
                                             "class_map": "class_map"}
  if quantize == "int8":
    return
  # The command: a 40x24 image (not the model's size) and its overlay with legend.
  image_path = tmp_path / "scene.png"
  Image.fromarray(_blocky_pair(np.random.default_rng(3), 48)[0][:24, :40]).save(
      image_path)
  out = tmp_path / "overlay.png"
  shares = segment.main([path, str(image_path), "--out", str(out), "--threads", "1"])
  assert sum(shares.values()) == pytest.approx(1.0)
  assert set(shares) <= {"a", "b", "c", "d"}
  printed = capsys.readouterr().out
  assert str(out) in printed and "%" in printed
  with Image.open(out) as overlay:
    assert overlay.width == 220 and overlay.height == 24 + 18 * len(shares) + 4
  class_map = segment.Segmenter(path).segment(str(image_path))
  assert class_map.shape == (24, 40)
  assert segment.run([str(image_path), str(image_path), "--out", str(out)]) == 1
