"""launch.benchmark's modes, a module each, and what they share.

  input.py       --mode=input: the training input pipeline alone, against a bare one
  pipelines.py   the pipelines it times, and the JPEGs they read
  train.py       --mode=train: training steps, case by case, against the peers
  e2e.py         --mode=e2e: ResNet-20 on JPEG TFRecords (and a tf.data service)
                 against synthetic input
  targets.py     --mode=targets: the cases behind the speed targets, and the ratios
  cases.py       what a training case is, how long it is measured, and the
                 multiply-adds its figures are counted by
  turns.py       cases measured in processes of their own, in turns: the
                 protocol with the process that times them
  in_process.py  that process's side: builds each case as a training run
                 would, times the cases in turns, makes their rows
  traces.py      a case's profiled ops, by their self time

Only launch/benchmark.py reads flags: the modes take their settings as
arguments.
"""
