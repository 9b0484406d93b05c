"""The end of a run: summary.json, the input verdict, the closing lines;
and the summary of a run found already finished."""

import json
import math
import os
import shlex
import time

import tensorflow as tf

from resnet_dist import checkpoints, data, host_loop, monitor, perf
from resnet_dist import distributed_input
from resnet_dist import strategy as strategy_lib


def _timed_rates(record, config, cost):
  """Throughput, input wait and FLOP utilisation over the timed loops."""
  loops = record.timed_loops
  timed = sum(s.seconds for s in loops)
  if not timed:
    return {"examples_per_second": None, "input_wait_fraction": None, "flop_utilization": None}
  return {
      "examples_per_second": (sum(s.num_steps for s in loops)
                              * config.schedule.global_batch_size / timed),
      "input_wait_fraction": (sum(s.input_seconds for s in loops) / timed
                              if record.input_timed else None),
      "flop_utilization": (sum(s.flop_utilization * s.seconds for s in loops) / timed
                           if cost.peak_flops else None),
  }


def probe_input(setup, step, seconds):
  """Images/s the chief's input pipeline makes alone, from `step` on, in
  `seconds` after two batches of warm-up (training is over: it has the host)."""
  strategy = setup.strategy
  context = tf.distribute.InputContext(strategy_lib.num_input_pipelines(strategy), 0,
                                       strategy.num_replicas_in_sync)
  dataset_fn, spec = host_loop.train_input(setup, step)
  dataset = dataset_fn(context)
  per_batch = context.get_per_replica_batch_size(spec.global_batch_size)
  holder = [iter(dataset)]
  try:
    with data.data_errors(setup.source.num_classes):
      for _ in range(2):
        next(holder[0])
      batches, began = 0, time.perf_counter()
      while time.perf_counter() - began < seconds:
        next(holder[0])
        batches += 1
      return batches * per_batch / (time.perf_counter() - began)
  finally:
    distributed_input.drop_in_background(holder)


def input_verdict(setup, record, rates):
  """Whether the run waited on its input (perf.input_verdict): from the timed
  wait, or else, on the chief of a run long enough, from a probe of the
  input pipeline alone."""
  rate = rates["examples_per_second"]
  per_pipeline = rate / strategy_lib.num_input_pipelines(setup.strategy) if rate else None
  timed = sum(s.seconds for s in record.timed_loops)
  pipeline_rate = None
  if (rates["input_wait_fraction"] is None and per_pipeline and setup.chief
      and timed >= perf.PROBE_AFTER_SECONDS):
    pipeline_rate = probe_input(setup, record.step, perf.PROBE_SECONDS)
  return perf.input_verdict(rates["input_wait_fraction"], per_pipeline, pipeline_rate,
                            setup.service_workers)


def finished_summary(setup, step):
  """The summary of a run already trained to its last step and evaluated,
  kept as it is: its figures are the finished run's, and a rerun (the way to
  resume) has nothing to add. None for a run with steps or its final
  evaluation to go. Every worker reads the shared model_dir alike."""
  path = os.path.join(setup.model_dir, checkpoints.SUMMARY_FILE)
  if step < setup.total_steps or not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    summary = json.load(f)
  if summary.get("global_step") != step:  # an earlier, shorter run's
    return None
  monitor.log(f"already finished at step {step}: nothing to train; summary in {path}",
              setup.chief)
  return summary


def _strict_json(value):
  """value with NaN and infinities as null, which every JSON parser reads."""
  if isinstance(value, dict):
    return {k: _strict_json(v) for k, v in value.items()}
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_summary(setup, cost, record):
  """The run's results and settings, in model_dir/summary.json (chief) and
  returned, from the host loop's Record."""
  config, strategy, result = setup.config, setup.strategy, record.eval_result or {}
  rates = _timed_rates(record, config, cost)
  summary = {
      "global_step": record.step,
      "train_loss": record.last_train["loss"],
      "train_top1": record.last_train["top1"],
      "eval_loss": result.get("loss"),
      "eval_top1": result.get("top1"),
      "eval_top5": result.get("top5"),
      "eval_examples": int(result.get("count", 0)),
      **({f"eval_{key}_ema": record.ema_result[key] for key in ("loss", "top1", "top5")}
         if record.ema_result else {}),
      "eval_split_examples": setup.eval_size,
      # A service's workers skip undecodable images without counting them.
      "skipped_train_records": (None if setup.service_workers else
                                round(record.skipped_records)),
      **({"data_service": {"address": config.data.data_service,
                           "workers_at_start": setup.service_workers,
                           "workers_at_end": record.service_workers}}
         if setup.service_workers else {}),
      **rates,
      "input_bound": input_verdict(setup, record, rates),
      "gmacs_per_image": cost.macs / 1e9,
      "peak_gflops": cost.peak_flops / 1e9,
      "cpu_kernels": perf.cpu_kernels(),
      "strategy": strategy_lib.kind_of(strategy),
      "num_replicas": strategy.num_replicas_in_sync,
      "model": config.model.name,
      "resnet_variant": config.model.resnet_variant,
      "dataset": config.data.dataset,
      "dtype": config.model.dtype,
      "global_batch_size": config.schedule.global_batch_size,
      "trainable_parameters": cost.num_params,
      "model_dir": setup.model_dir,
  }
  summary = _strict_json(summary)
  if not setup.chief:  # every task's last line says how it ended
    monitor.log(f"finished at step {record.step}{strategy_lib.describe_tasks(strategy)}; the "
                f"chief writes the run's summary")
  if setup.chief:
    path = os.path.join(setup.model_dir, checkpoints.SUMMARY_FILE)
    with tf.io.gfile.GFile(path, "w") as f:
      json.dump(summary, f, indent=2, allow_nan=False)
    rate, top1 = summary["examples_per_second"], summary["eval_top1"]
    monitor.log(summary["input_bound"]["verdict"])
    monitor.log(f"done: {record.step} steps"
                + (f", eval top-1 {top1:.4f}" if top1 is not None else "")
                + (f", {rate:.0f} images/s" if rate else "") + "\n"
                f"checkpoints in {record.checkpoint_dir}, summary in {path}\n"
                f"look at the run: tensorboard --logdir {shlex.quote(setup.model_dir)}")
  return summary
