"""The augmentation policy table (--augment, POLICIES), and torchvision's policies.

  trivialaugment_wide  one op per image, uniformly, at a uniformly drawn
                       magnitude of 31 bins over the "wide" ranges
                       (TrivialAugment, Mueller & Hutter 2021)
  randaugment          num_ops ops per image, uniformly, all at one fixed
                       magnitude bin of 31 (RandAugment, Cubuk et al. 2020)
  autoaugment          one of the 25 sub-policies learned on ImageNet, each
                       op applied with its probability, at magnitude bins of 10
                       (AutoAugment, Cubuk et al. 2019)
  rand-...             timm's RandAugment, by its spec string (timm_augment.py)

The ops (augment_ops.py), their magnitude ranges and what each does at a
magnitude follow torchvision.transforms (autoaugment.py): the geometric ops
sample nearest (torchvision's default) or as the run's --interpolation, a
random sign for the signed ops. The policies run in the input pipeline, per
example, after the crop and flip and at the model's size; every choice is
stateless, drawn from the example's seed (seeds.py), so resuming replays
them exactly.

Each entry is a Policy built from the run's config.AugmentConfig, where every
policy's settings live: a new policy is a class here (or a module beside
this one) and an entry, and its settings are fields of AugmentConfig that
its check() reads.
"""

import numpy as np
import tensorflow as tf

from resnet_dist.data import augment_ops, seeds, timm_augment

BINS = 31            # magnitude bins of TrivialAugment-wide and RandAugment
AUTOAUGMENT_BINS = 10

# torchvision's ops (augment_ops.OPS names), in its order: a policy draws an
# index into this.
OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
       "brightness", "color", "contrast", "sharpness", "posterize", "solarize",
       "autocontrast", "equalize", "invert")
# TrivialAugment-wide and RandAugment draw from every op but invert.
DRAWN = OPS[:-1]

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


def apply_op(image, op, magnitude, interpolation="nearest"):
  """OPS[op] (an int32 tensor) at magnitude, on one uint8 [H, W, 3] image;
  the geometric ops sample by interpolation and fill black."""
  return augment_ops.switch_op(image, op, magnitude, augment_ops.functions(OPS, interpolation))


# --- The policies ---------------------------------------------------------------

def _draw(seed, shape, maxval):
  return tf.random.stateless_uniform(shape, seed=seed, maxval=maxval, dtype=tf.int32)


def _signed(table, signs, op, level, sign_seed):
  """The magnitude of op at bin `level`, negated with probability 1/2 when signed."""
  flip = signs[op] & (_draw(sign_seed, [], 2) == 0)
  value = table[op, level]
  return tf.where(flip, -value, value)


class Policy:
  """An --augment entry, built from the run's config.AugmentConfig (whose
  policy names it), then applied per example: policy(image, seed,
  interpolation) -> image, a uint8 [size, size, 3] image, seed the
  example's policy seed (int64 [2], seeds.POLICY), interpolation how the
  geometric ops sample (preprocess.INTERPOLATIONS).

  This one is --augment=none: the image as it is."""

  def __init__(self, options):
    self.check(options)
    self.name = options.policy

  @classmethod
  def check(cls, options):
    """ValueError, one line, if options hold a setting of this policy's that
    it cannot take. Every entry's check runs whichever policy is chosen, as
    the flags bound every setting whatever --augment says."""

  def describe(self):
    """How the console's recipe line names this policy."""
    return self.name

  def __call__(self, image, seed, interpolation):
    del seed, interpolation
    return image


class TrivialAugmentWide(Policy):

  def __call__(self, image, seed, interpolation):
    table, signs = magnitudes("trivialaugment_wide", BINS, image.shape[0])
    op = _draw(seed + seeds.TRIVIAL_OP, [], len(DRAWN))
    level = _draw(seed + seeds.TRIVIAL_LEVEL, [], BINS)
    return apply_op(image, op, _signed(table, signs, op, level, seed + seeds.TRIVIAL_SIGN),
                    interpolation)


class RandAugment(Policy):
  """options.randaugment_num_ops ops, each at bin options.randaugment_magnitude
  (their bounds: the fields' in config.AugmentConfig)."""

  def __init__(self, options):
    super().__init__(options)
    self.num_ops = options.randaugment_num_ops
    self.magnitude = options.randaugment_magnitude

  def describe(self):
    return f"{self.name} ({self.num_ops} ops at {self.magnitude})"

  def __call__(self, image, seed, interpolation):
    table, signs = magnitudes("randaugment", BINS, image.shape[0])
    for i in range(self.num_ops):
      op_seed = seed + seeds.RANDAUGMENT_STRIDE * i
      op = _draw(op_seed + seeds.RANDAUGMENT_OP, [], len(DRAWN))
      image = apply_op(image, op, _signed(table, signs, op, self.magnitude,
                                          op_seed + seeds.RANDAUGMENT_SIGN), interpolation)
    return image


class AutoAugment(Policy):
  """ImageNet's policy (IMAGENET_POLICY)."""

  def __call__(self, image, seed, interpolation):
    table, signs = magnitudes("autoaugment", AUTOAUGMENT_BINS, image.shape[0])
    ops = tf.constant([[OPS.index(op) for op, _, _ in sub] for sub in IMAGENET_POLICY])
    probabilities = tf.constant([[p for _, p, _ in sub] for sub in IMAGENET_POLICY])
    levels = tf.constant([[level or 0 for _, _, level in sub] for sub in IMAGENET_POLICY])
    chosen = _draw(seed + seeds.AUTOAUGMENT_SUB_POLICY, [], len(IMAGENET_POLICY))
    draws = tf.random.stateless_uniform([2], seed=seed + seeds.AUTOAUGMENT_APPLIES)
    for i in range(2):
      applies = draws[i] <= probabilities[chosen, i]
      op = tf.where(applies, ops[chosen, i], OPS.index("identity"))
      image = apply_op(image, op, _signed(table, signs, op, levels[chosen, i],
                                          seed + seeds.AUTOAUGMENT_SIGN + i), interpolation)
    return image


class TimmRandAugment(Policy):
  """timm's RandAugment, as its spec string (the policy's name) says."""

  def __init__(self, options):
    super().__init__(options)
    self.spec = timm_augment.parse(options.policy)

  def __call__(self, image, seed, interpolation):
    return timm_augment.rand_augment(image, seed, self.spec, interpolation)


# The policy table (--augment). Beside these, --augment takes timm's
# RandAugment by its spec string (TimmRandAugment).
POLICIES = {"none": Policy, "trivialaugment_wide": TrivialAugmentWide,
            "randaugment": RandAugment, "autoaugment": AutoAugment}


def policy(name):
  """The Policy class --augment names: a POLICIES entry, or TimmRandAugment
  for timm's spec once it parses; ValueError, one line, if it names none."""
  if timm_augment.is_spec(name):
    timm_augment.parse(name)  # its ValueError names what is wrong with the spec
    return TimmRandAugment
  if name not in POLICIES:
    raise ValueError(f"unknown --augment={name}; choose from {', '.join(POLICIES)}, or "
                     f"timm's RandAugment as its spec string (rand-m6-mstd0.5-inc1)")
  return POLICIES[name]


def check_settings(options):
  """ValueError, one line, if options (a config.AugmentConfig) hold a
  setting a policy refuses (Policy.check)."""
  for entry in POLICIES.values():
    entry.check(options)


def build(options):
  """The Policy options.policy names, built from options."""
  return policy(options.policy)(options)


def augment(image, options, seed, interpolation="nearest"):
  """image: uint8 [size, size, 3]; options: a config.AugmentConfig, whose
  policy names the policy; seed: int64 [2], the example's policy seed;
  interpolation: how the geometric ops sample (preprocess.INTERPOLATIONS)."""
  return build(options)(image, seed, interpolation)
