"""What the hardware can do, measured: the yardstick for FLOP utilisation."""

import time

import tensorflow as tf


def training_flops_per_image(macs):
  """Forward and backward of one image: about 3 x (2 FLOPs per multiply-add)."""
  return 3 * 2 * macs


def measure_peak_flops(strategy, dtype=tf.float32, size=1024, seconds=1.0):
  """FLOP/s of every replica multiplying size x size matrices at once.

  A chain x <- x @ b (b scaled to keep x bounded), so no multiply can be
  hoisted or skipped. This is the peak the training step is measured against:
  on logical CPU devices the replicas share the cores, as the step does.
  """
  dtype = tf.dtypes.as_dtype(dtype)

  @tf.function
  def chain(num_matmuls):
    def replica():
      b = tf.random.stateless_normal([size, size], seed=[1, 2]) / size**0.5
      x = tf.random.stateless_normal([size, size], seed=[3, 4])
      b, x = tf.cast(b, dtype), tf.cast(x, dtype)
      for _ in tf.range(num_matmuls):
        x = tf.matmul(x, b)
      return tf.cast(x[0, 0], tf.float32)
    return strategy.run(replica)

  chain(tf.constant(1))  # trace and warm up
  num_matmuls, elapsed = 1, 0.0
  while elapsed < seconds:  # double until one call takes long enough to time
    num_matmuls *= 2
    began = time.perf_counter()
    tf.nest.map_structure(lambda t: t.numpy(), strategy.experimental_local_results(
        chain(tf.constant(num_matmuls))))
    elapsed = time.perf_counter() - began
  return strategy.num_replicas_in_sync * num_matmuls * 2 * size**3 / elapsed
