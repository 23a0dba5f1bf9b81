"""RandAugment, random erasing and Mixup/CutMix: real behaviour on tiny images."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps
import pytest
import tensorflow as tf

from vit_edge import augment


def _test_image(size=20, seed=0):
  """A uint8 image that every op visibly changes.

  Values skew towards 60 and stop below 255, so AutoContrast and Equalize have work
  to do, yet some pixels lie above Solarize's threshold and some below 128.
  """
  rng = np.random.default_rng(seed)
  values = 60 + 190 * rng.random([size, size, 3]) ** 2
  return tf.constant(values.astype(np.uint8))


# ----------------------------------------------------------------------------------
# RandAugment.


def test_parse_randaugment_timm_strings():
  assert augment.parse_randaugment("rand-m9-mstd0.5") == augment.RandAugmentParams(
      num_layers=2, magnitude=9.0, magnitude_std=0.5, magnitude_max=10.0, prob=0.5,
      increasing=False)
  params = augment.parse_randaugment("rand-m7-n3-mstd101-mmax8-p0.8-inc1")
  assert (params.num_layers, params.magnitude, params.magnitude_max, params.prob,
          params.increasing) == (3, 7.0, 8.0, 0.8, True)
  assert math.isinf(params.magnitude_std)


@pytest.mark.parametrize("spec", ["auto-m9", "rand-x3", "rand-m9-mstd", "rand-w0"])
def test_parse_randaugment_rejects_bad_strings(spec):
  with pytest.raises(ValueError, match="RandAugment config"):
    augment.parse_randaugment(spec)


@pytest.mark.parametrize("increasing", [False, True])
@pytest.mark.parametrize("name", augment.RANDAUGMENT_OPS)
def test_every_op_changes_the_image(name, increasing):
  image = _test_image()
  out = augment.apply_op(image, name, 9.0, increasing=increasing)
  assert out.dtype == tf.uint8 and out.shape == image.shape
  assert np.any(out.numpy() != image.numpy())


# timm's PIL calls at magnitude 9 (non-increasing levels, positive sign).
_FACTOR_9 = 9 / 10 * 1.8 + 0.1
_FILL = dict(resample=Image.BILINEAR, fillcolor=(128, 128, 128))
_PIL_REFERENCE = {
    "AutoContrast": ImageOps.autocontrast,
    "Equalize": ImageOps.equalize,
    "Invert": ImageOps.invert,
    "Posterize": lambda im: ImageOps.posterize(im, 3),
    "Solarize": lambda im: ImageOps.solarize(im, 230),
    "SolarizeAdd": lambda im: im.point(
        [min(255, i + 99) if i < 128 else i for i in range(256)] * 3),
    "Color": lambda im: ImageEnhance.Color(im).enhance(_FACTOR_9),
    "Contrast": lambda im: ImageEnhance.Contrast(im).enhance(_FACTOR_9),
    "Brightness": lambda im: ImageEnhance.Brightness(im).enhance(_FACTOR_9),
    "Sharpness": lambda im: ImageEnhance.Sharpness(im).enhance(_FACTOR_9),
    "Rotate": lambda im: im.rotate(27, **_FILL),
    "ShearX": lambda im: im.transform(im.size, Image.AFFINE, (1, .27, 0, 0, 1, 0),
                                      **_FILL),
    "ShearY": lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, .27, 1, 0),
                                      **_FILL),
    "TranslateXRel": lambda im: im.transform(
        im.size, Image.AFFINE, (1, 0, .405 * im.size[0], 0, 1, 0), **_FILL),
    "TranslateYRel": lambda im: im.transform(
        im.size, Image.AFFINE, (1, 0, 0, 0, 1, .405 * im.size[1]), **_FILL),
}


@pytest.mark.parametrize("name", augment.RANDAUGMENT_OPS)
def test_ops_match_timm_pil_ops(name):
  image = _test_image()
  ours = augment.apply_op(image, name, 9.0).numpy().astype(int)
  theirs = np.asarray(_PIL_REFERENCE[name](Image.fromarray(image.numpy())), int)
  error = np.abs(ours - theirs)
  if name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
    # Same warp; only pixels that straddle the image border are filled differently.
    assert error.mean() < 2.0
  else:
    assert error.max() <= 1  # Rounding.


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateXRel",
                                  "TranslateYRel"])
def test_geometric_ops_are_identity_at_magnitude_zero(name):
  image = _test_image()
  np.testing.assert_array_equal(augment.apply_op(image, name, 0.0), image)


def test_translate_shifts_by_the_timm_fraction_and_fills_per_channel():
  image = _test_image(size=20)
  # Magnitude 10 moves 45% of the width: 9 pixels to the left.
  out = augment.apply_op(image, "TranslateXRel", 10.0, fill=(10, 20, 30)).numpy()
  np.testing.assert_array_equal(out[:, :11], image.numpy()[:, 9:])
  np.testing.assert_array_equal(out[:, 11:], np.broadcast_to([10, 20, 30], [20, 9, 3]))


def test_enhance_levels_follow_timm():
  image = _test_image()
  mean = lambda x: float(tf.reduce_mean(tf.cast(x, tf.float32)))
  # Non-increasing Brightness: magnitude 0 is factor 0.1 (dark), 10 is 1.9.
  assert mean(augment.apply_op(image, "Brightness", 0.0)) < 0.2 * mean(image)
  assert mean(augment.apply_op(image, "Brightness", 10.0)) > 1.5 * mean(image)
  # Increasing: magnitude 0 is the identity whatever the sign.
  np.testing.assert_array_equal(
      augment.apply_op(image, "Brightness", 0.0, increasing=True, negate=True), image)
  # Posterize at magnitude 10 keeps 4 bits; increasing keeps 0 bits (black).
  assert np.all(augment.apply_op(image, "Posterize", 10.0).numpy() % 16 == 0)
  assert np.all(augment.apply_op(image, "Posterize", 10.0, increasing=True) == 0)


def test_randaugment_is_deterministic_per_seed():
  image = _test_image()
  run = lambda seed: augment.randaugment(image, tf.constant(seed), "rand-m9-mstd0.5")
  np.testing.assert_array_equal(run([0, 1]), run([0, 1]))
  outputs = [run([0, s]).numpy() for s in range(8)]
  assert all(o.dtype == np.uint8 and o.shape == (20, 20, 3) for o in outputs)
  assert sum(np.any(o != image.numpy()) for o in outputs) >= 4
  assert len({o.tobytes() for o in outputs}) >= 4


def test_randaugment_with_zero_layers_is_identity():
  image = _test_image()
  np.testing.assert_array_equal(
      augment.randaugment(image, tf.constant([0, 1]), "rand-n0-m9"), image)


# ----------------------------------------------------------------------------------
# Random erasing.


def test_random_erasing_erases_one_box_of_the_right_size():
  size = 40
  for seed in range(5):
    out = augment.random_erasing(tf.zeros([size, size, 3]), tf.constant([1, seed]),
                                 probability=1.0).numpy()
    rows, cols = np.nonzero(np.any(out != 0, axis=-1))
    assert rows.size, "probability 1 must erase a box"
    box = out[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert np.all(box != 0), "the erased region must be one solid box"
    area = box.shape[0] * box.shape[1] / size**2
    # Rounding the sides to whole pixels moves the area a little off the range.
    assert 0.02 * 0.7 <= area <= (1 / 3) * 1.2
    assert 0.3 * 0.7 <= box.shape[0] / box.shape[1] <= (1 / 0.3) * 1.3
    assert abs(box.std() - 1.0) < 0.5, "noise is standard normal"


def test_random_erasing_probability_and_determinism():
  image = tf.random.stateless_normal([16, 16, 3], [0, 0])
  np.testing.assert_array_equal(
      augment.random_erasing(image, tf.constant([0, 1]), probability=0.0), image)
  a = augment.random_erasing(image, tf.constant([0, 1]), probability=0.5)
  b = augment.random_erasing(image, tf.constant([0, 1]), probability=0.5)
  np.testing.assert_array_equal(a, b)
  erased = [np.any(augment.random_erasing(image, tf.constant([2, s]),
                                          probability=0.5).numpy() != image.numpy())
            for s in range(20)]
  assert 3 <= sum(erased) <= 17
  with pytest.raises(ValueError, match="random_erasing"):
    augment.random_erasing(image, tf.constant([0, 1]), probability=1.5)


# ----------------------------------------------------------------------------------
# Mixup / CutMix.


# Eager on purpose: JAX caches each op's compilation across calls, whereas jitting
# every setting would recompile the Beta sampler (seconds) each time.
_mix = augment.mixup_cutmix


def _batch(batch=6, size=8, num_classes=10):
  images = jax.random.normal(jax.random.key(42), (batch, size, size, 3))
  # Distinct labels so that every example's reverse has another label.
  labels = jnp.arange(batch) % num_classes
  return images, labels


def test_no_mixing_gives_smoothed_one_hot():
  images, labels = _batch()
  for kwargs in (dict(), dict(mixup_alpha=0.8, mixup_prob=0.0)):
    out, targets = _mix(jax.random.key(0), images, labels, 10,
                        label_smoothing=0.1, **kwargs)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(targets[jnp.arange(6), labels], 0.91, rtol=1e-6)
    assert float(targets.min()) == pytest.approx(0.01)


def test_mixup_targets_match_the_image_lambda():
  images, labels = _batch()
  for key in range(4):
    out, targets = _mix(jax.random.key(key), images, labels, 10, mixup_alpha=0.8,
                        mixup_prob=1.0)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    lam = float(targets[0, labels[0]])
    assert 0.0 <= lam <= 1.0
    np.testing.assert_allclose(targets[jnp.arange(6), labels[::-1]], 1 - lam,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1],
                               rtol=1e-5, atol=1e-5)


def test_cutmix_box_area_matches_the_corrected_lambda():
  images, labels = _batch()
  boxes = 0
  for key in range(8):
    out, targets = _mix(jax.random.key(key), images, labels, 10, cutmix_alpha=1.0,
                        label_smoothing=0.1)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    pasted = np.all(np.asarray(out) == np.asarray(images[::-1]), axis=-1)[0]
    kept = np.all(np.asarray(out) == np.asarray(images), axis=-1)[0]
    assert np.all(pasted | kept), "every pixel comes from one of the two images"
    lam = 1.0 - pasted.mean()
    # With smoothing 0.1 over 10 classes: lam * 0.91 + (1 - lam) * 0.01.
    np.testing.assert_allclose(targets[0, labels[0]], lam * 0.9 + 0.01, atol=1e-5)
    if pasted.any():
      boxes += 1
      rows, cols = np.nonzero(pasted)
      assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
  assert boxes >= 4


@pytest.mark.parametrize("switch_prob,expect_cutmix", [(1.0, True), (0.0, False)])
def test_switch_prob_picks_cutmix_or_mixup(switch_prob, expect_cutmix):
  images, labels = _batch()
  out, _ = _mix(jax.random.key(3), images, labels, 10, mixup_alpha=0.8,
                cutmix_alpha=1.0, mixup_switch_prob=switch_prob)
  from_either = np.all((np.asarray(out) == np.asarray(images))
                       | (np.asarray(out) == np.asarray(images[::-1])))
  assert from_either == expect_cutmix


def test_mixup_cutmix_is_jittable_and_deterministic():
  images, labels = _batch()
  fn = jax.jit(functools.partial(augment.mixup_cutmix, num_classes=10,
                                 mixup_alpha=0.8, cutmix_alpha=1.0,
                                 label_smoothing=0.1))
  a = fn(jax.random.key(5), images, labels)
  b = fn(jax.random.key(5), images, labels)
  c = fn(jax.random.key(6), images, labels)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], c[1])
  assert a[0].dtype == images.dtype and a[1].shape == (6, 10)
