"""Per-example training losses from logits (--loss), summed into the step's
loss by tf.nn.compute_average_loss over the global batch."""

import tensorflow as tf


def cross_entropy(labels, logits, num_classes, label_smoothing=0.0):
  """Softmax cross-entropy, with label smoothing."""
  targets = tf.one_hot(labels, num_classes)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  return tf.nn.softmax_cross_entropy_with_logits(targets, tf.cast(logits, tf.float32))


def binary_cross_entropy(labels, logits, num_classes, label_smoothing=0.0):
  """One sigmoid per class against its target, averaged over the classes:
  timm's BinaryCrossEntropy, which "ResNet strikes back" trains with. Smoothing
  moves label_smoothing / num_classes onto every class, as timm does."""
  off = label_smoothing / num_classes
  targets = tf.one_hot(labels, num_classes, on_value=1.0 - label_smoothing + off,
                       off_value=off)
  return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
      targets, tf.cast(logits, tf.float32)), axis=-1)


LOSSES = {"softmax": cross_entropy, "bce": binary_cross_entropy}
