"""The loops of training steps, and what they train.

Trainer owns the model (and its EMA), the optimizer, the replica step
(replica_step.py) and train_loop(): many steps in one tf.function. The host
loop (host_loop.py) asks it for N steps through train(), which returns what
they did (Steps); when to save, evaluate or stop is the host loop's.
Evaluation's steps are evaluation.py's.
"""

import dataclasses
import time
from typing import Optional

import keras
import tensorflow as tf

from resnet_dist import checkpoints, distributed_input, models, optim
from resnet_dist import strategy as strategy_lib
from resnet_dist.config import Config
from resnet_dist.replica_step import ReplicaStep


def _op_determinism_enabled():
  """Whether this process runs with op determinism: once turned on (by an
  earlier --deterministic run too) it stays on, and TensorFlow refuses the
  train loop's timestamps. The process's state, not a run's flag, decides."""
  from tensorflow.python.framework import config as tf_config  # pylint: disable=g-import-not-at-top
  return getattr(tf_config, "is_op_determinism_enabled", lambda: False)()


def build_models(config, num_classes):
  """The model and, with --ema_decay, the model that holds the EMA of its
  weights and BN statistics (in float32 like the weights). Keras draws the
  initial weights' seeds from Python's `random`, which whatever ran since
  start-up has advanced (preparing a dataset does, in whichever worker
  prepares it): seeded here, the weights depend on --seed alone."""
  keras.utils.set_random_seed(config.execution.seed)
  model, data_config = config.model, config.data

  def build():
    return models.get_model(
        model.name, num_classes=num_classes, variant=model.resnet_variant,
        sync_bn=model.sync_bn, zero_init_residual=model.zero_init_residual,
        drop_path_rate=model.drop_path_rate,
        # A fixed input size where training and evaluation share one.
        image_size=data_config.image_size if data_config.fixed_size else None,
        dtype=model.dtype_policy)

  first = build()
  return first, (build() if config.optim.ema_decay else None)


class WeightAverage:
  """The EMA of a model's weights (--ema_decay), moved in the replica step on
  each replica's copies: every ema_every_steps steps by
  ema_decay**ema_every_steps; during the learning-rate warmup it copies the
  weights, as torchvision's does."""

  def __init__(self, model, average, optim_config, warmup_steps):
    self.model, self.average = model, average
    self.decay, self.every = optim_config.ema_decay, optim_config.ema_every_steps
    self.warmup_steps = warmup_steps

  def reset(self):
    """Starts the average at the current weights."""
    self._move(0.0)

  def update(self, step):
    decay = tf.where(step <= self.warmup_steps, 0.0, self.decay ** self.every)
    tf.cond(step % self.every == 0, lambda: self._move(decay), lambda: None)

  def _move(self, decay):
    """average <- decay * average + (1 - decay) * weights."""
    for average, value in zip(self.average.variables, self.model.variables):
      average = models.plain_variable(average)
      average.assign(decay * average + (1.0 - decay) * models.plain_variable(value))


def statistics_averaging(strategy, moving_statistics):
  """A tf.function that gives every replica the mean of the replicas' BN
  moving statistics, in one all-reduce: before evaluations and saves (see
  layers.BatchNorm)."""
  def average():  # in replica context, where a variable reads as this replica's copy
    local = [tf.reshape(tf.convert_to_tensor(v), [-1]) for v in moving_statistics]
    mean = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.MEAN, tf.concat(local, axis=0))
    for variable, value in zip(moving_statistics,
                               tf.split(mean, [int(v.shape[0]) for v in local])):
      variable.assign(tf.reshape(value, variable.shape))

  @tf.function
  def sync():
    if strategy.num_replicas_in_sync > 1 and moving_statistics:
      strategy.run(average)

  return sync


@dataclasses.dataclass(frozen=True)
class Steps:
  """What one Trainer.train() did: the host loop's only view of the steps."""
  step: int                       # the global step after them
  num_steps: int
  seconds: float                  # wall time, tracing included on the first call
  metrics: dict                   # loss, top1, top5, count over their examples
  grad_norm: float                # the mean of their global gradient norms
  input_seconds: Optional[float]  # of `seconds`, waiting for input; None: not timed
  skipped_records: float          # the run's records skipped as undecodable, so far
  loss_scale: Optional[float]     # fp16's dynamic loss scale after them
  stopped: bool                   # a stop asked of some process ended them early


class Trainer:
  """Model, optimizer and step functions of one run, built in the strategy's scope."""

  def __init__(self, config: Config, strategy, source, steps_per_epoch, total_steps):
    self.config = config
    self.strategy = strategy
    self.source = source
    self.num_classes = source.num_classes
    self.steps_per_epoch = steps_per_epoch
    self.total_steps = total_steps
    self.learning_rate = optim.LearningRate.of(
        config.optim, config.schedule.global_batch_size, steps_per_epoch, total_steps)
    with strategy.scope():
      self.model, self.ema_model = build_models(config, self.num_classes)
      self.variables = self.model.trainable_variables
      self.all_reduce = strategy_lib.gradient_all_reduce(config.distribute, strategy)
      self.optimizer = optim.create_optimizer(
          config.optim, self.variables, models.weight_decay_variables(self.model))
      self.ema = (WeightAverage(self.model, self.ema_model, config.optim,
                                self.learning_rate.warmup_steps)
                  if self.ema_model is not None else None)
      # What XLA compiles (strategy.xla_scope): the whole step, or only its
      # forward and backward, the all-reduce and update left outside.
      self.xla_scope = (strategy_lib.xla_scope(strategy, config.model.sync_bn)
                        if config.execution.enable_xla else "")
      self.replica = ReplicaStep(config, source, self.model, optimizer=self.optimizer,
                                 learning_rate=self.learning_rate, all_reduce=self.all_reduce,
                                 ema=self.ema, xla_scope=self.xla_scope)
    # Host-side: seconds the train loop waited for input (see train_loop).
    self.times_input = (not _op_determinism_enabled()
                        and distributed_input.input_wait_measurable(strategy))
    self.input_seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False)
    # Host-side, this process's own: set when a SIGTERM or SIGINT asks the run
    # to stop (preemption.StopRequest); every step reads it.
    self.stop_requested = tf.Variable(False, trainable=False)
    self.moving_statistics = models.moving_statistics(self.model) + (
        models.moving_statistics(self.ema_model) if self.ema_model is not None else [])
    self.sync_moving_statistics = statistics_averaging(strategy, self.moving_statistics)

  @property
  def step(self):
    return self.optimizer.iterations

  def checkpoint_state(self):
    """What a checkpoint holds to resume this run exactly, for tf.train.Checkpoint."""
    state = {checkpoints.MODEL_KEY: checkpoints.model_state(self.model),
             "optimizer": self.optimizer, "skipped_records": self.replica.skipped_records}
    if self.replica.loss_scale is not None:
      state["loss_scale"] = self.replica.loss_scale
    if self.ema_model is not None:
      state[checkpoints.EMA_KEY] = checkpoints.model_state(self.ema_model)
    return state

  @tf.function
  def reset_ema(self):
    """Starts the EMA at the current weights (a new run, after its initial weights)."""
    if self.ema is not None:
      self.strategy.run(self.ema.reset)

  @tf.function
  def weights_finite(self):
    """Checked before every save, so a checkpoint never holds inf or NaN weights."""
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in self.model.variables])

  def train(self, iterator, num_steps):
    """Runs up to num_steps steps (train_loop) and returns what they did."""
    replica = self.replica
    replica.train_metrics.reset()
    replica.grad_norm_sum.assign(0.0)
    self.input_seconds.assign(0.0)
    first = int(self.step.numpy())
    began = time.perf_counter()
    stopped = bool(self.train_loop(iterator, tf.constant(num_steps)))
    seconds = time.perf_counter() - began
    step = int(self.step.numpy())
    return Steps(
        step=step, num_steps=step - first, seconds=seconds,
        metrics=replica.train_metrics.result(),
        grad_norm=float(replica.grad_norm_sum.read_value()) / max(step - first, 1),
        input_seconds=float(self.input_seconds.numpy()) if self.times_input else None,
        skipped_records=self.skipped_total(),
        loss_scale=(float(replica.loss_scale.scale.read_value()) if replica.loss_scale
                    else None),
        stopped=stopped)

  def skipped_total(self):
    """The records the input skipped as undecodable over the whole run."""
    return float(self.replica.skipped_records.read_value())

  @tf.function
  def train_loop(self, iterator, num_steps):
    """Up to num_steps steps in one tf.function: neither TPUs nor small models
    wait on Python. Returns whether it stopped early because some process was
    asked to stop (every worker stops after the same step).

    The steps run in blocks of --stop_check_steps, whose loop's condition
    reads only its counter: no step waits for the one before to reach the
    host, so input, dispatch and device work overlap. Each step's answer to
    the stop request is kept, and read between blocks.

    Timestamps around each next(iterator) add up the time the loop waits for
    input; tf.function runs stateful ops (timestamps, the iterator, variable
    updates) in program order, so no wait overlaps a step. TensorFlow refuses
    timestamps under op determinism, so runs in a process that turned it on
    (--deterministic, in this run or an earlier one) go untimed, as do runs
    over several logical CPU devices (input_wait_measurable).
    """
    block = self.config.schedule.stop_check_steps
    stopping = tf.constant(False)
    for start in tf.range(0, num_steps, block):
      for _ in tf.range(tf.minimum(block, num_steps - start)):
        stopping = tf.logical_or(stopping, self._step(iterator))
      if stopping:
        break
    return stopping

  def _step(self, iterator):
    """One training step on every replica; whether some process asked to stop."""
    if self.config.schedule.grad_accum_steps == 1:
      stops = self.strategy.run(self.replica.compiled_step,
                                args=(*self._next(iterator), self.stop_requested.read_value()))
    else:
      for micro in tf.range(self.config.schedule.grad_accum_steps):
        self.strategy.run(self.replica.compiled_accumulate, args=(*self._next(iterator), micro))
      stops = self.strategy.run(self.replica.compiled_apply,
                                args=(self.stop_requested.read_value(),))
    return self.strategy.experimental_local_results(stops)[0]

  def _next(self, iterator):
    """next(iterator), adding the time it waits to input_seconds where it can."""
    if not self.times_input:
      return next(iterator)
    asked = tf.timestamp()
    batch = next(iterator)
    with tf.control_dependencies(tf.nest.flatten(batch, expand_composites=True)):
      self.input_seconds.assign_add(tf.timestamp() - asked)
    return batch
