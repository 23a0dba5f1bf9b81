"""Training augmentations: RandAugment, random erasing (tf.data) and Mixup/CutMix (JAX).

RandAugment and random erasing run per example inside the tf.data map. They use only
stateless TensorFlow random ops keyed by an explicit `seed` (an int32/int64 tensor of
shape [2]), so an example's augmentation is a pure function of its seed and a resumed
run reproduces it exactly. Both follow timm (pytorch-image-models):

* `randaugment` applies `num_layers` ops drawn uniformly with replacement from timm's
  15-op set (`RANDAUGMENT_OPS`), each with probability 0.5, on a uint8 image. Its
  config string uses timm's syntax: ``"rand-m9-mstd0.5"`` is 2 layers at magnitude
  9 with Gaussian magnitude noise of std 0.5; ``-inc1`` picks the "increasing"
  variants DeiT uses.
* `random_erasing` replaces one random box of a normalised image by per-pixel
  normal noise (timm's ``RandomErasing(mode="pixel", max_count=1)``).

`mixup_cutmix` is a pure JAX function for the jitted train step: one lambda per batch,
each example mixed with its mirror in the batch, as timm's ``Mixup(mode="batch")``.

Example::

    params = parse_randaugment("rand-m9-mstd0.5-inc1")
    image = randaugment(image_uint8, tf.constant([0, 42]), params)
    images, targets = mixup_cutmix(
        jax.random.key(0), images, labels, 1000, mixup_alpha=0.8, cutmix_alpha=1.0,
        mixup_prob=1.0, mixup_switch_prob=0.5, label_smoothing=0.1)
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import tensorflow as tf

# timm's _RAND_TRANSFORMS, in its order. timm implements Cutout as random erasing.
RANDAUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
    "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
    "ShearY", "TranslateXRel", "TranslateYRel",
)

# timm's _LEVEL_DENOM: a magnitude of 10 is the strongest level of every op.
_LEVEL_DENOM = 10.0
# timm's constant fill for pixels that geometric ops move in from outside.
DEFAULT_FILL = 128

Fill = Union[float, Sequence[float]]


@dataclasses.dataclass(frozen=True)
class RandAugmentParams:
  """RandAugment settings, as parsed from a timm config string.

  Attributes:
    num_layers: ops applied in sequence per image (timm's ``n``).
    magnitude: mean op strength, 0..magnitude_max (timm's ``m``).
    magnitude_std: std of Gaussian noise on the magnitude per op; ``inf`` samples
      uniformly in [0, magnitude] (timm's ``mstd``, values above 100 mean ``inf``).
    magnitude_max: upper clip of the sampled magnitude (timm's ``mmax``).
    prob: probability of applying each drawn op (timm's ``p``).
    increasing: use the variants whose strength rises with the magnitude for
      Posterize, Solarize and the four enhance ops (timm's ``inc1``).
  """
  num_layers: int = 2
  magnitude: float = 9.0
  magnitude_std: float = 0.0
  magnitude_max: float = _LEVEL_DENOM
  prob: float = 0.5
  increasing: bool = False


def parse_randaugment(spec: str) -> RandAugmentParams:
  """Parses a timm RandAugment string such as ``"rand-m9-mstd0.5-inc1"``.

  Keys after ``rand``: ``m`` magnitude, ``n`` number of layers, ``mstd`` magnitude
  std, ``mmax`` magnitude maximum, ``p`` per-op probability, ``inc`` 0/1.

  Args:
    spec: the config string; it must start with ``rand``.

  Returns:
    The parsed `RandAugmentParams` (unset keys keep timm's defaults).

  Raises:
    ValueError: for a string that is not ``rand-...`` or has an unknown key.

  Example::

    >>> parse_randaugment("rand-m9-mstd0.5")
    RandAugmentParams(num_layers=2, magnitude=9.0, magnitude_std=0.5, \
magnitude_max=10.0, prob=0.5, increasing=False)
  """
  parts = spec.split("-")
  if parts[0] != "rand":
    raise ValueError(
        f"RandAugment config {spec!r} must start with 'rand', e.g. "
        "'rand-m9-mstd0.5'. Use '' to turn RandAugment off.")
  values = {}
  for part in parts[1:]:
    match = re.fullmatch(r"([a-z]+)(\d[\d.]*)", part)
    if match is None or match.group(1) not in ("m", "n", "mstd", "mmax", "p", "inc"):
      raise ValueError(
          f"RandAugment config {spec!r} has an unknown part {part!r}; expected "
          "key+number parts among m (magnitude), n (layers), mstd, mmax, p, inc, "
          "e.g. 'rand-m9-n2-mstd0.5-inc1'.")
    values[match.group(1)] = float(match.group(2))
  std = values.get("mstd", 0.0)
  return RandAugmentParams(
      num_layers=int(values.get("n", 2)),
      magnitude=values.get("m", 9.0),
      # timm: "use uniform sampling in 0 to magnitude if mstd is > 100".
      magnitude_std=math.inf if std > 100 else std,
      magnitude_max=values.get("mmax", _LEVEL_DENOM),
      prob=values.get("p", 0.5),
      increasing=bool(values.get("inc", 0)))


# ----------------------------------------------------------------------------------
# The ops. Each takes and returns a uint8 [H, W, 3] image, like timm's PIL ops.


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL's ImageEnhance: factor 0 gives `degenerate`, 1 the image, >1 extrapolates."""
  image = tf.cast(image, tf.float32)
  return _to_uint8(degenerate + factor * (image - degenerate))


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  return tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))


def _autocontrast(image: tf.Tensor) -> tf.Tensor:
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
  # PIL leaves a constant channel alone instead of dividing by zero.
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  offset = tf.where(hi > lo, -lo * scale, 0.0)
  return _to_uint8(x * scale + offset)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  """PIL's ImageOps.equalize on one uint8 channel."""
  values = tf.cast(channel, tf.int32)
  histogram = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
  nonzero = tf.boolean_mask(histogram, histogram > 0)
  step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
  safe_step = tf.maximum(step, 1)
  lut = (tf.cumsum(histogram) + safe_step // 2) // safe_step
  lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
  # A channel with a single value (step 0) has nothing to spread out.
  return tf.where(step > 0, tf.gather(lut, values), values)


def _equalize(image: tf.Tensor) -> tf.Tensor:
  channels = [_equalize_channel(image[..., c]) for c in range(3)]
  return tf.cast(tf.stack(channels, axis=-1), tf.uint8)


def _posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
  # Keep the `bits` most significant bits; float floor avoids a shift by 8 on uint8,
  # which TF leaves undefined, for bits == 0.
  step = tf.pow(2.0, tf.cast(8 - tf.clip_by_value(bits, 0, 8), tf.float32))
  return _to_uint8(tf.floor(tf.cast(image, tf.float32) / step) * step)


def _solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
  x = tf.cast(image, tf.float32)
  return _to_uint8(tf.where(x >= tf.cast(threshold, tf.float32), 255.0 - x, x))


def _solarize_add(image: tf.Tensor, addition: tf.Tensor) -> tf.Tensor:
  x = tf.cast(image, tf.float32)
  return _to_uint8(tf.where(x < 128.0, x + tf.cast(addition, tf.float32), x))


def _sharpness_degenerate(image: tf.Tensor) -> tf.Tensor:
  """PIL's ImageFilter.SMOOTH, which keeps the one-pixel border unfiltered."""
  x = tf.cast(image, tf.float32)
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.pad(tf.round(smooth), [[1, 1], [1, 1], [0, 0]])
  interior = tf.pad(tf.ones_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]])
  return tf.where(interior > 0, smooth, x)


def _affine(image: tf.Tensor, transform: Sequence[tf.Tensor], fill: Fill) -> tf.Tensor:
  """Bilinear warp; `transform` maps output (x, y) to input as PIL's AFFINE data."""
  a, b, c, d, e, f = [tf.cast(t, tf.float32) for t in transform]
  # PIL maps pixel centres (x + 0.5, y + 0.5); TF maps pixel indices. Without this
  # shift a shear would also move the image by a fraction of a pixel.
  c += 0.5 * (a + b) - 0.5
  f += 0.5 * (d + e) - 0.5
  x = tf.cast(image, tf.float32)
  # A ones channel warped alongside tells how much of each output pixel came from
  # outside the image, so the fill can be per channel (timm fills with the mean).
  x = tf.concat([x, tf.ones_like(x[..., :1])], axis=-1)
  matrix = tf.stack([a, b, c, d, e, f, 0.0, 0.0])
  warped = tf.raw_ops.ImageProjectiveTransformV3(
      images=x[None], transforms=matrix[None], output_shape=tf.shape(x)[:2],
      fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  fill = tf.broadcast_to(tf.constant(fill, tf.float32), [3])
  return _to_uint8(warped[..., :3] + (1.0 - warped[..., 3:]) * fill)


def _rotate(image: tf.Tensor, degrees: tf.Tensor, fill: Fill) -> tf.Tensor:
  shape = tf.cast(tf.shape(image), tf.float32)
  cy, cx = shape[0] / 2, shape[1] / 2  # PIL's centre, in pixel-centre coordinates.
  angle = degrees * math.pi / 180.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  return _affine(image, [cos, -sin, cx - cx * cos + cy * sin,
                         sin, cos, cy - cx * sin - cy * cos], fill)


def _levels(name: str, magnitude: tf.Tensor, negate: tf.Tensor,
            increasing: bool) -> tf.Tensor:
  """timm's `*_level_to_arg` functions: the op argument for a magnitude in 0..10."""
  level = tf.cast(magnitude, tf.float32) / _LEVEL_DENOM
  sign = tf.where(negate, -1.0, 1.0)
  if name == "Rotate":
    return sign * level * 30.0
  if name in ("ShearX", "ShearY"):
    return sign * level * 0.3
  if name in ("TranslateXRel", "TranslateYRel"):
    return sign * level * 0.45
  if name == "Posterize":
    bits = tf.cast(tf.floor(level * 4.0), tf.int32)
    return 4 - bits if increasing else bits
  if name == "Solarize":
    threshold = tf.cast(tf.floor(level * 256.0), tf.int32)
    return 256 - threshold if increasing else threshold
  if name == "SolarizeAdd":
    return tf.cast(tf.floor(level * 110.0), tf.int32)
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return 1.0 + sign * level * 0.9 if increasing else level * 1.8 + 0.1
  raise ValueError(f"The op {name!r} takes no level.")


def apply_op(image: tf.Tensor, name: str, magnitude: Union[float, tf.Tensor], *,
             negate: Union[bool, tf.Tensor] = False, increasing: bool = False,
             fill: Fill = DEFAULT_FILL) -> tf.Tensor:
  """Applies one RandAugment op at a given magnitude, deterministically.

  Args:
    image: uint8 [H, W, 3] image.
    name: one of `RANDAUGMENT_OPS`.
    magnitude: strength in 0..10 (timm's level); ignored by AutoContrast, Equalize
      and Invert.
    negate: flips the direction of the signed ops (Rotate, Shear*, Translate*, and
      the enhance ops when `increasing`), which RandAugment draws at random.
    increasing: use timm's "increasing" level mapping.
    fill: value (or per-channel values) for pixels moved in from outside.

  Returns:
    The uint8 [H, W, 3] result.

  Raises:
    ValueError: for a name not in `RANDAUGMENT_OPS`.

  Example::

    >>> image = tf.random.uniform([32, 32, 3], 0, 256, tf.int32)
    >>> out = apply_op(tf.cast(image, tf.uint8), "Rotate", 9.0)
    >>> out.shape, out.dtype
    (TensorShape([32, 32, 3]), tf.uint8)
  """
  if name not in RANDAUGMENT_OPS:
    raise ValueError(f"Unknown RandAugment op {name!r}; expected one of "
                     f"{list(RANDAUGMENT_OPS)}.")
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise ValueError(f"RandAugment ops take uint8 images, got {image.dtype}. Cast "
                     "with tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8).")
  if name == "AutoContrast":
    return _autocontrast(image)
  if name == "Equalize":
    return _equalize(image)
  if name == "Invert":
    return 255 - image
  arg = _levels(name, tf.convert_to_tensor(magnitude), tf.convert_to_tensor(negate),
                increasing)
  if name == "Rotate":
    return _rotate(image, arg, fill)
  if name == "Posterize":
    return _posterize(image, arg)
  if name == "Solarize":
    return _solarize(image, arg)
  if name == "SolarizeAdd":
    return _solarize_add(image, arg)
  if name == "Color":
    return _blend(tf.tile(_grayscale(image), [1, 1, 3]), image, arg)
  if name == "Contrast":
    # PIL blends with the image's mean grey level, rounded to an integer.
    return _blend(tf.floor(tf.reduce_mean(_grayscale(image)) + 0.5), image, arg)
  if name == "Brightness":
    return _blend(tf.zeros([], tf.float32), image, arg)
  if name == "Sharpness":
    return _blend(_sharpness_degenerate(image), image, arg)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  height = tf.cast(tf.shape(image)[0], tf.float32)
  transforms = {
      "ShearX": [1.0, arg, 0.0, 0.0, 1.0, 0.0],
      "ShearY": [1.0, 0.0, 0.0, arg, 1.0, 0.0],
      "TranslateXRel": [1.0, 0.0, arg * width, 0.0, 1.0, 0.0],
      "TranslateYRel": [1.0, 0.0, 0.0, 0.0, 1.0, arg * height],
  }
  return _affine(image, transforms[name], fill)


def randaugment(image: tf.Tensor, seed: tf.Tensor,
                params: Union[str, RandAugmentParams], *,
                fill: Fill = DEFAULT_FILL) -> tf.Tensor:
  """timm's RandAugment on one image, as a pure function of `seed`.

  Each of `params.num_layers` layers draws an op uniformly (with replacement), applies
  it with probability `params.prob` at a magnitude drawn around `params.magnitude`,
  and flips the direction of signed ops with probability 0.5.

  Args:
    image: uint8 [H, W, 3] image.
    seed: int32/int64 tensor of shape [2] for the stateless random ops.
    params: a `RandAugmentParams` or a timm string such as ``"rand-m9-mstd0.5"``.
    fill: value (or per-channel values, e.g. the normalisation mean times 255) for
      pixels that geometric ops move in from outside.

  Returns:
    The augmented uint8 [H, W, 3] image.

  Example::

    >>> image = tf.zeros([32, 32, 3], tf.uint8)
    >>> randaugment(image, tf.constant([0, 1]), "rand-m9-mstd0.5").shape
    TensorShape([32, 32, 3])
  """
  if isinstance(params, str):
    params = parse_randaugment(params)
  image = tf.convert_to_tensor(image)
  seed = tf.convert_to_tensor(seed)
  layer_seeds = tf.random.experimental.stateless_split(seed, params.num_layers)

  def layer(index, image):
    op_seed, apply_seed, magnitude_seed, sign_seed = tf.unstack(
        tf.random.experimental.stateless_split(layer_seeds[index], 4))
    op_index = tf.random.stateless_uniform([], op_seed, 0, len(RANDAUGMENT_OPS),
                                           dtype=tf.int32)
    apply = tf.random.stateless_uniform([], apply_seed) < params.prob
    magnitude = tf.constant(params.magnitude, tf.float32)
    if math.isinf(params.magnitude_std):
      magnitude = tf.random.stateless_uniform([], magnitude_seed) * magnitude
    elif params.magnitude_std > 0:
      magnitude += params.magnitude_std * tf.random.stateless_normal([], magnitude_seed)
    magnitude = tf.clip_by_value(magnitude, 0.0, params.magnitude_max)
    negate = tf.random.stateless_uniform([], sign_seed) < 0.5

    def branch(name):
      return lambda: apply_op(image, name, magnitude, negate=negate,
                              increasing=params.increasing, fill=fill)

    augmented = tf.switch_case(op_index, [branch(name) for name in RANDAUGMENT_OPS])
    return index + 1, tf.where(apply, augmented, image)

  # A loop rather than unrolled layers: the 15 op branches are traced only once.
  _, image = tf.while_loop(lambda index, _: index < params.num_layers, layer,
                           (tf.constant(0), image))
  return image


def random_erasing(image: tf.Tensor, seed: tf.Tensor, *, probability: float,
                   min_area: float = 0.02, max_area: float = 1 / 3,
                   min_aspect: float = 0.3, max_aspect: Optional[float] = None,
                   max_attempts: int = 10) -> tf.Tensor:
  """timm's RandomErasing (mode "pixel", one box) on one normalised image.

  With probability `probability`, tries up to `max_attempts` boxes of area
  ``U(min_area, max_area) * H * W`` and log-uniform aspect ratio in
  [min_aspect, max_aspect]; the first that fits is filled with standard normal noise,
  i.e. noise in the normalised space the model sees.

  Args:
    image: float [H, W, C] image, already normalised.
    seed: int32/int64 tensor of shape [2].
    probability: chance of erasing a box; 0 returns the image unchanged.
    min_area: smallest box area as a fraction of the image.
    max_area: largest box area as a fraction of the image.
    min_aspect: smallest height/width ratio.
    max_aspect: largest height/width ratio; defaults to 1 / min_aspect.
    max_attempts: boxes tried before giving up, as in timm.

  Returns:
    The image with at most one box replaced by noise, same shape and dtype.

  Example::

    >>> image = tf.zeros([32, 32, 3])
    >>> out = random_erasing(image, tf.constant([0, 3]), probability=1.0)
    >>> bool(tf.reduce_any(out != 0))
    True
  """
  if not 0.0 <= probability <= 1.0:
    raise ValueError(f"random_erasing probability {probability} is not in [0, 1]. "
                     "Set config.aug.random_erasing to e.g. 0.25, or 0 to turn it off.")
  image = tf.convert_to_tensor(image)
  max_aspect = max_aspect or 1.0 / min_aspect
  gate_seed, area_seed, aspect_seed, top_seed, left_seed, noise_seed = tf.unstack(
      tf.random.experimental.stateless_split(tf.convert_to_tensor(seed), 6))
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  area = tf.cast(height * width, tf.float32)
  target_area = area * tf.random.stateless_uniform([max_attempts], area_seed,
                                                   min_area, max_area)
  aspect = tf.exp(tf.random.stateless_uniform(
      [max_attempts], aspect_seed, math.log(min_aspect), math.log(max_aspect)))
  box_h = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  box_w = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  fits = (box_h < height) & (box_w < width)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  box_h, box_w = box_h[first], box_w[first]
  # Inclusive upper bounds, as Python's random.randint in timm.
  top = tf.random.stateless_uniform([], top_seed, 0, height - box_h + 1, tf.int32)
  left = tf.random.stateless_uniform([], left_seed, 0, width - box_w + 1, tf.int32)
  rows = tf.range(height)[:, None, None]
  cols = tf.range(width)[None, :, None]
  in_box = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
  erase = ((tf.random.stateless_uniform([], gate_seed) < probability)
           & tf.reduce_any(fits))
  noise = tf.random.stateless_normal(shape, noise_seed, dtype=image.dtype)
  return tf.where(in_box & erase, noise, image)


def mixup_cutmix(rng: jax.Array, images: jax.Array, labels: jax.Array,
                 num_classes: int, *, mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0, mixup_prob: float = 1.0,
                 mixup_switch_prob: float = 0.5,
                 label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """timm's batch-wise Mixup / CutMix with label smoothing, for the jitted step.

  With probability `mixup_prob` the batch is mixed with its reverse (example i with
  example B-1-i) using one lambda: by CutMix with probability `mixup_switch_prob`
  when both alphas are positive (always CutMix when only `cutmix_alpha` is), else by
  Mixup. CutMix's lambda is corrected to the pasted box's true area, as timm's
  ``correct_lam=True``. Targets are ``lam * smooth(y) + (1 - lam) * smooth(y_rev)``.

  Args:
    rng: a JAX PRNG key.
    images: [B, H, W, C] float images.
    labels: [B] integer class ids.
    num_classes: width of the targets.
    mixup_alpha: Beta(alpha, alpha) parameter of Mixup; 0 turns it off.
    cutmix_alpha: Beta(alpha, alpha) parameter of CutMix; 0 turns it off.
    mixup_prob: probability of mixing this batch at all.
    mixup_switch_prob: probability of CutMix over Mixup when both are on.
    label_smoothing: mass spread uniformly over all classes.

  Returns:
    ``(images, targets)``: mixed images (same shape and dtype) and float32
    [B, num_classes] soft targets that sum to 1. With both alphas 0 the images are
    returned unchanged with smoothed one-hot targets.

  Example::

    >>> images, targets = mixup_cutmix(
    ...     jax.random.key(0), jnp.zeros([4, 8, 8, 3]), jnp.arange(4), 10,
    ...     mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    >>> targets.shape
    (4, 10)
  """
  off = label_smoothing / num_classes
  on = 1.0 - label_smoothing + off
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (on - off) + off
  if (mixup_alpha <= 0 and cutmix_alpha <= 0) or mixup_prob <= 0:
    return images, targets

  k_apply, k_switch, k_mixup, k_cutmix, k_y, k_x = jax.random.split(rng, 6)
  flipped = images[::-1]
  do_mix = jax.random.uniform(k_apply) < mixup_prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < mixup_switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)

  lam_mixup = (jax.random.beta(k_mixup, mixup_alpha, mixup_alpha)
               if mixup_alpha > 0 else jnp.float32(1.0))
  mixed = lam_mixup.astype(images.dtype) * images + (
      1 - lam_mixup).astype(images.dtype) * flipped

  # timm's rand_bbox: a box of side sqrt(1 - lam) around a uniform centre, clipped to
  # the image; the clipping is why lambda is recomputed from the true area.
  height, width = images.shape[1], images.shape[2]
  lam_cutmix = (jax.random.beta(k_cutmix, cutmix_alpha, cutmix_alpha)
                if cutmix_alpha > 0 else jnp.float32(1.0))
  ratio = jnp.sqrt(1.0 - lam_cutmix)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(k_y, [], 0, height)
  cx = jax.random.randint(k_x, [], 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  in_box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  cut = jnp.where(in_box[None, :, :, None], flipped, images)
  lam_cutmix = 1.0 - ((y1 - y0) * (x1 - x0)) / (height * width)

  lam = jnp.where(do_mix, jnp.where(use_cutmix, lam_cutmix, lam_mixup), 1.0)
  images = jnp.where(do_mix, jnp.where(use_cutmix, cut, mixed), images)
  lam = lam.astype(jnp.float32)
  return images, lam * targets + (1.0 - lam) * targets[::-1]
