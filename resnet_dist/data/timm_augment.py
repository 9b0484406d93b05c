"""timm's RandAugment, named by timm's spec string (--augment=rand-m6-mstd0.5-inc1),
as timm's data/auto_augment.py applies it to PIL images; the "ResNet strikes
back" recipes train with it.

The spec is "rand" and dash-separated sections, in any order, as timm parses it:
  m<int>     the magnitude, of 10 (default 10)
  n<int>     ops drawn per image, with replacement (default 2)
  mstd<num>  Gaussian noise of this std added to the magnitude each time an op
             applies (default 0); above 100, the magnitude is uniform in 0..m
  mmax<int>  the magnitude's upper clip (default 10); the lower is 0
  inc<int>   the "increasing" op set, where every op grows stronger with the
             magnitude. As in timm, any inc section selects it, inc0 included
             (timm tests the section's text, which is never empty)
  p<num>     each drawn op's probability of applying (default 0.5)

Against torchvision's RandAugment (augment.RandAugment) this policy leaves an
op out with probability 1 - p, has Invert and SolarizeAdd and no Identity,
scales magnitudes over 0..10 with timm's formulas (posterize keeps 4 down to 0
bits, translations are fractions of the image, up to 0.45), fills what the
geometric ops uncover with ImageNet's mean colour, and blends colour and
contrast towards PIL's rounded grayscale.

Where ours differs from timm's: timm picks bilinear or bicubic for each
geometric op (under its default --train-interpolation=random); ours samples
bilinear (nearest under --interpolation=nearest): TensorFlow's transform op
has no bicubic. PIL repeats an edge pixel where a bilinear sample falls
within a pixel of the border and ours blends the fill in, and our geometric
ops round where PIL truncates: a pixel on the border, or one level.
"""

import dataclasses
import math
import re

import tensorflow as tf

from resnet_dist.data import augment_ops, seeds

PREFIX = "rand"
LEVELS = 10.0  # timm's magnitude scale: an op's strength is magnitude / LEVELS of its range
# timm fills with the model's mean colour, ImageNet's for its ResNets: round(255 * mean).
FILL = (124.0, 116.0, 104.0)

# Both op sets, in timm's order, as augment_ops.OPS names them (timm's Color,
# Contrast and TranslateXRel/YRel are PIL's arithmetic: the pil_ and _rel
# entries); the increasing set differs in posterize, solarize and the four
# blends. An op's index here is what a draw picks; len(OPS) leaves it out.
OPS = ("autocontrast", "equalize", "invert", "rotate", "posterize", "solarize",
       "solarize_add", "pil_color", "pil_contrast", "brightness", "sharpness", "shear_x",
       "shear_y", "translate_x_rel", "translate_y_rel")
_BLENDS = ("pil_color", "pil_contrast", "brightness", "sharpness")


@dataclasses.dataclass(frozen=True)
class Spec:
  magnitude: int = 10
  num_ops: int = 2
  magnitude_std: float = 0.0   # math.inf: uniform in 0..magnitude
  magnitude_max: int = 10
  increasing: bool = False
  probability: float = 0.5


def is_spec(policy):
  return policy == PREFIX or policy.startswith(PREFIX + "-")


def parse(policy):
  """The Spec a timm RandAugment string names; ValueError, one line, if it is not one."""
  fields = {}
  for section in policy[len(PREFIX):].split("-"):
    key, value, _ = (re.split(r"(\d.*)", section) + ["", ""])[:3]
    if not value:  # timm skips a section without digits
      continue
    try:
      if key == "m":
        fields["magnitude"] = int(value)
      elif key == "n":
        fields["num_ops"] = int(value)
      elif key == "mstd":
        fields["magnitude_std"] = math.inf if float(value) > 100 else float(value)
      elif key == "mmax":
        fields["magnitude_max"] = int(value)
      elif key == "inc":
        fields["increasing"] = True
      elif key == "p":
        fields["probability"] = float(value)
      else:
        raise ValueError(f"unknown section {section!r}")
    except ValueError as e:
      raise ValueError(f"--augment={policy}: {e}; timm's RandAugment takes sections m<int>, "
                       f"n<int>, mstd<num>, mmax<int>, inc<int>, p<num>") from None
  spec = Spec(**fields)
  if spec.num_ops < 1 or not 0 <= spec.probability <= 1 or spec.magnitude_std < 0:
    raise ValueError(f"--augment={policy}: n must be >= 1, p a probability, mstd >= 0")
  return spec


# --- What each op does at a magnitude (timm's level-to-argument functions) ----

def arguments(spec, magnitude, negate):
  """[len(OPS)] float32: each op's argument at magnitude (a float32 scalar
  already clipped to 0..mmax), negated where the op is signed and negate is true.

  The geometric ops take degrees, shear factors and fractions of the image;
  posterize the bits kept; solarize its threshold; solarize_add the amount
  added below 128; the blends their factor minus 1, as augment_ops' blends take it."""
  level = magnitude / LEVELS
  sign = tf.where(negate, -1.0, 1.0)
  if spec.increasing:
    bits = 4.0 - tf.floor(level * 4)
    threshold = 256.0 - tf.floor(level * 256)
    factor = tf.maximum(0.1, 1.0 + sign * level * 0.9)
  else:
    bits = tf.floor(level * 4)
    threshold = tf.floor(level * 256)
    factor = level * 1.8 + 0.1
  values = {"autocontrast": 0.0, "equalize": 0.0, "invert": 0.0,
            "rotate": sign * level * 30.0, "posterize": tf.clip_by_value(bits, 0.0, 8.0),
            "solarize": threshold, "solarize_add": tf.floor(level * 110),
            **{op: factor - 1.0 for op in _BLENDS},
            "shear_x": sign * level * 0.3, "shear_y": sign * level * 0.3,
            "translate_x_rel": sign * level * 0.45, "translate_y_rel": sign * level * 0.45}
  return tf.stack([tf.cast(values[op], tf.float32) for op in OPS])


# --- The ops (augment_ops.OPS) --------------------------------------------------

def apply_op(image, op, argument, interpolation="nearest"):
  """OPS[op] at its argument (see arguments); op == len(OPS): unchanged. The
  geometric ops sample by interpolation and fill with FILL."""
  ops = augment_ops.functions(OPS + ("identity",), interpolation, FILL)
  return augment_ops.switch_op(image, op, argument, ops)


# --- The policy ---------------------------------------------------------------------

def _magnitude(spec, seed):
  """This application's magnitude: the spec's, with its noise, clipped to 0..mmax."""
  magnitude = tf.constant(float(spec.magnitude))
  if spec.magnitude_std == math.inf:
    magnitude = tf.random.stateless_uniform([], seed=seed, maxval=magnitude)
  elif spec.magnitude_std > 0:
    magnitude += spec.magnitude_std * tf.random.stateless_normal([], seed=seed)
  return tf.clip_by_value(magnitude, 0.0, float(spec.magnitude_max))


def rand_augment(image, seed, spec, interpolation):
  """spec.num_ops ops drawn uniformly with replacement, each applied with
  spec.probability at its own noisy magnitude and random sign."""
  for i in range(spec.num_ops):
    op_seed = seed + seeds.TIMM_STRIDE * i
    op = tf.random.stateless_uniform([], seed=op_seed + seeds.TIMM_OP, maxval=len(OPS),
                                     dtype=tf.int32)
    draws = tf.random.stateless_uniform([2], seed=op_seed + seeds.TIMM_APPLIES)
    magnitude = _magnitude(spec, op_seed + seeds.TIMM_MAGNITUDE)
    argument = arguments(spec, magnitude, draws[1] < 0.5)[op]
    # timm leaves the op out when its draw exceeds p.
    op = tf.where(draws[0] < spec.probability, op, len(OPS))
    image = apply_op(image, op, argument, interpolation)
  return image
