"""Image preprocessing: decoded or encoded image in, uint8 model-sized image out.

Images leave the input pipeline as uint8 and are normalised on the device
(normalize(), the first thing the replica step does): float32 batches are
4x the bytes of uint8 ones, and normalising them in tf.data costs the host,
usually the input's bottleneck, close to half its throughput
(docs/benchmarks.md). On an accelerator the normalisation is free, and the
transfer is 4x smaller.

Every random choice is stateless, seeded by (seed, position of the example in
its stream), so an example is augmented the same way whichever replica or
restart sees it.

Crops (Source.crop):
  inception      ImageNet training: a random crop of 8%..100% of the area with
                 aspect ratio 3/4..4/3 covering at least 10% of the image,
                 decoded fused with the JPEG (only the crop is decoded),
                 resized, flipped. Evaluation: the central 87.5% (or
                 crop_fraction) of the shorter side, resized; or, with
                 resize_first, resized so the crop is the output, then cropped.
  random_resized torchvision's RandomResizedCrop window instead (no coverage
                 rule, a fallback of the whole image cut to the ratio range),
                 otherwise as inception.
  pad_crop_flip  32x32 datasets (He et al. 2015): pad 4, random crop, flip.
  pad_crop       the same without the flip (digits: a mirrored 2 is no 2).
  none           resize only.
"""

import math

import tensorflow as tf

from resnet_dist.data import seeds

CROPS = ("inception", "random_resized", "pad_crop_flip", "pad_crop", "none")
# --interpolation: how every resize samples (and the augmentation policies'
# geometric ops, augment.py). random: each training crop bilinear or bicubic,
# even odds, as timm's default (RandomResizedCropAndInterpolation); every
# other resize bicubic, as timm evaluates its ResNets.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "random")
EVAL_CROP_FRACTION = 0.875
_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND\xaeB`\x82"


# What looks_decodable() accepts, per format read: (offset, magic) pairs in
# the first _HEAD bytes, and the end marker that a complete file ends with
# (a JPEG or PNG cut short has none).
_SIGNATURES = (
    (((0, b"\xff\xd8\xff"),), _JPEG_END), (((0, b"\x89PNG"),), _PNG_END),
    (((0, b"RIFF"), (8, b"WEBP")), b""), (((0, b"GIF8"),), b""), (((0, b"BM"),), b""),
    (((0, b"\xff\x0a"),), b""), (((0, b"\x00\x00\x00\x0cJXL \r\n\x87\n"),), b""))
_HEAD, _TAIL = 12, 8


def _signature_table():
  """(values, mask) [formats, _HEAD + _TAIL]: the bytes each format must have
  in an image's first _HEAD and last _TAIL bytes, and which bytes count."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  values = np.zeros([len(_SIGNATURES), _HEAD + _TAIL], np.uint8)
  mask = np.zeros(values.shape, bool)
  for row, (magics, end) in enumerate(_SIGNATURES):
    for offset, magic in magics + ((_HEAD + _TAIL - len(end), end),):
      values[row, offset:offset + len(magic)] = list(magic)
      mask[row, offset:offset + len(magic)] = True
  return tf.constant(values), tf.constant(mask)


def looks_decodable(encoded):
  """False for what the decoder would reject, found without decoding: an empty
  file, a format it does not read (HEIC, text), and the common corruption, a
  JPEG or PNG cut short (no end marker). Read: JPEG, PNG, GIF, BMP, WebP, JPEG XL.

  One image or a group of them (any shape): a handful of ops either way, the
  first and last bytes as numbers (zero-padded when an image is shorter),
  compared with every format's signature at once.
  """
  start = tf.maximum(tf.strings.length(encoded) - _TAIL, 0)
  tail = tf.strings.substr(encoded, start, tf.fill(tf.shape(start), _TAIL))
  ends = tf.concat([tf.io.decode_raw(encoded, tf.uint8, fixed_length=_HEAD),
                    tf.io.decode_raw(tail, tf.uint8, fixed_length=_TAIL)], -1)
  values, mask = _signature_table()
  return tf.reduce_any(tf.reduce_all((ends[..., None, :] == values) | ~mask, axis=-1), axis=-1)


def _decode(encoded):
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def _crop(image, window):
  """window = [y, x, height, width]."""
  return image[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]


def _decode_crop(image, encoded, choose_window):
  """The window choose_window(shape [height, width]) picks, of an image.

  A JPEG is decoded fused with the crop (only the window is decoded, its
  shape read from the header); other formats are decoded once, then cropped.
  """
  if not encoded:
    return _crop(image, choose_window(tf.shape(image)[:2]))

  def jpeg():
    shape = tf.io.extract_jpeg_shape(image, output_type=tf.int32)[:2]
    return tf.io.decode_and_crop_jpeg(image, choose_window(shape), channels=3)

  def other():
    decoded = _decode(image)
    return _crop(decoded, choose_window(tf.shape(decoded)[:2]))

  return tf.cond(tf.io.is_jpeg(image), jpeg, other)


def _centre_window(shape, fraction):
  """The central square of fraction x the shorter side; at least one pixel, so a
  one-pixel-wide image still yields an image."""
  side = tf.maximum(tf.cast(fraction * tf.cast(tf.reduce_min(shape), tf.float32), tf.int32), 1)
  return tf.stack([(shape[0] - side) // 2, (shape[1] - side) // 2, side, side])


def _random_window(shape, seed):
  """A random crop window; the central crop when 10 attempts find none."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.concat([shape, [3]], 0), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seed, min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  failed = tf.reduce_all(size[:2] == shape)  # what the op returns when it gives up
  return tf.where(failed, _centre_window(shape, EVAL_CROP_FRACTION), window)


def _random_resized_window(shape, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries=10):
  """torchvision's RandomResizedCrop window: up to `tries` draws of an area
  share in `scale` and a log-uniform aspect ratio in `ratio`, the sides
  rounded half to even as Python's round(); the first that fits, at a
  uniform position; else the whole image, cut to the nearer end of `ratio`,
  centred. All tries are drawn at once (stateless, from seed)."""
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  share, log_ratio, top, left = tf.unstack(tf.random.stateless_uniform([4, tries], seed))
  area = height * width * (scale[0] + (scale[1] - scale[0]) * share)
  aspect = tf.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * log_ratio)
  w, h = tf.round(tf.sqrt(area * aspect)), tf.round(tf.sqrt(area / aspect))
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32))
  h, w = h[first], w[first]
  window = tf.stack([tf.floor(top[first] * (height - h + 1)),
                     tf.floor(left[first] * (width - w + 1)), h, w])
  # The fallback: the image's own ratio, clamped into `ratio`.
  fallback_w = tf.minimum(width, tf.round(height * ratio[1]))
  fallback_h = tf.minimum(height, tf.round(width / ratio[0]))
  fallback = tf.stack([tf.floor((height - fallback_h) / 2), tf.floor((width - fallback_w) / 2),
                       fallback_h, fallback_w])
  return tf.cast(tf.where(tf.reduce_any(fits), window, fallback), tf.int32)


def _resized(image, size, interpolation="bilinear", antialias=False):
  """uint8 [H, W, C] of any size -> uint8 [size, size, 3], rounded (_resized_to)."""
  if image.shape[0] == size and image.shape[1] == size and image.shape[-1] == 3:
    return image
  return _resized_to(image, [size, size], interpolation, antialias)


def _resized_to(image, shape, interpolation="bilinear", antialias=False):
  """uint8 [H, W, C] -> uint8 [height, width, 3] (shape), rounded.

  antialias: shrink as PIL always does and torchvision by default, the filter
  widened by the scale so every input pixel counts (without it a bilinear
  shrink reads 2x2 pixels per output pixel, and aliases). TensorFlow's kernel
  for it costs about as much CPU as decoding the JPEG (docs/benchmarks.md),
  so it is the recipes' choice: on for the torchvision and timm ones, off
  for MLPerf's and Model Garden's, whose references resize without it.
  Bicubic is Keys' (a = -0.5), as PIL's.
  """
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  if interpolation == "nearest":
    return tf.image.resize(image, shape, method="nearest")
  image = tf.image.resize(image, shape, method=interpolation, antialias=antialias)
  if interpolation == "bilinear":  # a weighted mean: within 0..255
    return tf.cast(tf.round(image), tf.uint8)
  return tf.saturate_cast(tf.round(image), tf.uint8)  # bicubic overshoots at edges


def _fixed(interpolation):
  """What a resize other than a training crop's samples by."""
  return "bicubic" if interpolation == "random" else interpolation


def _crop_resized(image, size, interpolation, antialias, seed):
  """A training crop resized: under "random", bilinear or bicubic by a draw of its own."""
  if interpolation != "random":
    return _resized(image, size, interpolation, antialias)
  return tf.cond(tf.random.stateless_uniform([], seed=seed + seeds.RESIZE) < 0.5,
                 lambda: _resized(image, size, "bilinear", antialias),
                 lambda: _resized(image, size, "bicubic", antialias))


def _resized_then_centre(image, size, crop_fraction, interpolation, antialias):
  """torchvision's evaluation, Resize(round(size / crop_fraction)) then
  CenterCrop(size): the shorter side resized to that, the longer to
  int(that * longer / shorter), the central size x size, its offsets
  rounded half to even as Python's round()."""
  short = tf.constant(round(size / crop_fraction), tf.float64)
  height, width = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float64))
  new_height = tf.where(height <= width, short, tf.floor(short * height / width))
  new_width = tf.where(height <= width, tf.floor(short * width / height), short)
  image = _resized_to(image, tf.cast(tf.stack([new_height, new_width]), tf.int32),
                      interpolation, antialias)
  top = tf.cast(tf.round((new_height - size) / 2), tf.int32)
  left = tf.cast(tf.round((new_width - size) / 2), tf.int32)
  return image[top:top + size, left:left + size]


def _pad_crop(image, size, seed, flip):
  pad = max(size // 8, 1)  # 4 pixels at 32x32
  image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  image = tf.image.stateless_random_crop(image, [size, size, 3], seed=seed + seeds.CROP)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, seed=seed + seeds.FLIP)
  return image


def preprocess(image, crop, size, training, seed, encoded,
               crop_fraction=EVAL_CROP_FRACTION, interpolation="bilinear", antialias=False,
               resize_first=False):
  """One example -> uint8 [size, size, 3], cropped as `crop` (CROPS) says.

  image: uint8 [H, W, C], or encoded bytes (JPEG, PNG, ...) when encoded.
  seed: int64 [2], the example's, used only when training (its streams: seeds.py).
  crop_fraction: evaluation's central crop, of the shorter side (inception).
  resize_first: evaluation resizes the whole image so the crop is size (224
  of 232: torchvision's), then crops, as torchvision and timm do; else it
  crops the central crop_fraction, decoded fused with the JPEG, then resizes,
  as MLPerf and Model Garden do. The two differ in the pixels within a
  filter's reach of the crop's edge, and in where the crop falls by a
  fraction of a pixel.
  interpolation: an INTERPOLATIONS entry, for every resize; antialias:
  whether shrinking is antialiased (_resized_to).
  """
  if crop in ("inception", "random_resized") and training:
    sample = _random_window if crop == "inception" else _random_resized_window
    image = _decode_crop(image, encoded, lambda shape: sample(shape, seed + seeds.CROP))
    image = _crop_resized(image, size, interpolation, antialias, seed)
    # After resizing: an average crop has more pixels than the output.
    image = tf.image.stateless_random_flip_left_right(image, seed=seed + seeds.FLIP)
  elif crop in ("inception", "random_resized") and resize_first:
    image = _resized_then_centre(_decode(image) if encoded else image, size, crop_fraction,
                                 _fixed(interpolation), antialias)
  elif crop in ("inception", "random_resized"):
    image = _decode_crop(image, encoded, lambda shape: _centre_window(shape, crop_fraction))
    image = _resized(image, size, _fixed(interpolation), antialias)
  else:
    if encoded:
      image = _decode(image)
    image = _resized(image, size, _fixed(interpolation), antialias)
    if training and crop in ("pad_crop_flip", "pad_crop"):
      image = _pad_crop(image, size, seed, flip=crop == "pad_crop_flip")
  image.set_shape([size, size, 3])
  return image


def normalize(images, mean, std, dtype):
  """uint8 images -> (images - mean) / std in dtype: the replica step's first op."""
  scale = tf.constant([1.0 / s for s in std], tf.float32)
  shift = tf.constant([-m / s for m, s in zip(mean, std)], tf.float32)
  return tf.cast(tf.cast(images, tf.float32) * scale + shift, dtype)
