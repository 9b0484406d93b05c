"""resnet_dist: distributed ResNet training on tf.distribute.

The path of a batch, one module each:
  data/          -> sharded tf.data input for every source
  models/        -> the ResNet family
  strategy.py    -> every tf.distribute difference, in one place
  optim.py       -> learning-rate schedules, SGD and LARS
  trainer.py     -> the replica step and the loops of steps (Trainer.train)
  evaluation.py  -> the eval step and loop, a split's result, evaluate()
  host_loop.py   -> the host loop: when to save, evaluate, resize, profile, stop
  train.py       -> a run: run_setup.prepare, resume, report, HostLoop, summary
  checkpoints.py -> model_dir: checkpoints, resume
  run_lock.py    -> the run lock: a lease naming the run
  preemption.py  -> SIGTERM, SIGINT, SIGHUP: the stop request every step reads
  watchdog.py    -> a run that makes no progress ends, for a restart
  monitor.py     -> console, TensorBoard summaries, profiling
  perf.py        -> the hardware: measured peak, CPU kernels, bf16 support
config/ holds the run's settings (Config); the library never reads flags.
"""

import os as _os
import platform as _platform

# TensorFlow decides from the CPU whether its oneDNN kernels are on by
# default, and leaves them off on some AVX2 CPUs, where Eigen then runs
# convolutions and matmuls at about half the speed (docs/benchmarks.md).
# TensorFlow reads the variable once, when it loads: this takes effect only
# if resnet_dist is imported first. TF_ENABLE_ONEDNN_OPTS=0 keeps
# TensorFlow's own choice.
if _platform.machine().lower() in ("x86_64", "amd64"):
  _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
