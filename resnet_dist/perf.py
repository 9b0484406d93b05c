"""What the hardware can do: the measured matmul peak (the yardstick for FLOP
utilisation), which library runs the CPU kernels, whether bf16 is emulated."""

import time

import tensorflow as tf


def cpu_kernels():
  """"oneDNN" or "Eigen": the library behind TensorFlow's CPU convolutions and
  matmuls in this process (resnet_dist/__init__.py turns oneDNN on for x86)."""
  from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-import-not-at-top
  return "oneDNN" if _pywrap_util_port.IsMklEnabled() else "Eigen"


def emulated_bf16_warning(dtype, on_cpu, cpu_flags=None):
  """A warning line when --dtype=bf16 would run emulated on CPU replicas, else "".

  oneDNN's bfloat16 kernels need AVX-512 (or AVX-NE-CONVERT / AMX); without
  them TensorFlow falls back to emulated kernels ("oneDNN supports
  DT_BFLOAT16 only on platforms with AVX-512"), an order of magnitude slower
  than fp32 (docs/benchmarks.md).
  """
  if dtype != "bf16" or not on_cpu:
    return ""
  if cpu_flags is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpu_flags = set(f.read().split())
    except OSError:  # not Linux: no way to tell
      return ""
  if cpu_flags & {"avx512f", "avx_ne_convert", "amx_bf16"}:
    return ""
  return ("warning: --dtype=bf16 on a CPU without AVX-512: TensorFlow emulates bfloat16 "
          "here, many times slower than --dtype=fp32")


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
