"""One step of training, as every replica runs it, and the loops around it.

Trainer owns the model, the optimizer and what a step updates: replica_step()
(forward, backward, the gradients' all-reduce, update), train_loop() and eval_loop()
(many steps in one tf.function), and the BN statistics sync before a save or
an evaluation. When to save, evaluate or stop is the host loop's (train.py).

A step, on each replica: normalise the batch; random erasing, then mixup or
CutMix (data/mixing.py); forward and backward; with --grad_accum_steps=N,
add the gradients to this replica's accumulators and repeat for N
micro-batches; all-reduce the gradients and update; every ema_every_steps
updates, move the EMA of the weights (ema_model) towards them.
"""

import keras
import tensorflow as tf

from resnet_dist import checkpoints, data, losses, models, optim
from resnet_dist import strategy as strategy_lib
from resnet_dist.config import Config
from resnet_dist.data import mixing

# Seeds of the replica step's random draws (erasing, mixing): (salt, counter).
_ERASE_SALT = 0xE4A5E
_MIX_SALT = 0x313C5
_DROP_PATH_SALT = 0xD4095


def _op_determinism_enabled():
  """Whether this process runs with op determinism: once turned on (by an
  earlier --deterministic run too) it stays on, and TensorFlow refuses the
  train loop's timestamps. The process's state, not a run's flag, decides."""
  from tensorflow.python.framework import config as tf_config  # pylint: disable=g-import-not-at-top
  return getattr(tf_config, "is_op_determinism_enabled", lambda: False)()


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
    self.loss = losses.per_example_loss(config.optim)
    self.steps_per_epoch = steps_per_epoch
    self.total_steps = total_steps
    self.schedule = optim.LearningRate.of(config.optim, config.schedule.global_batch_size,
                                          steps_per_epoch, total_steps)
    with strategy.scope():
      self.model, self.ema_model = self._build_models()
      self.variables = self.model.trainable_variables
      self.all_reduce = strategy_lib.gradient_all_reduce(config.distribute, strategy)
      self.optimizer = optim.create_optimizer(
          config.optim, self.variables, models.weight_decay_variables(self.model))
      self.loss_scale = optim.DynamicLossScale() if config.model.dtype == "fp16" else None
      self.train_metrics = Metrics("train_metrics")
      self.eval_metrics = Metrics("eval_metrics")
      self.grad_norm_sum = tf.Variable(
          0.0, trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
          aggregation=tf.VariableAggregation.MEAN)
      # Records the input skipped as undecodable, over the whole run (checkpointed).
      self.skipped_records = tf.Variable(
          0.0, trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
          aggregation=tf.VariableAggregation.SUM)
      # Each replica's own sum of its micro-batches' gradients (not checkpointed:
      # a checkpoint falls between updates, where they are zero).
      self.accumulated = [
          tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                      synchronization=tf.VariableSynchronization.ON_READ,
                      aggregation=tf.VariableAggregation.SUM)
          for v in self.variables] if config.schedule.grad_accum_steps > 1 else []
    # Host-side: seconds the train loop waited for input (see train_loop).
    self.times_input = (not _op_determinism_enabled()
                        and strategy_lib.input_wait_measurable(strategy))
    self.input_seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False)
    # Host-side, this process's own: set when a SIGTERM or SIGINT asks the run
    # to stop (preemption.StopRequest); every step reads it.
    self.stop_requested = tf.Variable(False, trainable=False)
    # Whether this process can stop an evaluation by itself: the workers of a
    # multi-worker run learn of a stop only inside a training step's
    # all-reduce, so each finishes the evaluation and all stop at that step.
    self.stops_alone = strategy_lib.kind_of(strategy) != "multi_worker_mirrored"
    self.moving_statistics = models.moving_statistics(self.model)
    if self.ema_model is not None:
      self.moving_statistics += models.moving_statistics(self.ema_model)
    # What XLA compiles (strategy.xla_scope): the whole step, or only its
    # forward and backward, the all-reduce and update left outside.
    self.xla_scope = (strategy_lib.xla_scope(strategy, config.model.sync_bn)
                      if config.execution.enable_xla else "")
    jit = lambda f: tf.function(f, jit_compile=True)
    whole = jit if self.xla_scope == "step" else (lambda f: f)
    self._compiled_gradients = jit(self._gradients) if self.xla_scope == "gradients" else (
        self._gradients)
    self._compiled_step = whole(self.replica_step)
    self._compiled_accumulate = whole(self.accumulate_step)
    self._compiled_apply = whole(self.apply_accumulated)

  def _build_models(self):
    """The model and, with --ema_decay, the EMA of its weights and BN
    statistics (in float32 like the weights). Keras draws the initial
    weights' seeds from Python's `random`, which whatever ran since start-up
    has advanced (preparing a dataset does, in whichever worker prepares it):
    seeded here, the weights depend on --seed alone."""
    keras.utils.set_random_seed(self.config.execution.seed)
    model = self._build_model()
    return model, (self._build_model() if self.config.optim.ema_decay else None)

  def _build_model(self):
    # A fixed input size where training and evaluation share one.
    model, data_config = self.config.model, self.config.data
    return models.get_model(
        model.name, num_classes=self.num_classes, variant=model.resnet_variant,
        sync_bn=model.sync_bn, zero_init_residual=model.zero_init_residual,
        drop_path_rate=model.drop_path_rate,
        image_size=data_config.image_size if data_config.fixed_size else None,
        dtype=model.dtype_policy)

  @property
  def step(self):
    return self.optimizer.iterations

  def checkpoint_state(self):
    """What a checkpoint holds to resume this run exactly, for tf.train.Checkpoint."""
    state = {checkpoints.MODEL_KEY: checkpoints.model_state(self.model),
             "optimizer": self.optimizer, "skipped_records": self.skipped_records}
    if self.loss_scale is not None:
      state["loss_scale"] = self.loss_scale
    if self.ema_model is not None:
      state[checkpoints.EMA_KEY] = checkpoints.model_state(self.ema_model)
    return state

  @tf.function
  def reset_ema(self):
    """Starts the EMA at the current weights (a new run, after its initial weights)."""
    if self.ema_model is not None:
      self.strategy.run(lambda: self._move_ema(0.0))

  def _move_ema(self, decay):
    """ema <- decay * ema + (1 - decay) * weights, on this replica's copies."""
    for average, value in zip(self.ema_model.variables, self.model.variables):
      average = models.plain_variable(average)
      average.assign(decay * average + (1.0 - decay) * models.plain_variable(value))

  def _normalize(self, images):
    return data.normalize(images, self.source.mean, self.source.std, self.model.compute_dtype)

  def _step_seed(self, micro, salt):
    """A stateless seed unique to (--seed, step, micro-batch, replica)."""
    context = tf.distribute.get_replica_context()
    counter = ((self.optimizer.iterations * self.config.schedule.grad_accum_steps
                + tf.cast(micro, tf.int64)) * context.num_replicas_in_sync
               + tf.cast(context.replica_id_in_sync_group, tf.int64))
    return tf.stack([tf.constant(self.config.execution.seed + salt, tf.int64), counter])

  def _regularize(self, images, targets, micro):
    """Random erasing, then mixup or CutMix, as the flags ask."""
    options = self.config.augment
    if options.random_erasing:
      images = mixing.random_erasing(images, self._step_seed(micro, _ERASE_SALT),
                                     options.random_erasing, options.random_erasing_fill)
    if options.mixes:
      images, targets = mixing.mix(images, targets, self._step_seed(micro, _MIX_SALT),
                                   mixup_alpha=options.mixup_alpha,
                                   cutmix_alpha=options.cutmix_alpha)
    return images, targets

  def _gradients(self, images, labels, skipped, micro):
    """This replica's gradients of its share of the step's loss, on one
    (micro-)batch; counts the batch in the training metrics. With loss
    scaling the gradients are scaled."""
    config = self.config
    images, targets = self._regularize(self._normalize(images),
                                       tf.one_hot(labels, self.num_classes), micro)
    drop_path_seed = self._step_seed(micro, _DROP_PATH_SALT)  # --drop_path_rate's
    with tf.GradientTape() as tape, models.drop_path_seed(drop_path_seed):
      logits = self.model(images, training=True)
      per_example = self.loss(targets, logits)
      loss = tf.nn.compute_average_loss(per_example,
                                        global_batch_size=config.schedule.global_batch_size)
      if self.loss_scale is not None:
        loss = loss * self.loss_scale.scale
    grads = tape.gradient(loss, self.variables)
    self.skipped_records.assign_add(tf.cast(tf.reduce_sum(skipped), tf.float32))
    # Mixed targets count against the label that weighs most.
    dominant = tf.argmax(targets, axis=-1) if config.augment.mixes else labels
    self.train_metrics.update(dominant, logits, per_example, tf.ones_like(per_example))
    return grads

  def _update(self, grads, stop_requested):
    """All-reduce, update, EMA. stop_requested: whether this process was asked
    to stop. It travels in the gradients' all-reduce, so every replica of
    every worker learns in the same step that some process was, at no cost of
    its own. Returns that answer."""
    stops = tf.reshape(tf.cast(stop_requested, tf.float32), [1])
    *grads, stops = self.all_reduce.sum([*grads, stops])
    apply = None
    if self.loss_scale is not None:
      grads = [g / self.loss_scale.scale for g in grads]
      apply = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
      self.loss_scale.update(apply)
    lr = self.schedule(self.optimizer.iterations)
    step = self.optimizer.apply(grads, lr, apply)
    self.grad_norm_sum.assign_add(tf.linalg.global_norm(grads))
    if self.ema_model is not None:
      self._update_ema(step)
    return stops[0] > 0

  def _update_ema(self, step):
    """Every ema_every_steps steps, by ema_decay**ema_every_steps; during the
    learning-rate warmup the EMA copies the weights, as torchvision's does."""
    every = self.config.optim.ema_every_steps
    decay = tf.where(step <= self.schedule.warmup_steps, 0.0,
                     self.config.optim.ema_decay ** every)
    tf.cond(step % every == 0, lambda: self._move_ema(decay), lambda: None)

  def replica_step(self, images, labels, skipped, stop_requested):
    """Forward, backward, all-reduce, update: one replica's part of one step.
    skipped: per example, the bad records the input skipped just before it."""
    return self._update(self._compiled_gradients(images, labels, skipped, 0), stop_requested)

  def accumulate_step(self, images, labels, skipped, micro):
    """One micro-batch of an accumulated step: adds its gradients to this replica's sums."""
    for total, grad in zip(self.accumulated,
                           self._compiled_gradients(images, labels, skipped, micro)):
      total.assign_add(grad)

  def apply_accumulated(self, stop_requested):
    """The update of an accumulated step, from the sums; zeroes them."""
    grads = [total.read_value() for total in self.accumulated]
    with tf.control_dependencies(grads):
      for total in self.accumulated:
        total.assign(tf.zeros_like(total))
    return self._update(grads, stop_requested)

  def eval_step(self, images, labels, weights, ema=False):
    model = self.ema_model if ema else self.model
    logits = model(self._normalize(images), training=False)
    # Softmax cross-entropy whatever --loss is: eval losses compare across recipes.
    per_example = losses.cross_entropy(tf.one_hot(labels, self.num_classes), logits)
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
      stops = self.strategy.run(self._compiled_step,
                                args=(*self._next(iterator), self.stop_requested.read_value()))
    else:
      for micro in tf.range(self.config.schedule.grad_accum_steps):
        self.strategy.run(self._compiled_accumulate, args=(*self._next(iterator), micro))
      stops = self.strategy.run(self._compiled_apply, args=(self.stop_requested.read_value(),))
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

  @tf.function
  def eval_loop(self, iterator, num_steps, ema=False):
    """ema: evaluate the EMA of the weights instead of the weights. A stop
    asked of this process (a signal) ends the loop before its next step,
    where this process is the whole run (see stops_alone)."""
    for _ in tf.range(num_steps):
      if self.stops_alone and self.stop_requested:
        break
      self.strategy.run(self.eval_step, args=next(iterator), kwargs={"ema": ema})
