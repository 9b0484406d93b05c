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


def binary_cross_entropy(targets, logits, label_smoothing=0.0):
  """One sigmoid per class against its target, averaged over the classes:
  timm's BinaryCrossEntropy, which "ResNet strikes back" trains with."""
  return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
      smooth(targets, label_smoothing), tf.cast(logits, tf.float32)), axis=-1)


LOSSES = {"softmax": cross_entropy, "bce": binary_cross_entropy}
