"""What the hardware can do: the measured matmul peak (the yardstick for FLOP
utilisation), which library runs the CPU kernels, whether bf16 is emulated."""

import time

import tensorflow as tf


def cpu_kernels():
  """"oneDNN" or "Eigen": the library behind TensorFlow's CPU convolutions and
  matmuls in this process (resnet_dist/__init__.py turns oneDNN on for x86)."""
  from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-import-not-at-top
  return "oneDNN" if _pywrap_util_port.IsMklEnabled() else "Eigen"


# bfloat16: the CPU flags under which oneDNN has native kernels for it.
_BF16_NATIVE = {"avx512f", "avx_ne_convert", "amx_bf16"}


def emulated_precision_warning(dtype, on_cpu, cpu_flags=None):
  """A warning line when --dtype=bf16 or fp16 would run emulated on CPU
  replicas, else "".

  oneDNN's bfloat16 kernels need AVX-512 (or AVX-NE-CONVERT / AMX); without
  them TensorFlow falls back to emulated kernels, several times slower than
  fp32. float16 trains many times slower than fp32 on every CPU measured,
  AVX512-FP16 included (docs/benchmarks.md), so it is always warned of.
  """
  if not on_cpu:
    return ""
  if dtype == "fp16":
    return ("warning: --dtype=fp16 on a CPU: TensorFlow trains float16 many times slower "
            "than --dtype=fp32 here, even with AVX512-FP16; --dtype=bf16 is the CPU's "
            "reduced precision")
  if dtype != "bf16":
    return ""
  if cpu_flags is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpu_flags = set(f.read().split())
    except OSError:  # not Linux: no way to tell
      return ""
  if cpu_flags & _BF16_NATIVE:
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


# The verdict on input, at the end of a run: did the accelerators wait for it?
INPUT_BOUND_WAIT = 0.10   # the train loop waited on input more than this share of its time
PROBE_MARGIN = 1.25       # the pipeline alone made fewer than this many times the images
                          # training took: no headroom, so training was (or nearly) held back
PROBE_AFTER_SECONDS = 60  # runs shorter than this get no probe: it would cost more than it tells
PROBE_SECONDS = 5.0
INPUT_ADVICE = ("give each host more CPU cores for decoding and augmentation (or a lighter "
                "--augment), read from faster storage, hold TFRecords in memory with "
                "--cache_data, or decode on other machines with a tf.data service "
                "(--data_service)")


def input_verdict(wait_fraction, training_rate, pipeline_rate=None, service_workers=0):
  """summary.json's input_bound: whether the run waited on its input, the
  figures that say so, and what to do about it.

  wait_fraction: the share of the train loop's time spent waiting for the
  next batch (None where it cannot be timed: several logical CPU devices,
  --deterministic). Without it, pipeline_rate, images/s the input pipeline
  made alone after training, compared with training_rate, images/s each
  input pipeline fed during training. Both None: no verdict. service_workers:
  the tf.data service's workers, when a service made the input.
  """
  figures = {"input_wait_fraction": wait_fraction,
             "training_images_per_second_per_pipeline": training_rate,
             "pipeline_alone_images_per_second": pipeline_rate}
  if wait_fraction is not None:
    bound = wait_fraction > INPUT_BOUND_WAIT
    basis = f"the train loop waited for input {100 * wait_fraction:.0f}% of its time"
  elif pipeline_rate is not None and training_rate:
    bound = pipeline_rate < PROBE_MARGIN * training_rate
    basis = (f"the input pipeline alone made {pipeline_rate:.0f} images/s, training took "
             f"{training_rate:.0f}")
  else:
    return {"input_bound": None, **figures,
            "verdict": "input: not judged (the wait cannot be timed here and the run was too "
                       "short to probe the pipeline)"}
  advice = (f"add tf.data service workers (it had {service_workers}; README: Feeding "
            f"accelerators from CPU machines)" if service_workers else INPUT_ADVICE)
  verdict = (f"input-bound: {basis}; {advice}" if bound
             else f"not input-bound: {basis}")
  return {"input_bound": bound, **figures, "verdict": verdict}
