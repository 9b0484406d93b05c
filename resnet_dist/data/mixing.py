"""What the replica step does to a batch after normalising it, before the
forward pass: random erasing (--random_erasing), then mixup (--mixup_alpha)
or CutMix (--cutmix_alpha), as torchvision's RandomErasing, RandomMixup and
RandomCutmix.

They run on the accelerator, on the normalised batch each replica receives,
with static shapes: every random box is a mask, never a slice. Every draw is
stateless, from a seed the step derives from (--seed, step, micro-batch,
replica), so a resumed run erases and mixes exactly as the uninterrupted one;
each draw sits at its named offset from that seed (seeds.py).
"""

import math

import tensorflow as tf

from resnet_dist.data import seeds

ERASE_SCALE = (0.02, 0.33)   # of the image's area
ERASE_RATIO = (0.3, 3.3)     # height / width
ERASE_ATTEMPTS = 10          # boxes tried per image; none fits: the image stays whole


def _box_mask(height, width, top, left, box_height, box_width):
  """[..., height, width] bool: inside the boxes (top, left, box_height, box_width)."""
  rows = tf.range(height)
  cols = tf.range(width)
  inside_rows = (rows >= top[..., None]) & (rows < (top + box_height)[..., None])
  inside_cols = (cols >= left[..., None]) & (cols < (left + box_width)[..., None])
  return inside_rows[..., :, None] & inside_cols[..., None, :]


# What an erased box holds (after normalising): N(0, 1) noise per pixel, as
# timm's RandomErasing (mode "pixel"), or zeros, as torchvision's presets
# (value=0: the mean colour).
ERASING_FILLS = ("noise", "zero")


def random_erasing(images, seed, probability, fill="noise"):
  """Each image, with `probability`, gets one box replaced by `fill`:
  area 2%..33% of the image, aspect ratio 0.3..3.3 (log-uniform); the first of
  ERASE_ATTEMPTS draws that fits in the image."""
  batch, height, width, channels = images.shape
  erase = tf.random.stateless_uniform([batch], seed + seeds.ERASE_WHETHER) < probability
  area = height * width * tf.random.stateless_uniform(
      [batch, ERASE_ATTEMPTS], seed + seeds.ERASE_AREA, *ERASE_SCALE)
  aspect = tf.exp(tf.random.stateless_uniform(
      [batch, ERASE_ATTEMPTS], seed + seeds.ERASE_ASPECT, math.log(ERASE_RATIO[0]),
      math.log(ERASE_RATIO[1])))
  box_height = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  box_width = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (box_height < height) & (box_width < width)
  first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
  box_height = tf.gather(box_height, first, batch_dims=1)
  box_width = tf.gather(box_width, first, batch_dims=1)
  place = tf.random.stateless_uniform([batch, 2], seed + seeds.ERASE_PLACE)
  top = tf.cast(place[:, 0] * tf.cast(height - box_height + 1, tf.float32), tf.int32)
  left = tf.cast(place[:, 1] * tf.cast(width - box_width + 1, tf.float32), tf.int32)
  erased = (_box_mask(height, width, top, left, box_height, box_width)
            & (erase & tf.reduce_any(fits, axis=1))[:, None, None])
  if fill == "zero":
    return tf.where(erased[..., None], tf.zeros_like(images), images)
  noise = tf.random.stateless_normal([batch, height, width, channels],
                                     seed + seeds.ERASE_NOISE, dtype=images.dtype)
  return tf.where(erased[..., None], noise, images)


GAMMA_CANDIDATES = 16   # Marsaglia-Tsang proposals; each is accepted with p > 0.95


def _gamma(seed, alpha):
  """One draw of Gamma(alpha, 1) that XLA compiles (tf.random.stateless_gamma
  does not): Marsaglia and Tsang's method with a fixed number of proposals,
  the first accepted one taken (the last, in the 1e-20 case none is); for
  alpha < 1, a Gamma(alpha + 1) draw times U ** (1 / alpha)."""
  shape = alpha + 1.0 if alpha < 1 else alpha
  d = shape - 1.0 / 3.0
  c = 1.0 / math.sqrt(9.0 * d)
  x = tf.random.stateless_normal([GAMMA_CANDIDATES], seed + seeds.GAMMA_PROPOSALS)
  u = tf.random.stateless_uniform([GAMMA_CANDIDATES], seed + seeds.GAMMA_ACCEPT, minval=1e-30)
  v = (1.0 + c * x) ** 3
  safe_v = tf.maximum(v, 1e-30)
  accepted = (v > 0) & (tf.math.log(u) < 0.5 * x * x + d - d * safe_v + d * tf.math.log(safe_v))
  accepted = tf.concat([accepted[:-1], [True]], 0)
  draw = d * safe_v[tf.argmax(tf.cast(accepted, tf.int32))]
  if alpha < 1:
    draw *= tf.random.stateless_uniform([], seed + seeds.GAMMA_BOOST) ** (1.0 / alpha)
  return draw


def _beta(seed, alpha):
  """One draw of Beta(alpha, alpha), from two Gamma(alpha) draws."""
  first = _gamma(seed + seeds.BETA_FIRST, alpha)
  second = _gamma(seed + seeds.BETA_SECOND, alpha)
  total = first + second
  return tf.where(total > 0, first / tf.maximum(total, 1e-30), 0.5)


def _cutmix_box(height, width, seed, alpha):
  """torchvision's CutMix box: centre uniform over the image, half-sides
  0.5 * sqrt(1 - lambda) of each side, clipped at the edges. Returns the
  [height, width] bool mask of the box and lambda, the share of the image
  outside it (the weight of the image's own label)."""
  draw = tf.random.stateless_uniform([2], seed + seeds.CUTMIX_CENTRE)
  centre_y = tf.cast(draw[0] * height, tf.int32)
  centre_x = tf.cast(draw[1] * width, tf.int32)
  half = 0.5 * tf.sqrt(1.0 - _beta(seed + seeds.CUTMIX_LAMBDA, alpha))
  half_h = tf.cast(half * height, tf.int32)
  half_w = tf.cast(half * width, tf.int32)
  top, bottom = tf.maximum(centre_y - half_h, 0), tf.minimum(centre_y + half_h, height)
  left, right = tf.maximum(centre_x - half_w, 0), tf.minimum(centre_x + half_w, width)
  mask = _box_mask(height, width, top, left, bottom - top, right - left)
  lam = 1.0 - tf.cast((bottom - top) * (right - left), tf.float32) / (height * width)
  return mask, lam


def mix(images, targets, seed, mixup_alpha, cutmix_alpha):
  """Mixes each example with the one before it in the batch (the first with
  the last): mixup blends the whole images by lambda ~ Beta(alpha, alpha),
  CutMix pastes a box of the partner. With both alphas set, each batch gets
  one of the two, with probability 1/2 each.

  images: [batch, height, width, channels]; targets: [batch, classes].
  Returns the mixed images and targets (each row still sums to 1).
  """
  _, height, width, _ = images.shape
  if mixup_alpha and cutmix_alpha:
    use_cutmix = tf.random.stateless_uniform([], seed + seeds.MIX_WHICH) < 0.5
  else:
    use_cutmix = tf.constant(bool(cutmix_alpha))
  mixup_lam = _beta(seed + seeds.MIXUP, mixup_alpha) if mixup_alpha else tf.constant(1.0)
  if cutmix_alpha:
    box, cutmix_lam = _cutmix_box(height, width, seed + seeds.CUTMIX, cutmix_alpha)
    own = tf.where(use_cutmix, 1.0 - tf.cast(box, tf.float32), mixup_lam)
    lam = tf.where(use_cutmix, cutmix_lam, mixup_lam)
  else:
    own, lam = mixup_lam, mixup_lam
  own = tf.cast(tf.reshape(own, [1, -1, width, 1] if cutmix_alpha else [1, 1, 1, 1]),
                images.dtype)
  images = own * images + (1 - own) * tf.roll(images, 1, axis=0)
  targets = lam * targets + (1.0 - lam) * tf.roll(targets, 1, axis=0)
  return images, targets
