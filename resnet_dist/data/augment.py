"""Automatic augmentation policies on uint8 images (--augment), as torchvision's.

  trivialaugment_wide  one op per image, uniformly, at a uniformly drawn
                       magnitude of 31 bins over the "wide" ranges
                       (TrivialAugment, Mueller & Hutter 2021)
  randaugment          num_ops ops per image, uniformly, all at one fixed
                       magnitude bin of 31 (RandAugment, Cubuk et al. 2020)
  autoaugment          one of the 25 sub-policies learned on ImageNet, each
                       op applied with its probability, at magnitude bins of 10
                       (AutoAugment, Cubuk et al. 2019)

The ops, their magnitude ranges and what each does at a magnitude follow
torchvision.transforms (autoaugment.py and the tensor functional ops): the
geometric ops sample nearest (torchvision's default) or bilinear (the run's
--interpolation; bicubic samples bilinear here, the only other mode of the
transform op) with black fill, shears about the image's corner; blends
clamped to 0..255 and truncated, a random sign for the signed ops. They run
in the input pipeline, per example, after the crop and flip and at the
model's size; every choice is stateless, drawn from the example's seed, so
resuming replays them exactly.
"""

import functools
import math

import numpy as np
import tensorflow as tf

BINS = 31            # magnitude bins of TrivialAugment-wide and RandAugment
AUTOAUGMENT_BINS = 10

OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
       "brightness", "color", "contrast", "sharpness", "posterize", "solarize",
       "autocontrast", "equalize", "invert")
# TrivialAugment-wide and RandAugment draw from every op but invert.
DRAWN = OPS[:-1]
GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")

# ImageNet's AutoAugment policy (the paper's appendix, in torchvision's order):
# 25 sub-policies of two (op, probability, magnitude bin or None).
IMAGENET_POLICY = (
    (("posterize", 0.4, 8), ("rotate", 0.6, 9)),
    (("solarize", 0.6, 5), ("autocontrast", 0.6, None)),
    (("equalize", 0.8, None), ("equalize", 0.6, None)),
    (("posterize", 0.6, 7), ("posterize", 0.6, 6)),
    (("equalize", 0.4, None), ("solarize", 0.2, 4)),
    (("equalize", 0.4, None), ("rotate", 0.8, 8)),
    (("solarize", 0.6, 3), ("equalize", 0.6, None)),
    (("posterize", 0.8, 5), ("equalize", 1.0, None)),
    (("rotate", 0.2, 3), ("solarize", 0.6, 8)),
    (("equalize", 0.6, None), ("posterize", 0.4, 6)),
    (("rotate", 0.8, 8), ("color", 0.4, 0)),
    (("rotate", 0.4, 9), ("equalize", 0.6, None)),
    (("equalize", 0.0, None), ("equalize", 0.8, None)),
    (("invert", 0.6, None), ("equalize", 1.0, None)),
    (("color", 0.6, 4), ("contrast", 1.0, 8)),
    (("rotate", 0.8, 8), ("color", 1.0, 2)),
    (("color", 0.8, 8), ("solarize", 0.8, 7)),
    (("sharpness", 0.4, 7), ("invert", 0.6, None)),
    (("shear_x", 0.6, 5), ("equalize", 1.0, None)),
    (("color", 0.4, 0), ("equalize", 0.6, None)),
    (("equalize", 0.4, None), ("solarize", 0.2, 4)),
    (("solarize", 0.6, 5), ("autocontrast", 0.6, None)),
    (("invert", 0.6, None), ("equalize", 1.0, None)),
    (("color", 0.6, 4), ("contrast", 1.0, 8)),
    (("equalize", 0.8, None), ("equalize", 0.6, None)),
)


# --- Magnitudes ---------------------------------------------------------------

def magnitudes(policy, bins, size):
  """[len(OPS), bins] float32: each op's magnitude at each bin, and [len(OPS)]
  bool: whether it takes a random sign. size: the image side, in pixels."""
  wide = policy == "trivialaugment_wide"
  linear = {  # op: the magnitude at the last bin, from 0 at the first
      "shear_x": 0.99 if wide else 0.3, "shear_y": 0.99 if wide else 0.3,
      "translate_x": 32.0 if wide else 150.0 / 331.0 * size,
      "translate_y": 32.0 if wide else 150.0 / 331.0 * size,
      "rotate": 135.0 if wide else 30.0,
      **{op: 0.99 if wide else 0.9 for op in ("brightness", "color", "contrast", "sharpness")},
  }
  table = np.zeros([len(OPS), bins], np.float32)
  for op, top in linear.items():
    table[OPS.index(op)] = np.linspace(0.0, top, bins)
  # Bits kept: 8 down to 2 (wide) or 4, in equal steps, rounded half to even as torch does.
  table[OPS.index("posterize")] = 8 - np.round(np.arange(bins) / ((bins - 1) / (6 if wide else 4)))
  table[OPS.index("solarize")] = np.linspace(255.0, 0.0, bins)  # the threshold
  signed = np.array([op in linear for op in OPS])
  return tf.constant(table), tf.constant(signed)


# --- The ops: uint8 [H, W, 3] and a float32 magnitude -> uint8 [H, W, 3] ------

def affine(image, matrix, interpolation, fill=None):
  """Samples image at the input point matrix maps each output pixel (x, y) to
  (pixel centres at whole coordinates): x_in = a0 x + a1 y + a2, y_in = b0 x
  + b1 y + b2. Nearest, or bilinear (for bilinear and bicubic); outside the
  image black, or the colour fill (3 values)."""
  transform = tf.concat([tf.cast(tf.stack(matrix), tf.float32), tf.zeros([2])], 0)

  def sampled(pixels):
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=pixels[None], transforms=transform[None], output_shape=tf.shape(image)[:2],
        fill_value=0.0, interpolation="NEAREST" if interpolation == "nearest" else "BILINEAR",
        fill_mode="CONSTANT")[0]

  if fill is None:
    return sampled(image)
  # The op fills with one value for every channel: sampling image - fill with
  # zeros outside, then adding fill back, fills each channel with its own.
  fill = tf.constant(fill, tf.float32)
  out = sampled(tf.cast(image, tf.float32) - fill) + fill
  return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


# The shears are about the image's top-left corner, as torchvision's
# (center=[0, 0] there is the corner, half a pixel before the first centre)
# and PIL's: x_in + 1/2 = (x + 1/2) + m (y + 1/2).

def shear_x(image, m, interpolation="nearest", fill=None):
  return affine(image, [1.0, m, m / 2, 0.0, 1.0, 0.0], interpolation, fill)


def shear_y(image, m, interpolation="nearest", fill=None):
  return affine(image, [1.0, 0.0, 0.0, m, 1.0, m / 2], interpolation, fill)


def _pixels(m):
  """Whole pixels, towards zero, as torchvision's int(magnitude)."""
  return tf.sign(m) * tf.floor(tf.abs(m))


def translate_x(image, m, interpolation="nearest", fill=None):
  return affine(image, [1.0, 0.0, -_pixels(m), 0.0, 1.0, 0.0], interpolation, fill)


def translate_y(image, m, interpolation="nearest", fill=None):
  return affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, -_pixels(m)], interpolation, fill)


def rotate(image, degrees, interpolation="nearest", fill=None):
  """Counter-clockwise about the image's centre."""
  h, w = (tf.cast(d, tf.float32) for d in tf.unstack(tf.shape(image)[:2]))
  cx, cy = (w - 1) / 2, (h - 1) / 2
  c, s = tf.cos(degrees * math.pi / 180), tf.sin(degrees * math.pi / 180)
  return affine(image, [c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy],
                    interpolation, fill)


def blend(image, other, factor):
  """factor * image + (1 - factor) * other, clamped and truncated to uint8."""
  mixed = factor * tf.cast(image, tf.float32) + (1.0 - factor) * tf.cast(other, tf.float32)
  return tf.cast(tf.clip_by_value(mixed, 0.0, 255.0), tf.uint8)


def _grayscale(image):
  """ITU-R 601-2 luma, truncated to uint8 (torchvision's rgb_to_grayscale)."""
  weights = tf.constant([0.2989, 0.587, 0.114])
  return tf.cast(tf.reduce_sum(tf.cast(image, tf.float32) * weights, -1, keepdims=True),
                 tf.uint8)


def brightness(image, m):
  return blend(image, tf.zeros_like(image), 1.0 + m)


def color(image, m):
  return blend(image, _grayscale(image), 1.0 + m)


def contrast(image, m):
  return blend(image, tf.reduce_mean(tf.cast(_grayscale(image), tf.float32)), 1.0 + m)


def sharpness(image, m):
  """Blends with a smoothed image (3x3, centre weight 5 of 13); the border
  pixels keep their values."""
  kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1],
                                  "VALID")[0]
  smooth = tf.pad(tf.round(smooth), [[1, 1], [1, 1], [0, 0]])
  interior = tf.pad(tf.ones_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(interior > 0, smooth, tf.cast(image, tf.float32))
  return blend(image, degenerate, 1.0 + m)


def posterize(image, bits):
  """Keeps the `bits` high bits of every value."""
  shift = 8 - tf.cast(bits, tf.int32)
  mask = tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(255, shift), shift), tf.uint8)
  return tf.bitwise.bitwise_and(image, mask)


def solarize(image, threshold):
  return tf.where(tf.cast(image, tf.float32) >= threshold, 255 - image, image)


def autocontrast(image, _=None):
  """Stretches each channel to 0..255; a constant channel stays as it is."""
  pixels = tf.cast(image, tf.float32)
  low = tf.reduce_min(pixels, axis=[0, 1])
  high = tf.reduce_max(pixels, axis=[0, 1])
  scale = tf.where(high > low, 255.0 / tf.maximum(high - low, 1.0), 1.0)
  low = tf.where(high > low, low, 0.0)
  return tf.cast(tf.clip_by_value((pixels - low) * scale, 0.0, 255.0), tf.uint8)


def _equalize_channel(channel):
  """PIL's histogram equalisation of one uint8 channel."""
  histogram = tf.math.bincount(tf.cast(channel, tf.int32), minlength=256, maxlength=256)
  last = tf.gather(histogram, tf.reduce_max(tf.where(histogram > 0)))
  step = (tf.reduce_sum(histogram) - last) // 255

  def equalized():
    lut = (tf.cumsum(histogram) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    return tf.cast(tf.gather(lut, tf.cast(channel, tf.int32)), tf.uint8)

  return tf.cond(step > 0, equalized, lambda: channel)


def equalize(image, _=None):
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], -1)


def invert(image, _=None):
  return 255 - image


def identity(image, _=None):
  return image


def switch_op(image, op, magnitude, functions):
  """functions[op] (op an int32 tensor) of (image, magnitude), keeping the
  image's static shape."""
  out = tf.switch_case(op, [lambda f=f: f(image, magnitude) for f in functions])
  return tf.ensure_shape(out, image.shape)


def apply_op(image, op, magnitude, interpolation="nearest"):
  """OPS[op] (an int32 tensor) at magnitude, on one uint8 [H, W, 3] image;
  the geometric ops sample by interpolation."""
  functions = [functools.partial(globals()[name], interpolation=interpolation)
               if name in GEOMETRIC else globals()[name] for name in OPS]
  return switch_op(image, op, magnitude, functions)


# --- The policies ---------------------------------------------------------------

def _draw(seed, shape, maxval):
  return tf.random.stateless_uniform(shape, seed=seed, maxval=maxval, dtype=tf.int32)


def _signed(table, signs, op, level, sign_seed):
  """The magnitude of op at bin `level`, negated with probability 1/2 when signed."""
  flip = signs[op] & (_draw(sign_seed, [], 2) == 0)
  value = table[op, level]
  return tf.where(flip, -value, value)


def none(image, seed, options, interpolation):
  del seed, options, interpolation
  return image


def trivialaugment_wide(image, seed, options, interpolation):
  del options
  table, signs = magnitudes("trivialaugment_wide", BINS, image.shape[0])
  op = _draw(seed, [], len(DRAWN))
  return apply_op(image, op, _signed(table, signs, op, _draw(seed + 1, [], BINS), seed + 2),
                  interpolation)


def randaugment(image, seed, options, interpolation):
  """options.randaugment_num_ops ops, each at bin options.randaugment_magnitude."""
  table, signs = magnitudes("randaugment", BINS, image.shape[0])
  for i in range(options.randaugment_num_ops):
    op_seed = seed + 3 * i
    op = _draw(op_seed, [], len(DRAWN))
    image = apply_op(image, op, _signed(table, signs, op, options.randaugment_magnitude,
                                        op_seed + 1), interpolation)
  return image


def autoaugment(image, seed, options, interpolation):
  del options
  table, signs = magnitudes("autoaugment", AUTOAUGMENT_BINS, image.shape[0])
  ops = tf.constant([[OPS.index(op) for op, _, _ in sub] for sub in IMAGENET_POLICY])
  probabilities = tf.constant([[p for _, p, _ in sub] for sub in IMAGENET_POLICY])
  levels = tf.constant([[level or 0 for _, _, level in sub] for sub in IMAGENET_POLICY])
  chosen = _draw(seed, [], len(IMAGENET_POLICY))
  draws = tf.random.stateless_uniform([2], seed=seed + 1)
  for i in range(2):
    applies = draws[i] <= probabilities[chosen, i]
    op = tf.where(applies, ops[chosen, i], OPS.index("identity"))
    image = apply_op(image, op, _signed(table, signs, op, levels[chosen, i], seed + 2 + i),
                     interpolation)
  return image


# The policy table (--augment): name -> policy(image, seed, options,
# interpolation), where options is the run's config.AugmentConfig (a policy's
# parameters live there) and interpolation its --interpolation. Beside these,
# --augment takes timm's RandAugment by its spec string (timm_augment.py).
POLICIES = {"none": none, "trivialaugment_wide": trivialaugment_wide,
            "randaugment": randaugment, "autoaugment": autoaugment}


def policy(name):
  """The policy(image, seed, options, interpolation) --augment names: a
  POLICIES entry, or timm's RandAugment by its spec; ValueError, one line,
  if it names none."""
  # timm_augment builds on this module's ops, hence the import here.
  from resnet_dist.data import timm_augment  # pylint: disable=g-import-not-at-top
  if timm_augment.is_spec(name):
    spec = timm_augment.parse(name)
    return lambda image, seed, options, interpolation: timm_augment.rand_augment(
        image, seed, spec, interpolation)
  if name not in POLICIES:
    raise ValueError(f"unknown --augment={name}; choose from {', '.join(POLICIES)}, or "
                     f"timm's RandAugment as its spec string (rand-m6-mstd0.5-inc1)")
  return POLICIES[name]


def augment(image, options, seed, interpolation="nearest"):
  """image: uint8 [size, size, 3]; options: a config.AugmentConfig, whose
  policy names the policy (policy()); seed: int64 [2], this example's;
  interpolation: how the geometric ops sample (preprocess.INTERPOLATIONS)."""
  return policy(options.policy)(image, seed, options, interpolation)
