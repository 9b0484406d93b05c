"""resnet_dist: distributed ResNet training on tf.distribute.

The path of a batch, one module each:
  data/        -> sharded tf.data input for every source
  models/      -> the ResNet family
  strategy.py  -> every tf.distribute difference, in one place
  optim.py     -> learning-rate schedules, SGD and LARS
  train.py     -> replica step, eval step and the host loop
  checkpoints.py -> model_dir: checkpoints, resume, preemption
  monitor.py   -> console, TensorBoard summaries, profiling
  perf.py      -> the hardware's measured peak, for FLOP utilisation
"""

import os as _os
import platform as _platform

# TensorFlow turns its oneDNN CPU kernels on by default only on x86 CPUs with
# AVX-512 (or newer) features; on others, such as the AVX2 AMD EPYC this was
# built on, convolutions and matmuls fall back to Eigen. With oneDNN on,
# ResNet-50 training at batch 32 ran 1.8x faster there and a large fp32
# matmul 1.3x faster (README, Benchmarks). Read once, when TensorFlow loads:
# it takes effect only if resnet_dist is imported first. Set
# TF_ENABLE_ONEDNN_OPTS=0 to keep TensorFlow's own choice.
if _platform.machine().lower() in ("x86_64", "amd64"):
  _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
