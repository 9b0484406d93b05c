"""resnet_dist: distributed ResNet training on tf.distribute.

The path of a batch, one module each:
  data/        -> sharded tf.data input for every source
  models/      -> the ResNet family
  strategy.py  -> every tf.distribute difference, in one place
  optim.py     -> learning-rate schedules, SGD and LARS
  train.py     -> replica step, eval step and the host loop
  checkpoints.py -> model_dir: checkpoints, resume, preemption
  monitor.py   -> console, TensorBoard summaries, profiling
  perf.py      -> the hardware: measured peak, CPU kernels, bf16 support
"""

import os as _os
import platform as _platform

# TensorFlow decides from the CPU whether its oneDNN kernels are on by
# default; on the AVX2 AMD EPYC this was built on it left them off, and
# convolutions and matmuls ran on Eigen. With oneDNN on,
# ResNet-50 training at batch 32 ran about 1.8x faster there, and a large
# fp32 matmul at 121-128 GFLOP/s against 42-95 (README, Benchmarks).
# TensorFlow reads the variable once, when it loads: this takes effect only
# if resnet_dist is imported first. TF_ENABLE_ONEDNN_OPTS=0 keeps
# TensorFlow's own choice.
if _platform.machine().lower() in ("x86_64", "amd64"):
  _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
