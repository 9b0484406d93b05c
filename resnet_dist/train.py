"""The training path: replica step -> host loop -> checkpoints and summaries.

run(config) builds everything inside the strategy's scope, resumes from
model_dir if a checkpoint is there, trains, evaluates, and returns (and
writes) the run's summary.
"""

import contextlib
import datetime
import json
import math
import os
import re
import signal
import threading
import time

import keras
import tensorflow as tf

from resnet_dist import data, models, optim
from resnet_dist import strategy as strategy_lib
from resnet_dist.config import Config
from resnet_dist.errors import ConfigError, DataError

SUMMARY_FILE = "summary.json"
RUN_FILE = "run.json"  # what a model_dir's checkpoints hold; checked on resume
CLASSES_FILE = "classes.json"  # label id -> class name


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint was saved at the step boundary that followed."""


class _SigtermFlag:
  """Turns SIGTERM into a request the host loop honours at its next boundary."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def log(message, chief=True):
  if chief:
    print(message, flush=True)


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
    values = {k: float(v.read_value()) for k, v in self.sums.items()}
    count = max(values.pop("count"), 1.0)
    return {**{k: v / count for k, v in values.items()}, "count": count}

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
        total_steps, config.warmup_epochs, config.lr_schedule)
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

  def replica_step(self, images, labels, skipped):
    """Forward, backward, all-reduce, update: one replica's part of one step.

    skipped: per example, the bad records the input skipped just before it.
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
    context = tf.distribute.get_replica_context()
    if context.num_replicas_in_sync > 1:
      grads = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
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

  def eval_step(self, images, labels, weights):
    logits = self.model(self._normalize(images), training=False)
    per_example = cross_entropy(labels, logits, self.num_classes)
    self.eval_metrics.update(labels, logits, per_example, weights)

  @tf.function
  def weights_finite(self):
    """Checked before every save, so a checkpoint never holds inf or NaN weights."""
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in self.model.variables])

  @tf.function
  def train_loop(self, iterator, num_steps):
    """num_steps steps in one tf.function: neither TPUs nor small models wait on Python."""
    for _ in tf.range(num_steps):
      self.strategy.run(self._compiled_step, args=next(iterator))

  @tf.function
  def eval_loop(self, iterator, num_steps):
    for _ in tf.range(num_steps):
      self.strategy.run(self.eval_step, args=next(iterator))


def model_state(model):
  """Every model variable by its Keras path, for tf.train.Checkpoint.

  Checkpointing the keras.Model object itself misses the layers a block keeps
  in Python lists, BatchNorm moving statistics among them; naming each
  variable explicitly saves all of them, under readable keys such as
  model/layer1.0/bn1/moving_mean.
  """
  return {v.path: optim.plain_variable(v) for v in model.variables}


def _resolve_model_dir(config):
  if config.model_dir:
    return config.model_dir
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  name = config.dataset.replace(":", "-").replace("/", "-")
  return os.path.join("runs", f"{config.model}-{name}-{stamp}")


def _check_writable(model_dir):
  try:
    tf.io.gfile.makedirs(model_dir)
    probe = os.path.join(model_dir, ".write_test")
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("ok")
    tf.io.gfile.remove(probe)
  except (tf.errors.OpError, OSError) as e:
    raise ConfigError(f"--model_dir={model_dir} is not writable ({e})") from None


def _checkpoint_managers(checkpoint, strategy, model_dir, keep):
  """(restore manager, save manager).

  Every worker restores from the chief's checkpoints. Saving is collective, so
  all workers save, but only the chief into model_dir/checkpoints; the others
  write to a scratch dir of their own.
  """
  real = tf.train.CheckpointManager(
      checkpoint, os.path.join(model_dir, "checkpoints"), max_to_keep=keep)
  if strategy_lib.is_chief(strategy):
    return real, real
  task_type, task_id = strategy_lib.task_info(strategy)
  scratch = tf.train.CheckpointManager(
      checkpoint, os.path.join(model_dir, "scratch", f"{task_type}_{task_id}"), max_to_keep=1)
  return real, scratch


def _check_same_model(model_dir, config, num_classes, chief):
  """A model_dir resumes only the model it was made for; says what differs."""
  path = os.path.join(model_dir, RUN_FILE)
  this = {"model": config.model, "resnet_variant": config.resnet_variant,
          "num_classes": num_classes}
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      saved = json.load(f)
    differs = [f"{k} {saved.get(k)} there, {v} here" for k, v in this.items()
               if saved.get(k) != v]
    if differs:
      raise ConfigError(f"--model_dir={model_dir} holds checkpoints of another model "
                        f"({'; '.join(differs)}); use a new --model_dir")
  elif chief:
    with tf.io.gfile.GFile(path, "w") as f:
      json.dump(this, f)


def _restore_latest(checkpoint, manager, chief):
  """Restores the newest readable checkpoint; a corrupt one is skipped with a warning."""
  for path in reversed(manager.checkpoints):
    try:
      checkpoint.restore(path).assert_existing_objects_matched()
      return path
    except Exception as e:  # pylint: disable=broad-except
      # A truncated file surfaces as OpError, IndexError or ValueError, by where it is cut.
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      log(f"warning: cannot read checkpoint {path} ({reason}); trying the one before", chief)
  return None


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


def run(config: Config, strategy=None):
  """Trains (or resumes) a run; returns the summary written to model_dir/summary.json."""
  validate(config)
  if strategy is None:
    strategy = strategy_lib.create_strategy(
        config.strategy, config.num_gpus, config.num_cpu_devices, config.tpu,
        config.tpu_zone, config.gcp_project, config.collective_timeout_seconds)
  chief = strategy_lib.is_chief(strategy)
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  keras.utils.set_random_seed(config.seed)

  data.check_batch_divides(config.global_batch_size, strategy.num_replicas_in_sync)
  source = data.get_source(config.dataset, config.data_dir, config.download,
                           config.num_classes, config.image_size, config.cache_data)
  train_size = source.split(source.train_split).num_examples
  eval_split = source.split(source.eval_split)
  eval_size = eval_split.num_examples
  eval_steps = data.eval_steps(eval_split, config.global_batch_size,
                               strategy_lib.num_input_pipelines(strategy))
  steps_per_epoch = max(train_size // config.global_batch_size, 1)
  total_steps = config.train_steps or math.ceil(config.train_epochs * steps_per_epoch)
  model_dir = _resolve_model_dir(config)
  if chief:
    _check_writable(model_dir)
  _check_same_model(model_dir, config, source.num_classes, chief)
  _save_class_names(model_dir, source, chief)

  trainer = Trainer(config, strategy, source, steps_per_epoch, total_steps)
  checkpoint = tf.train.Checkpoint(model=model_state(trainer.model), optimizer=trainer.optimizer,
                                   skipped_records=trainer.skipped_records,
                                   **({"loss_scale": trainer.loss_scale} if trainer.loss_scale else {}))
  restore_manager, manager = _checkpoint_managers(
      checkpoint, strategy, model_dir, config.keep_checkpoints)
  restored = _restore_latest(checkpoint, restore_manager, chief)
  start_step = int(trainer.step.numpy())

  num_params = sum(int(tf.size(v)) for v in trainer.variables)
  log(_describe_run(config, strategy, source, train_size, eval_size, num_params,
                    steps_per_epoch, total_steps, model_dir), chief)
  if start_step:
    log(f"resuming from step {start_step} ({restored})", chief)

  input_config = data.InputConfig(config.global_batch_size, config.image_size, config.seed,
                                  config.shuffle_buffer, config.strict_data)
  input_options = strategy_lib.input_options(strategy)
  train_iterator = iter(strategy.distribute_datasets_from_function(
      data.train_dataset_fn(source, source.train_split, input_config, start_step),
      options=input_options))

  writer, eval_writer = (
      (tf.summary.create_file_writer(os.path.join(model_dir, "train")),
       tf.summary.create_file_writer(os.path.join(model_dir, "eval"))) if chief
      else (tf.summary.create_noop_writer(), tf.summary.create_noop_writer()))
  eval_every = (round(config.epochs_between_evals * steps_per_epoch)
                if config.epochs_between_evals > 0 else 0)

  def evaluate():
    trainer.eval_metrics.reset()
    dataset = strategy.distribute_datasets_from_function(
        data.eval_dataset_fn(source, source.eval_split, input_config), options=input_options)
    with _data_errors(source.num_classes):
      trainer.eval_loop(iter(dataset), tf.constant(eval_steps))
    result = {**trainer.eval_metrics.result(), "step": int(trainer.step.numpy())}
    log(f"eval at step {result['step']}: loss {result['loss']:.4f} "
        f"top-1 {result['top1']:.4f} top-5 {result['top5']:.4f} "
        f"over {int(result['count'])} examples"
        + (f" ({eval_size - int(result['count'])} undecodable, skipped)"
           if int(result["count"]) < eval_size else ""), chief)
    with eval_writer.as_default(step=result["step"]):
      for key in ("loss", "top1", "top5"):
        tf.summary.scalar(key, result[key])
    return result

  with _SigtermFlag() as sigterm:
    step = start_step
    throughput = []
    last = {"loss": float("nan"), "top1": float("nan")}
    eval_result = None
    while step < total_steps:
      num_steps = _next_stop(step, total_steps, config.steps_per_loop, eval_every,
                             config.checkpoint_every_steps) - step
      trainer.train_metrics.reset()
      trainer.grad_norm_sum.assign(0.0)
      began = time.perf_counter()
      with _data_errors(source.num_classes):
        trainer.train_loop(train_iterator, tf.constant(num_steps))
      last = trainer.train_metrics.result()
      elapsed = time.perf_counter() - began
      previous, step = step, int(trainer.step.numpy())
      examples_per_second = num_steps * config.global_batch_size / elapsed
      if previous != start_step:  # the first loop includes tracing
        throughput.append(examples_per_second)
      lr = trainer.schedule.value_at(step - 1)
      _write_train_summaries(writer, step, trainer, last, lr, examples_per_second,
                             elapsed / num_steps, num_steps)
      if not math.isfinite(last["loss"]):
        raise FloatingPointError(f"non-finite training loss at step {step}; "
                                 f"the last good checkpoint is {manager.latest_checkpoint}")
      if step // config.log_every_steps != previous // config.log_every_steps or step == total_steps:
        remaining = (total_steps - step) * config.global_batch_size / max(examples_per_second, 1e-9)
        log(f"step {step}/{total_steps} epoch {step / steps_per_epoch:.1f} "
            f"loss {last['loss']:.4f} top-1 {last['top1']:.3f} lr {lr:.4g} "
            f"{examples_per_second:.0f} images/s ETA {datetime.timedelta(seconds=round(remaining))}",
            chief)
      at_eval = eval_every and step % eval_every == 0
      at_checkpoint = config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
      if at_eval or at_checkpoint or step == total_steps or sigterm.requested:
        if not bool(trainer.weights_finite()):
          raise FloatingPointError(f"non-finite weights at step {step}; "
                                   f"the last good checkpoint is {manager.latest_checkpoint}")
        manager.save(checkpoint_number=step)
      if sigterm.requested and step < total_steps:
        log(f"SIGTERM: saved a checkpoint at step {step}; run again to resume", chief)
        raise Preempted(step)
      if at_eval and not config.skip_eval and step < total_steps:
        eval_result = evaluate()
    if not config.skip_eval and (eval_result is None or eval_result["step"] != step):
      eval_result = evaluate()
  writer.flush()
  eval_writer.flush()

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
      "examples_per_second": (sum(throughput) / len(throughput)) if throughput else None,
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
    with tf.io.gfile.GFile(os.path.join(model_dir, SUMMARY_FILE), "w") as f:
      json.dump(summary, f, indent=2)
    log(f"done: {step} steps, eval top-1 {summary['eval_top1']}, "
        f"checkpoints in {manager.directory}\n"
        f"look at the run: tensorboard --logdir {model_dir}", chief)
  return summary


@contextlib.contextmanager
def _data_errors(num_classes):
  """The input pipeline's checks (data.BAD_IMAGE, data.BAD_LABEL) as one-line DataErrors."""
  try:
    yield
  except tf.errors.InvalidArgumentError as e:
    # tf.debugging.Assert prints its data as "[marker] [value] ... [record name]".
    for marker in (data.BAD_IMAGE, data.BAD_LABEL):
      if marker in e.message:
        fields = re.findall(r"\[(.*?)\]", e.message[e.message.index(marker) - 1:].splitlines()[0])
        if marker == data.BAD_IMAGE:
          raise DataError(f"undecodable image: {fields[-1]} (--strict_data stops at "
                          "such images; without it they are skipped and counted)") from None
        raise DataError(f"label {fields[1]} is outside 0..{num_classes - 1}: "
                        f"{fields[-1]}") from None
    decoder = re.search(r"Invalid (JPEG|PNG) data[^\n\[]*", e.message)
    if decoder:  # complete-looking but corrupt inside: the decoder does not name the file
      raise DataError(f"undecodable image ({decoder.group(0).strip()}); --strict_data stops "
                      "at such images, without it they are skipped and counted") from None
    raise


def _save_class_names(model_dir, source, chief):
  """Label id -> class name, logged (image folders) and kept in model_dir/classes.json."""
  if not (chief and source.class_names):
    return
  with tf.io.gfile.GFile(os.path.join(model_dir, CLASSES_FILE), "w") as f:
    json.dump(list(source.class_names), f, indent=0)
  if source.name.startswith("folder:"):
    shown = ", ".join(f"{i}={name}" for i, name in enumerate(source.class_names[:20]))
    more = f", ... ({len(source.class_names)} in all)" if len(source.class_names) > 20 else ""
    log(f"label ids: {shown}{more} (saved in {CLASSES_FILE})")


def _describe_run(config, strategy, source, train_size, eval_size, num_params,
                  steps_per_epoch, total_steps, model_dir):
  """The block printed at start: what runs where, on what, for how long."""
  per_replica = config.global_batch_size // strategy.num_replicas_in_sync
  return (
      f"strategy {strategy_lib.kind_of(strategy)}: {strategy.num_replicas_in_sync} replica(s) "
      f"on {', '.join(strategy_lib.replica_devices(strategy))}\n"
      f"model {config.model} ({config.resnet_variant}), {num_params:,} trainable parameters, "
      f"dtype {config.dtype}\n"
      f"dataset {config.dataset}: {train_size} train / {eval_size} eval examples, "
      f"{source.num_classes} classes, image {config.image_size}x{config.image_size}\n"
      f"global batch {config.global_batch_size} ({per_replica} per replica), "
      f"{total_steps} steps ({total_steps / steps_per_epoch:.1f} epochs)\n"
      f"model_dir {model_dir}")


def _next_stop(step, total_steps, steps_per_loop, eval_every, checkpoint_every):
  """The step at which the host loop next returns to Python: the first of the
  end, the loop length, an evaluation or a checkpoint."""
  stops = [total_steps, (step // steps_per_loop + 1) * steps_per_loop]
  for every in (eval_every, checkpoint_every):
    if every:
      stops.append((step // every + 1) * every)
  return min(stops)


def _write_train_summaries(writer, step, trainer, metrics, lr, examples_per_second,
                           step_seconds, num_steps):
  """One point per host loop: never per step inside the loop."""
  with writer.as_default(step=step):
    tf.summary.scalar("loss", metrics["loss"])
    tf.summary.scalar("top1", metrics["top1"])
    tf.summary.scalar("top5", metrics["top5"])
    tf.summary.scalar("learning_rate", lr)
    tf.summary.scalar("examples_per_second", examples_per_second)
    tf.summary.scalar("step_time_ms", 1000 * step_seconds)
    tf.summary.scalar("gradient_norm", float(trainer.grad_norm_sum.read_value()) / num_steps)
    tf.summary.scalar("skipped_records", trainer.skipped_records.read_value())
    if trainer.loss_scale is not None:
      tf.summary.scalar("loss_scale", trainer.loss_scale.scale.read_value())
