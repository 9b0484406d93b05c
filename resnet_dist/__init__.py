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
