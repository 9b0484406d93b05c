"""The image ops both augmentation policy families apply, in one table (OPS).

Each op takes a uint8 [H, W, 3] image and a float32 magnitude (whose meaning
is the op's: degrees, a shear factor, pixels, a blend factor minus 1, bits,
a threshold) and returns a uint8 [H, W, 3] image. The geometric ops
(GEOMETRIC) also take how they sample and what they fill: functions() binds
those once per policy, so a policy switches over ops of (image, magnitude).

torchvision's ops follow torchvision.transforms (its tensor functional ops):
nearest (its default) or bilinear sampling, black fill, shears about the
image's corner; blends clamped to 0..255 and truncated. timm's RandAugment
applies some through PIL, which computes them otherwise; those are entries
of their own here (pil_color, pil_contrast, translate_x_rel,
translate_y_rel, solarize_add), named apart so that a policy names exactly
the arithmetic it applies.

Bicubic samples bilinear here: the transform op has no other mode.
"""

import functools
import math

import tensorflow as tf


# --- Geometry: output pixel (x, y) samples the input where a matrix maps it --

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


def translate_x_rel(image, fraction, interpolation="nearest", fill=None):
  """PIL's affine (1, 0, f w, 0, 1, 0), as timm's TranslateXRel: the input
  pixel f w to the right, unrounded."""
  shift = fraction * tf.cast(tf.shape(image)[1], tf.float32)
  return affine(image, [1.0, 0.0, shift, 0.0, 1.0, 0.0], interpolation, fill)


def translate_y_rel(image, fraction, interpolation="nearest", fill=None):
  shift = fraction * tf.cast(tf.shape(image)[0], tf.float32)
  return affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, shift], interpolation, fill)


def rotate(image, degrees, interpolation="nearest", fill=None):
  """Counter-clockwise about the image's centre."""
  h, w = (tf.cast(d, tf.float32) for d in tf.unstack(tf.shape(image)[:2]))
  cx, cy = (w - 1) / 2, (h - 1) / 2
  c, s = tf.cos(degrees * math.pi / 180), tf.sin(degrees * math.pi / 180)
  return affine(image, [c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy],
                interpolation, fill)


# --- Blends: towards a degenerate image, by 1 + m ------------------------------

def blend(image, other, factor):
  """factor * image + (1 - factor) * other, clamped and truncated to uint8."""
  mixed = factor * tf.cast(image, tf.float32) + (1.0 - factor) * tf.cast(other, tf.float32)
  return tf.cast(tf.clip_by_value(mixed, 0.0, 255.0), tf.uint8)


def _grayscale(image):
  """ITU-R 601-2 luma, truncated to uint8 (torchvision's rgb_to_grayscale)."""
  weights = tf.constant([0.2989, 0.587, 0.114])
  return tf.cast(tf.reduce_sum(tf.cast(image, tf.float32) * weights, -1, keepdims=True),
                 tf.uint8)


def pil_grayscale(image):
  """PIL's convert("L"): ITU-R 601-2 luma in 16-bit fixed point, rounded."""
  rgb = tf.cast(image, tf.int32)
  luma = tf.bitwise.right_shift(
      rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000, 16)
  return tf.cast(luma[..., None], tf.uint8)


def brightness(image, m):
  return blend(image, tf.zeros_like(image), 1.0 + m)


def color(image, m):
  return blend(image, _grayscale(image), 1.0 + m)


def pil_color(image, m):
  """PIL's ImageEnhance.Color: a blend with PIL's grayscale image."""
  return blend(image, pil_grayscale(image), 1.0 + m)


def contrast(image, m):
  return blend(image, tf.reduce_mean(tf.cast(_grayscale(image), tf.float32)), 1.0 + m)


def pil_contrast(image, m):
  """PIL's ImageEnhance.Contrast: a blend with PIL's grayscale mean, rounded."""
  mean = tf.floor(tf.reduce_mean(tf.cast(pil_grayscale(image), tf.float32)) + 0.5)
  return blend(image, mean, 1.0 + m)


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


# --- Per value --------------------------------------------------------------------

def posterize(image, bits):
  """Keeps the `bits` high bits of every value."""
  shift = 8 - tf.cast(bits, tf.int32)
  mask = tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(255, shift), shift), tf.uint8)
  return tf.bitwise.bitwise_and(image, mask)


def solarize(image, threshold):
  return tf.where(tf.cast(image, tf.float32) >= threshold, 255 - image, image)


def solarize_add(image, add):
  """Adds `add` to every value below 128, up to 255 (timm's SolarizeAdd)."""
  added = tf.minimum(tf.cast(image, tf.float32) + add, 255.0)
  return tf.where(image < 128, tf.cast(added, tf.uint8), image)


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


# --- The table ------------------------------------------------------------------

# name -> op(image, magnitude), the geometric ones (image, magnitude,
# interpolation, fill). A policy names its ops by these keys.
OPS = {op.__name__: op for op in (
    identity, shear_x, shear_y, translate_x, translate_y, translate_x_rel, translate_y_rel,
    rotate, brightness, color, pil_color, contrast, pil_contrast, sharpness, posterize,
    solarize, solarize_add, autocontrast, equalize, invert)}
GEOMETRIC = frozenset(("shear_x", "shear_y", "translate_x", "translate_y", "translate_x_rel",
                       "translate_y_rel", "rotate"))


def functions(names, interpolation="nearest", fill=None):
  """The ops names lists, each as op(image, magnitude): the geometric ones
  sampling by interpolation and filling with fill (None: black)."""
  return [functools.partial(OPS[name], interpolation=interpolation, fill=fill)
          if name in GEOMETRIC else OPS[name] for name in names]


def switch_op(image, op, magnitude, ops):
  """ops[op] (op an int32 tensor) of (image, magnitude), keeping the image's
  static shape."""
  out = tf.switch_case(op, [lambda f=f: f(image, magnitude) for f in ops])
  return tf.ensure_shape(out, image.shape)
