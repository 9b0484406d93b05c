"""Per-example training losses from logits (--loss), summed into the step's
loss by tf.nn.compute_average_loss over the global batch.

Both take target distributions [batch, classes]: one-hot labels, or the
mixed targets of mixup and CutMix. Label smoothing moves label_smoothing of
each target's mass evenly onto all classes, after mixing, as torchvision's
cross-entropy and timm's mixup targets do (the two orders agree: both are
linear).
"""

import tensorflow as tf


def smooth(targets, label_smoothing):
  if not label_smoothing:
    return targets
  return targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[-1]


def cross_entropy(targets, logits, label_smoothing=0.0):
  """Softmax cross-entropy."""
  return tf.nn.softmax_cross_entropy_with_logits(smooth(targets, label_smoothing),
                                                 tf.cast(logits, tf.float32))


def binary_cross_entropy(targets, logits, label_smoothing=0.0, target_threshold=0.0):
  """One sigmoid per class against its target, averaged over the classes:
  timm's BinaryCrossEntropy, which "ResNet strikes back" trains with. With
  target_threshold > 0 each smoothed (and mixed) target becomes 1 where it is
  above the threshold and 0 elsewhere, as timm's target_threshold does (RSB:
  0.2, so both images of a mix count as present unless one is under 20%)."""
  targets = smooth(targets, label_smoothing)
  if target_threshold:
    targets = tf.cast(targets > target_threshold, targets.dtype)
  return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
      targets, tf.cast(logits, tf.float32)), axis=-1)


LOSSES = {"softmax": cross_entropy, "bce": binary_cross_entropy}


def per_example_loss(optim_config):
  """loss(targets, logits) -> per-example losses, as an OptimConfig sets them."""
  if optim_config.loss == "bce":
    return lambda targets, logits: binary_cross_entropy(
        targets, logits, optim_config.label_smoothing, optim_config.bce_target_threshold)
  return lambda targets, logits: LOSSES[optim_config.loss](
      targets, logits, optim_config.label_smoothing)
