"""One step of training, as every replica runs it, and the loops around it.

Trainer owns the model, the optimizer and what a step updates: replica_step()
(forward, backward, one all-reduce, update), train_loop() and eval_loop()
(many steps in one tf.function), and the BN statistics sync before a save or
an evaluation. When to save, evaluate or stop is the host loop's (train.py).
"""

import tensorflow as tf

from resnet_dist import checkpoints, data, losses, models, optim
from resnet_dist import strategy as strategy_lib
from resnet_dist.config import Config


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
    self.loss = losses.LOSSES[config.loss]
    self.steps_per_epoch = steps_per_epoch
    self.total_steps = total_steps
    self.schedule = optim.LearningRate(
        config.base_learning_rate, config.global_batch_size, steps_per_epoch,
        total_steps, config.warmup_epochs, config.lr_schedule, config.lr_boundary_epochs)
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

  def checkpoint_state(self):
    """What a checkpoint holds to resume this run exactly, for tf.train.Checkpoint."""
    state = {"model": checkpoints.model_state(self.model), "optimizer": self.optimizer,
             "skipped_records": self.skipped_records}
    if self.loss_scale is not None:
      state["loss_scale"] = self.loss_scale
    return state

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
      per_example = self.loss(labels, logits, self.num_classes, config.label_smoothing)
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
    # Softmax cross-entropy whatever --loss is: eval losses compare across recipes.
    per_example = losses.cross_entropy(labels, logits, self.num_classes)
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
