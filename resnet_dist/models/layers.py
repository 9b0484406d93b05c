"""Building layers shared by every ResNet: conv with torchvision padding,
BatchNorm, and stochastic depth (drop_path)."""

import contextlib
import threading

import keras
import tensorflow as tf

def he_normal_fan_out():
  """He et al. 2015 / torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu").

  A new instance per layer: a Keras 3 initializer without a seed fixes one
  when it is constructed and reuses it, so one shared instance would give
  every conv of the same shape identical weights, and a module-level one would
  differ between processes whatever keras.utils.set_random_seed says.
  """
  return keras.initializers.VarianceScaling(
      scale=2.0, mode="fan_out", distribution="untruncated_normal")


def conv(filters, kernel_size, stride=1, name=None, dtype=None):
  """A bias-free conv whose padding is symmetric, as in torchvision.

  TensorFlow's 'same' pads (0, 1) at stride 2 on even inputs; torchvision pads
  (k//2, k//2). Explicit zero padding followed by a 'valid' conv gives the
  torchvision result, so weights from that family carry over unchanged.
  """
  layers = []
  if stride > 1 and kernel_size > 1:
    layers.append(keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad", dtype=dtype))
    padding = "valid"
  else:
    padding = "same"
  layers.append(keras.layers.Conv2D(
      filters, kernel_size, strides=stride, padding=padding, use_bias=False,
      kernel_initializer=he_normal_fan_out(), name=name, dtype=dtype))
  return layers


@keras.saving.register_keras_serializable(package="resnet_dist")
class BatchNorm(keras.layers.Layer):
  """BatchNormalization over the last axis, torchvision's conventions.

  Unsynchronized, training and inference run the fused kernel
  (`FusedBatchNormV3`): Keras 3's own BatchNormalization composes separate ops
  and is about 3x slower on CPU. Synchronized, the moments
  are summed over all replicas with one all-reduce of [sum, sum of squares,
  count]; with one replica this reduces to the local moments, so one device and N
  replicas compute the same normalisation for the same global batch.

  The moving variance is updated with the unbiased batch variance, as the fused
  kernel and torchvision do: new = momentum * old + (1 - momentum) * batch.

  Under tf.distribute each replica updates its own copy of the moving
  statistics (ON_READ), so a training step costs no collective for them; the
  copies are identical with synchronized moments. Read across replicas (a
  checkpoint, a read outside the step) they give their mean, which is what
  averaging every replica's update would have given, since the update is
  linear. sync_moving_statistics() makes the copies equal before evaluations
  and saves.
  """

  def __init__(self, momentum=0.9, epsilon=1e-5, synchronized=False,
               zero_init=False, **kwargs):
    super().__init__(**kwargs)
    self.momentum = momentum
    self.epsilon = epsilon
    self.synchronized = synchronized
    self.zero_init = zero_init

  def build(self, input_shape):
    channels = input_shape[-1]
    self.gamma = self.add_weight(
        name="gamma", shape=(channels,), autocast=False,
        initializer="zeros" if self.zero_init else "ones")
    self.beta = self.add_weight(
        name="beta", shape=(channels,), initializer="zeros", autocast=False)
    self.moving_mean = self._moving_statistic("moving_mean", channels, "zeros")
    self.moving_variance = self._moving_statistic("moving_variance", channels, "ones")

  def _moving_statistic(self, name, channels, initializer):
    """A per-replica float32 statistic: add_weight() without its ON_WRITE
    default, which would all-reduce every update of it in every step."""
    with keras.name_scope(self.name, caller=self):
      variable = keras.Variable(
          initializer=keras.initializers.get(initializer), shape=(channels,),
          dtype="float32", trainable=False, autocast=False, name=name,
          aggregation="mean", synchronization="on_read")
    self._track_variable(variable)
    return variable

  def call(self, inputs, training=False):
    gamma = tf.convert_to_tensor(self.gamma)
    beta = tf.convert_to_tensor(self.beta)
    if not training:
      return tf.compat.v1.nn.fused_batch_norm(
          inputs, gamma, beta, mean=tf.convert_to_tensor(self.moving_mean),
          variance=tf.convert_to_tensor(self.moving_variance),
          epsilon=self.epsilon, is_training=False)[0]
    if self.synchronized:
      outputs, mean, variance = self._synchronized_moments_and_normalize(inputs, gamma, beta)
    else:
      outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
          inputs, gamma, beta, epsilon=self.epsilon, is_training=True)[:3]
    decay = 1.0 - self.momentum
    self.moving_mean.assign(self.moving_mean - decay * (self.moving_mean - mean))
    self.moving_variance.assign(
        self.moving_variance - decay * (self.moving_variance - variance))
    return outputs

  def _synchronized_moments_and_normalize(self, inputs, gamma, beta):
    x = tf.cast(inputs, tf.float32)
    axes = list(range(len(x.shape) - 1))
    local_count = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
    stats = tf.concat([tf.reduce_sum(x, axes), tf.reduce_sum(tf.square(x), axes),
                       tf.reshape(local_count, [1])], axis=0)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
      stats = context.all_reduce(tf.distribute.ReduceOp.SUM, stats)
    channels = x.shape[-1]
    total, total_sq, count = stats[:channels], stats[channels:2 * channels], stats[-1]
    mean = total / count
    variance = tf.maximum(total_sq / count - tf.square(mean), 0.0)
    outputs = (x - mean) * (tf.math.rsqrt(variance + self.epsilon) * gamma) + beta
    unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
    return tf.cast(outputs, inputs.dtype), mean, unbiased

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "momentum": self.momentum,
            "epsilon": self.epsilon, "synchronized": self.synchronized,
            "zero_init": self.zero_init}


# --- Stochastic depth -----------------------------------------------------------------
# The training step sets a stateless seed of its own (its step, micro-batch and
# replica) around the forward pass; each block folds in its index. A resumed
# run therefore drops the same blocks of the same examples. The seed is kept
# per thread: a multi-replica strategy traces each replica in a thread of its own.

_seeds = threading.local()


@contextlib.contextmanager
def drop_path_seed(seed):
  """Within: drop_path draws from seed (int64 [2]); outside, unseeded."""
  previous = getattr(_seeds, "seed", None)
  _seeds.seed = seed
  try:
    yield
  finally:
    _seeds.seed = previous


def drop_path(x, rate, index):
  """Zeroes each example's x with probability rate, scaling the kept by
  1 / (1 - rate), as timm's DropPath; index: the block's, to fold into the seed."""
  shape = [tf.shape(x)[0]] + [1] * (len(x.shape) - 1)
  seed = getattr(_seeds, "seed", None)
  if seed is None:
    draws = tf.random.uniform(shape)
  else:
    draws = tf.random.stateless_uniform(
        shape, seed=tf.random.experimental.stateless_fold_in(seed, index))
  keep = 1.0 - rate
  return x * tf.cast(tf.cast(draws < keep, tf.float32) / keep, x.dtype)
