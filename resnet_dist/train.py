"""The training path: replica step -> host loop -> checkpoints and summaries.

run(config) builds everything inside the strategy's scope, resumes from
model_dir if a checkpoint is there, trains, evaluates, and returns (and
writes) the run's summary.
"""

import dataclasses
import json
import math
import os
import time

import keras
import tensorflow as tf

from resnet_dist import checkpoints, data, models, monitor, optim, perf, preemption
from resnet_dist import strategy as strategy_lib
from resnet_dist.config import Config
from resnet_dist.errors import ConfigError, DataError

def cross_entropy(labels, logits, num_classes, label_smoothing=0.0):
  """Per-example softmax cross-entropy from logits, with label smoothing."""
  targets = tf.one_hot(labels, num_classes)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  return tf.nn.softmax_cross_entropy_with_logits(targets, tf.cast(logits, tf.float32))


class Metrics(tf.Module):
  """Weighted sums that every replica adds to; reading them sums across replicas."""

  NAMES = ("loss", "top1", "top5", "count")

  def __init__(self, name):
    super().__init__(name=name)
    self.sums = {
        key: tf.Variable(0.0, trainable=False, name=key,
                         synchronization=tf.VariableSynchronization.ON_READ,
                         aggregation=tf.VariableAggregation.SUM)
        for key in self.NAMES}

  def update(self, labels, logits, per_example_loss, weights):
    labels = tf.cast(labels, tf.int32)
    logits = tf.cast(logits, tf.float32)
    top1 = tf.cast(tf.math.in_top_k(labels, logits, 1), tf.float32)
    top5 = tf.cast(tf.math.in_top_k(labels, logits, min(5, logits.shape[-1])), tf.float32)
    for key, values in (("loss", per_example_loss), ("top1", top1), ("top5", top5),
                        ("count", tf.ones_like(top1))):
      self.sums[key].assign_add(tf.reduce_sum(values * weights))

  def result(self):
    """Means over the examples counted; NaN where none was."""
    values = {k: float(v.read_value()) for k, v in self.sums.items()}
    count = values.pop("count")
    return {**{k: v / count if count else float("nan") for k, v in values.items()},
            "count": count}

  def reset(self):
    for v in self.sums.values():
      v.assign(0.0)


class Trainer:
  """Model, optimizer and step functions of one run, built in the strategy's scope."""

  def __init__(self, config: Config, strategy, source, steps_per_epoch, total_steps):
    self.config = config
    self.strategy = strategy
    self.source = source
    self.num_classes = source.num_classes
    self.steps_per_epoch = steps_per_epoch
    self.total_steps = total_steps
    self.schedule = optim.LearningRate(
        config.base_learning_rate, config.global_batch_size, steps_per_epoch,
        total_steps, config.warmup_epochs, config.lr_schedule,
        parse_boundary_epochs(config.lr_boundary_epochs))
    with strategy.scope():
      self.model = models.get_model(
          config.model, num_classes=self.num_classes, variant=config.resnet_variant,
          sync_bn=config.sync_bn, zero_init_residual=config.zero_init_residual,
          image_size=config.image_size, dtype=config.policy)
      self.variables = self.model.trainable_variables
      self.optimizer = optim.Optimizer(
          self.variables, models.weight_decay_variables(self.model), config.optimizer,
          config.momentum, config.nesterov, config.weight_decay)
      self.loss_scale = optim.DynamicLossScale() if config.dtype == "fp16" else None
      self.train_metrics = Metrics("train_metrics")
      self.eval_metrics = Metrics("eval_metrics")
      self.grad_norm_sum = tf.Variable(
          0.0, trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
          aggregation=tf.VariableAggregation.MEAN)
      # Records the input skipped as undecodable, over the whole run (checkpointed).
      self.skipped_records = tf.Variable(
          0.0, trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
          aggregation=tf.VariableAggregation.SUM)
    # Host-side: seconds the train loop waited for input (see train_loop).
    self.times_input = not config.deterministic and strategy_lib.input_wait_measurable(strategy)
    self.input_seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False)
    # Host-side, this process's own: set when a SIGTERM or SIGINT asks the run
    # to stop (preemption.StopRequest); every step reads it.
    self.stop_requested = tf.Variable(False, trainable=False)
    self.moving_statistics = models.moving_statistics(self.model)
    step = self.replica_step
    if config.enable_xla:
      strategy_lib.check_xla(strategy)
      step = tf.function(step, jit_compile=True)
    self._compiled_step = step

  @property
  def step(self):
    return self.optimizer.iterations

  def _normalize(self, images):
    return data.normalize(images, self.source.mean, self.source.std, self.model.compute_dtype)

  def replica_step(self, images, labels, skipped, stop_requested):
    """Forward, backward, all-reduce, update: one replica's part of one step.

    skipped: per example, the bad records the input skipped just before it.
    stop_requested: whether this process was asked to stop. It travels in the
    gradients' all-reduce, so every replica of every worker learns in the same
    step that some process was, at no cost of its own. Returns that answer.
    """
    config = self.config
    images = self._normalize(images)
    with tf.GradientTape() as tape:
      logits = self.model(images, training=True)
      per_example = cross_entropy(labels, logits, self.num_classes, config.label_smoothing)
      loss = tf.nn.compute_average_loss(per_example, global_batch_size=config.global_batch_size)
      if self.loss_scale is not None:
        loss = loss * self.loss_scale.scale
    grads = tape.gradient(loss, self.variables)
    stops = tf.reshape(tf.cast(stop_requested, tf.float32), [1])
    context = tf.distribute.get_replica_context()
    if context.num_replicas_in_sync > 1:
      *grads, stops = context.all_reduce(tf.distribute.ReduceOp.SUM, [*grads, stops])
    apply = None
    if self.loss_scale is not None:
      grads = [g / self.loss_scale.scale for g in grads]
      apply = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
      self.loss_scale.update(apply)
    lr = self.schedule(self.optimizer.iterations)
    self.optimizer.apply(grads, lr, apply)
    self.grad_norm_sum.assign_add(tf.linalg.global_norm(grads))
    self.skipped_records.assign_add(tf.cast(tf.reduce_sum(skipped), tf.float32))
    self.train_metrics.update(labels, logits, per_example, tf.ones_like(per_example))
    return stops[0] > 0

  def eval_step(self, images, labels, weights):
    logits = self.model(self._normalize(images), training=False)
    per_example = cross_entropy(labels, logits, self.num_classes)
    self.eval_metrics.update(labels, logits, per_example, weights)

  @tf.function
  def weights_finite(self):
    """Checked before every save, so a checkpoint never holds inf or NaN weights."""
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in self.model.variables])

  @tf.function
  def sync_moving_statistics(self):
    """Gives every replica the mean of the replicas' BN moving statistics, in
    one all-reduce: before evaluations and saves (see layers.BatchNorm)."""
    def average():  # in replica context, where a variable reads as this replica's copy
      local = [tf.reshape(tf.convert_to_tensor(v), [-1]) for v in self.moving_statistics]
      mean = tf.distribute.get_replica_context().all_reduce(
          tf.distribute.ReduceOp.MEAN, tf.concat(local, axis=0))
      for variable, value in zip(self.moving_statistics,
                                 tf.split(mean, [int(v.shape[0]) for v in local])):
        variable.assign(tf.reshape(value, variable.shape))

    if self.strategy.num_replicas_in_sync > 1 and self.moving_statistics:
      self.strategy.run(average)

  @tf.function
  def train_loop(self, iterator, num_steps):
    """Up to num_steps steps in one tf.function: neither TPUs nor small models
    wait on Python. Returns whether it stopped early because some process was
    asked to stop (every worker stops after the same step).

    Timestamps around each next(iterator) add up the time the loop waits for
    input; tf.function runs stateful ops (timestamps, the iterator, variable
    updates) in program order, so no wait overlaps a step. TensorFlow refuses
    timestamps under op determinism, so --deterministic runs go untimed, as
    do runs over several logical CPU devices (input_wait_measurable).
    """
    stopping = tf.constant(False)
    for _ in tf.range(num_steps):
      if self.times_input:
        asked = tf.timestamp()
        batch = next(iterator)
        with tf.control_dependencies(tf.nest.flatten(batch, expand_composites=True)):
          self.input_seconds.assign_add(tf.timestamp() - asked)
      else:
        batch = next(iterator)
      stops = self.strategy.run(self._compiled_step,
                                args=(*batch, self.stop_requested.read_value()))
      stopping = self.strategy.experimental_local_results(stops)[0]
      if stopping:
        break
    return stopping

  @tf.function
  def eval_loop(self, iterator, num_steps):
    for _ in tf.range(num_steps):
      self.strategy.run(self.eval_step, args=next(iterator))


def validate(config):
  """Checks the settings that need no TensorFlow work; raises ConfigError."""
  if config.model not in models.list_models():
    raise ConfigError(f"unknown model {config.model!r}; choose from {', '.join(models.list_models())}")
  if config.resnet_variant not in models.VARIANTS:
    raise ConfigError(f"unknown --resnet_variant {config.resnet_variant!r}")
  if config.image_size < 32:
    raise ConfigError(f"--image_size={config.image_size} is below the minimum of 32")
  if config.global_batch_size < 1:
    raise ConfigError("--global_batch_size must be positive")
  if config.train_steps <= 0 and config.train_epochs <= 0:
    raise ConfigError("set --train_steps or --train_epochs to a positive value")
  if config.steps_per_loop < 1:
    raise ConfigError("--steps_per_loop must be at least 1")
  if not (math.isfinite(config.base_learning_rate) and config.base_learning_rate > 0):
    raise ConfigError(f"--base_learning_rate={config.base_learning_rate} must be a positive number")
  if config.tpu and config.strategy not in ("tpu", "auto"):
    raise ConfigError(f"--tpu={config.tpu} is for --strategy=tpu, not --strategy={config.strategy}")
  parse_profile_steps(config.profile_steps)
  parse_boundary_epochs(config.lr_boundary_epochs)


def parse_boundary_epochs(value):
  """"30,60,80" -> (30.0, 60.0, 80.0), increasing."""
  try:
    epochs = tuple(float(v) for v in value.split(",") if v.strip())
  except ValueError:
    epochs = ()
  if not epochs or list(epochs) != sorted(set(epochs)) or epochs[0] <= 0:
    raise ConfigError(f"--lr_boundary_epochs={value} must be increasing positive epochs")
  return epochs


def parse_profile_steps(value):
  """"START,END" -> (START, END) with 0 <= START < END; "" -> None."""
  if not value:
    return None
  try:
    start, end = (int(v) for v in value.split(","))
  except ValueError:
    start = end = -1
  if not 0 <= start < end:
    raise ConfigError(f"--profile_steps={value} must be START,END with 0 <= START < END")
  return start, end


def _strategy(config):
  return strategy_lib.create_strategy(
      config.strategy, config.num_gpus, config.num_cpu_devices, config.tpu,
      config.tpu_zone, config.gcp_project, config.collective_timeout_seconds)


def _input_config(config):
  return data.InputConfig(config.global_batch_size, config.image_size, config.seed,
                          config.shuffle_buffer, config.strict_data)


def evaluate_split(trainer, source, split_name, input_config):
  """Loss, top-1, top-5 and count over a whole split, every example exactly once."""
  strategy = trainer.strategy
  split = source.split(split_name)
  steps = data.eval_steps(split, input_config.global_batch_size,
                          strategy_lib.num_input_pipelines(strategy))
  trainer.eval_metrics.reset()
  trainer.sync_moving_statistics()
  dataset = strategy.distribute_datasets_from_function(
      data.eval_dataset_fn(source, split_name, input_config),
      options=strategy_lib.input_options(strategy))
  with data.data_errors(source.num_classes):
    trainer.eval_loop(iter(dataset), tf.constant(steps))
  result = trainer.eval_metrics.result()
  if not result["count"]:
    raise DataError(f"no image of the {split_name} split ({split.num_examples} records) "
                    f"could be decoded")
  return {**result, "step": int(trainer.step.numpy())}


def evaluate(config: Config, checkpoint_path, split_name=None, strategy=None):
  """Evaluates the model of a checkpoint on a split (default: the eval split)."""
  validate(config)
  strategy = strategy or _strategy(config)
  data.check_batch_divides(config.global_batch_size, strategy.num_replicas_in_sync)
  source = data.get_source(config.dataset, config.data_dir, config.download,
                           config.num_classes, config.image_size, config.cache_data)
  split_name = split_name or source.eval_split
  size = source.split(split_name).num_examples
  trainer = Trainer(config, strategy, source, steps_per_epoch=1, total_steps=1)
  checkpoints.restore_model(trainer.model, checkpoint_path)
  result = evaluate_split(trainer, source, split_name, _input_config(config))
  result.update(checkpoint=checkpoint_path, split=split_name, split_examples=size)
  del result["step"]
  return result


def run(config: Config, strategy=None):
  """Trains (or resumes) a run; returns the summary written to model_dir/summary.json."""
  validate(config)
  strategy = strategy or _strategy(config)
  chief = strategy_lib.is_chief(strategy)
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  keras.utils.set_random_seed(config.seed)

  # Data: everything about the input that can fail, before any model is built.
  data.check_batch_divides(config.global_batch_size, strategy.num_replicas_in_sync)
  source = data.get_source(config.dataset, config.data_dir, config.download,
                           config.num_classes, config.image_size, config.cache_data)
  read_splits = [source.train_split] + ([] if config.skip_eval else [source.eval_split])
  for split_name in dict.fromkeys(read_splits):  # once each, in this order
    data.check_decodable(source.split(split_name), split_name)
  init_path = checkpoints.find_checkpoint(config.init_checkpoint) if config.init_checkpoint else ""
  model_dir = checkpoints.resolve_model_dir(config)
  if chief:
    checkpoints.check_writable(model_dir)
  with checkpoints.run_lock(model_dir, chief):
    return _train_and_evaluate(config, strategy, source, model_dir, init_path)


def _train_and_evaluate(config, strategy, source, model_dir, init_path):
  """run(), once model_dir is this run's."""
  chief = strategy_lib.is_chief(strategy)
  train_size = source.split(source.train_split).num_examples
  eval_size = source.split(source.eval_split).num_examples
  steps_per_epoch = max(train_size // config.global_batch_size, 1)
  total_steps = config.train_steps or math.ceil(config.train_epochs * steps_per_epoch)
  checkpoints.check_same_model(model_dir, config, source, chief)
  checkpoints.save_class_names(model_dir, source, chief)

  # Model, optimizer and checkpoint; resume if model_dir has one.
  trainer = Trainer(config, strategy, source, steps_per_epoch, total_steps)
  checkpoint = tf.train.Checkpoint(
      model=checkpoints.model_state(trainer.model), optimizer=trainer.optimizer,
      skipped_records=trainer.skipped_records,
      **({"loss_scale": trainer.loss_scale} if trainer.loss_scale else {}))
  if config.start_over and chief:
    checkpoints.remove_checkpoints(model_dir)
  existing = ([] if config.start_over else
              checkpoints.saved_checkpoints(checkpoints.checkpoint_dir(model_dir)))
  restored = checkpoints.restore_latest(checkpoint, existing, chief)
  manager = checkpoints.save_manager(checkpoint, strategy, model_dir, config.keep_checkpoints,
                                     existing)
  start_step = int(trainer.step.numpy())
  if init_path and not restored:
    fresh = checkpoints.init_from(trainer.model, init_path)
    monitor.log(f"initial weights from {init_path}"
                + (f"; a fresh classifier ({', '.join(fresh)})" if fresh else ""), chief)

  # What runs where, once, on the chief.
  num_params = sum(int(tf.size(v)) for v in trainer.variables)
  macs = models.count_macs(trainer.model, config.image_size) if chief else 0
  peak_flops = 0.0
  if chief:
    peak_flops = config.peak_tflops * 1e12 or perf.measure_peak_flops(
        strategy, trainer.model.compute_dtype, seconds=0.25)
  monitor.log(monitor.describe_run(config, strategy, source, train_size, eval_size, num_params,
                                   macs, steps_per_epoch, total_steps, model_dir), chief)
  warning = perf.emulated_bf16_warning(config.dtype, strategy_lib.all_on_cpu(strategy))
  if warning:
    monitor.log(warning, chief)
  if peak_flops:
    monitor.log(f"peak       {peak_flops / 1e9:.1f} GFLOP/s ({trainer.model.compute_dtype} "
                f"matmul, {'given' if config.peak_tflops else 'measured'})", chief)
  if start_step:
    monitor.log(f"resuming from step {start_step} ({restored})", chief)
  if source.eval_split == source.train_split and not config.skip_eval:
    monitor.log(f"warning: {source.name} has no evaluation split; evaluating on the training "
                f"split", chief)

  input_config = _input_config(config)
  # The list holds the only reference to the iterator, for drop_in_background().
  feed = [iter(strategy.distribute_datasets_from_function(
      data.train_dataset_fn(source, source.train_split, input_config, start_step),
      options=strategy_lib.input_options(strategy)))]
  summaries = monitor.Summaries(model_dir, chief)
  if chief:
    with data.data_errors(source.num_classes):
      images = _first_images(source, input_config)
    summaries.start(config, images, start_step, macs, peak_flops)
  profiler = monitor.Profiler(model_dir, parse_profile_steps(config.profile_steps), chief)
  eval_every = (round(config.epochs_between_evals * steps_per_epoch)
                if config.epochs_between_evals > 0 else 0)
  # Saving every epoch by default: a crash, an OOM or a SIGKILL then loses at most one.
  save_every = config.checkpoint_every_steps or steps_per_epoch

  def evaluate():
    result = evaluate_split(trainer, source, source.eval_split, input_config)
    monitor.log(monitor.eval_line(result, eval_size), chief)
    summaries.write_eval(result)
    return result

  # The host loop: returns to Python only at loop ends, evaluations, checkpoints
  # and profile boundaries.
  flops_per_image = perf.training_flops_per_image(macs)

  def save(step):
    trainer.sync_moving_statistics()
    if not bool(trainer.weights_finite()):
      raise FloatingPointError(f"non-finite weights at step {step}; "
                               f"{_last_good(manager)}")
    checkpoints.save(manager, step)

  try:
    with preemption.StopRequest(trainer.stop_requested) as stop_request:
      step = start_step
      loops = []
      last = {"loss": float("nan"), "top1": float("nan")}
      eval_result = None
      while step < total_steps:
        num_steps = _next_stop(step, total_steps, config.steps_per_loop, eval_every,
                               save_every, profiler.stops()) - step
        profiler.at(step)
        trainer.train_metrics.reset()
        trainer.grad_norm_sum.assign(0.0)
        trainer.input_seconds.assign(0.0)
        began = time.perf_counter()
        with data.data_errors(source.num_classes):
          # True when a SIGTERM or SIGINT to any worker stopped every worker at this step.
          stopped = bool(trainer.train_loop(feed[0], tf.constant(num_steps)))
        last = trainer.train_metrics.result()
        elapsed = time.perf_counter() - began
        previous, step = step, int(trainer.step.numpy())
        stats = monitor.LoopStats(step, step - previous, elapsed,
                                  float(trainer.input_seconds.numpy()) if trainer.times_input
                                  else None,
                                  config.global_batch_size, strategy.num_replicas_in_sync,
                                  flops_per_image, peak_flops)
        if previous != start_step:  # the first loop includes tracing
          loops.append(stats)
        lr = trainer.schedule.value_at(step - 1)
        summaries.write_train(
            stats, last, lr, float(trainer.grad_norm_sum.read_value()) / (step - previous),
            float(trainer.skipped_records.read_value()),
            trainer.loss_scale.scale.read_value() if trainer.loss_scale else None)
        if not math.isfinite(last["loss"]):
          raise FloatingPointError(f"non-finite training loss at step {step}; "
                                   f"{_last_good(manager)}")
        logs = config.log_every_steps
        if step // logs != previous // logs or step == total_steps:
          monitor.log(monitor.progress_line(step, total_steps, steps_per_epoch, last, lr, stats),
                      chief)
        at_eval = eval_every and step % eval_every == 0
        at_checkpoint = step % save_every == 0
        if at_eval or at_checkpoint or step == total_steps or stopped:
          save(step)
        if stopped and step < total_steps:
          profiler.close()
          summaries.flush()
          reason = stop_request.signal_name or "a signal to another worker"
          monitor.log(f"{reason}: saved a checkpoint at step {step}; run again to resume", chief)
          raise preemption.Preempted(step, reason)
        if at_eval and not config.skip_eval and step < total_steps:
          eval_result = evaluate()
      profiler.at(step)
      profiler.close()
      if not config.skip_eval and (eval_result is None or eval_result["step"] != step):
        eval_result = evaluate()
  finally:
    strategy_lib.drop_in_background(feed)
  summaries.flush()

  timed = sum(s.seconds for s in loops)
  summary = {
      "global_step": step,
      "train_loss": last["loss"],
      "train_top1": last["top1"],
      "eval_loss": eval_result["loss"] if eval_result else None,
      "eval_top1": eval_result["top1"] if eval_result else None,
      "eval_top5": eval_result["top5"] if eval_result else None,
      "eval_examples": int(eval_result["count"]) if eval_result else 0,
      "eval_split_examples": eval_size,
      "skipped_train_records": round(float(trainer.skipped_records.read_value())),
      # Over the timed loops: all but the first, which includes tracing.
      "examples_per_second": (sum(s.num_steps for s in loops) * config.global_batch_size / timed
                              if timed else None),
      "input_wait_fraction": (sum(s.input_seconds for s in loops) / timed
                              if timed and trainer.times_input else None),
      "flop_utilization": (sum(s.flop_utilization * s.seconds for s in loops) / timed
                           if timed and peak_flops else None),
      "gmacs_per_image": macs / 1e9,
      "peak_gflops": peak_flops / 1e9,
      "cpu_kernels": perf.cpu_kernels(),
      "strategy": strategy_lib.kind_of(strategy),
      "num_replicas": strategy.num_replicas_in_sync,
      "model": config.model,
      "resnet_variant": config.resnet_variant,
      "dataset": config.dataset,
      "dtype": config.dtype,
      "global_batch_size": config.global_batch_size,
      "trainable_parameters": num_params,
      "model_dir": model_dir,
  }
  if chief:
    with tf.io.gfile.GFile(os.path.join(model_dir, checkpoints.SUMMARY_FILE), "w") as f:
      json.dump(summary, f, indent=2)
    monitor.log(
        f"done: {step} steps, eval top-1 {summary['eval_top1']}"
        + (f", {summary['examples_per_second']:.0f} images/s" if timed else "") + "\n"
        f"checkpoints in {manager.directory}, summary in "
        f"{os.path.join(model_dir, checkpoints.SUMMARY_FILE)}\n"
        f"look at the run: tensorboard --logdir {model_dir}")
  return summary


def _last_good(manager):
  if manager.latest_checkpoint:
    return f"the last good checkpoint is {manager.latest_checkpoint}"
  return "no checkpoint was saved before it"


def _first_images(source, input_config):
  """A training batch as the model sees it, for TensorBoard: the stream's
  first, so a resumed streamed dataset does not skip up to an epoch of raw
  records for it, and a small shuffle buffer, so it does not fill 10,000."""
  config = dataclasses.replace(input_config, shuffle_buffer=1, strict=False)
  dataset = data.train_dataset_fn(source, source.train_split, config)(
      tf.distribute.InputContext())
  return next(iter(dataset.take(1)))[0]


def _next_stop(step, total_steps, steps_per_loop, eval_every, checkpoint_every, extra=()):
  """The step at which the host loop next returns to Python: the first of the
  end, the loop length, an evaluation, a checkpoint or a profile boundary."""
  stops = [total_steps, (step // steps_per_loop + 1) * steps_per_loop]
  for every in (eval_every, checkpoint_every):
    if every:
      stops.append((step // every + 1) * every)
  stops += [s for s in extra if s > step]
  return min(stops)
