"""The side of turns.py that times: `launch.benchmark --cases=JSON` builds
each case in this process, times the cases in turns, and makes their rows.

Our train loop is built as a training run builds it (resnet_dist.train): a
Config of the case's settings and a run's defaults for the rest, its source,
its InputSpec (slack included) and its Trainer. The plain step (ours, the
keras peer's) is launch.peers.tf_step, as Model Garden's.
"""

import dataclasses
import os
import resource
import statistics
import time

import keras
import tensorflow as tf

from launch.benchmarks import cases as cases_lib
from launch.peers import tf_step, timing
from resnet_dist import data, distributed_input, models, perf
from resnet_dist import run_setup
from resnet_dist.config import DTYPES, Config
from resnet_dist.trainer import Trainer

# Only the learning-rate schedule reads a run's length and epochs, and a
# case never comes near the end of a run this long.
_STEPS_PER_EPOCH = 100
_TRAIN_STEPS = 10**6


def case_config(case):
  """The Config of the training run a case of ours times: synthetic data,
  or the JPEG TFRecords at data_dir (input "jpeg..."), through the tf.data
  service at data_service if the case names one."""
  jpeg = case.get("input", "").startswith("jpeg")
  size = case["image_size"]
  return Config.from_flat(
      model=case["model"], dtype=case["dtype"], enable_xla=case["xla"],
      global_batch_size=case["batch"], steps_per_loop=case["steps_per_loop"],
      strategy=case["strategy"], image_size=size, train_steps=_TRAIN_STEPS,
      dataset="imagenet" if jpeg else "synthetic", data_dir=case.get("data_dir", ""),
      num_classes=10 if jpeg or size <= 64 else 1000,
      data_service=case.get("data_service", "")).validate()


def _ours(case, strategy):
  """Our train loop over the case's input."""
  config = case_config(case)
  source = run_setup.open_source(config, strategy)
  trainer = Trainer(config, strategy, source, steps_per_epoch=_STEPS_PER_EPOCH,
                    total_steps=config.schedule.total_steps(_STEPS_PER_EPOCH))
  # A service's job of its own, as each run's (its job_prefix names a model_dir).
  spec = dataclasses.replace(run_setup.train_input_spec(config, strategy),
                             job_name=f"benchmark-{os.getpid()}-{time.time_ns()}")
  iterator = iter(distributed_input.distribute_input(
      strategy, data.train_dataset_fn(source, source.train_split, spec)))
  return (lambda n: trainer.train_loop(iterator, tf.constant(n)),
          models.count_macs(trainer.model, config.data.image_size), trainer.model.compute_dtype)


def _plain_step(case, build_model):
  """run_loop(n) training a Keras model (built by build_model(policy name)) by a
  minimal tf.function step: float images in, softmax cross-entropy, SGD with
  momentum; the step every framework is compared by."""
  model = build_model(DTYPES[case["dtype"]])
  optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
  optimizer.build(model.trainable_variables)
  return (tf_step.plain_loop(model, optimizer, case["batch"], case["image_size"]),
          model.compute_dtype)


def _peer(case, strategy):
  """keras.applications.ResNet50 in the plain step, on TensorFlow's default
  device (the peer runs beside one_device cases only)."""
  del strategy

  def build(policy):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)  # the peer's layers only
    try:
      return keras.applications.ResNet50(
          weights=None, input_shape=(case["image_size"], case["image_size"], 3))
    finally:
      keras.mixed_precision.set_global_policy(previous)

  run_loop, dtype = _plain_step(case, build)
  return run_loop, cases_lib.peer_macs(case["image_size"]), dtype


def _ours_plain(case, strategy):
  """Our model in the plain step: what the outside peers are compared with."""
  del strategy
  run_loop, dtype = _plain_step(case, lambda policy: models.get_model(
      case["model"], num_classes=1000, dtype=policy))
  return run_loop, models.count_macs(case["model"], case["image_size"]), dtype


# kind -> build(case, strategy): (run_loop(n), MACs per image, compute dtype)
_BUILDERS = {"resnet_dist": _ours, "resnet_dist_step": _ours_plain, "keras_peer": _peer}


def run_cases(cases, budget):
  """The rows of cases of one strategy, timed in turns within `budget`."""
  strategy = run_setup.create_strategy(Config.from_flat(strategy=cases[0]["strategy"]))
  built = [_BUILDERS[case["kind"]](case, strategy) for case in cases]
  for (run_loop, _, _), case in zip(built, cases):
    # Warm-up: tracing, first allocations, and a second call (as the peers'
    # two warm-up steps): the train loop's first calls after tracing run slow.
    for _ in range(2):
      run_loop(case["steps_per_loop"])
  times = [[] for _ in cases]
  for _ in range(budget.rounds):
    for (run_loop, _, _), case, case_times in zip(built, cases, times):
      case_times.append(timing.timed_loops(run_loop, case["steps_per_loop"], budget.min_steps,
                                           budget.seconds / budget.rounds))
  for (run_loop, _, _), case in zip(built, cases):
    if case.get("profile_dir"):
      tf_step.trace(run_loop, case["profile_dir"])
  peaks = {dtype: perf.measure_peak_flops(strategy, dtype, size=2048, seconds=2.0)
           for dtype in {dtype for _, _, dtype in built}}
  rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  return [_row(case, case_times, macs, peaks[dtype], rss, len(cases))
          for (_, macs, dtype), case, case_times in zip(built, cases, times)]


def _row(case, step_times, macs, peak_flops, rss_mb, process_cases):
  """A case's row: its median step over the rounds, and what that makes of
  the model's FLOP/s against the measured peak."""
  step_seconds = statistics.median(step_times)
  images_per_second = case["batch"] / step_seconds
  flops = images_per_second * perf.training_flops_per_image(macs)
  return {**case, "images_per_second": round(images_per_second, 2),
          "step_ms": round(1000 * step_seconds, 1),
          "step_ms_range": [round(1000 * min(step_times), 1), round(1000 * max(step_times), 1)],
          "gmacs_per_image": round(macs / 1e9, 4),
          "model_gflops": round(flops / 1e9, 1),
          "peak_gflops": round(peak_flops / 1e9, 1),
          "utilization": round(flops / peak_flops, 3),
          "peak_rss_mb": rss_mb, "process_cases": process_cases}
