"""One step of training, as every replica runs it.

A step, on each replica: normalise the batch; random erasing, then mixup or
CutMix (data/mixing.py); forward and backward; with --grad_accum_steps=N,
add the gradients to this replica's accumulators and repeat for N
micro-batches; all-reduce the gradients and update; every ema_every_steps
updates, move the EMA of the weights towards them (trainer.WeightAverage).

ReplicaStep holds what a step updates besides the model and the optimizer:
the training metrics, the gradient norm, the records skipped, fp16's loss
scale and the accumulators. trainer.Trainer runs it in its loops.
"""

import tensorflow as tf

from resnet_dist import data, losses, models, optim
from resnet_dist.data import mixing, seeds


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


class ReplicaStep:
  """The replica step of one run, its variables created in the strategy's
  scope (the caller's). xla_scope: what XLA compiles (strategy.xla_scope):
  "step", the whole step; "gradients", only its forward and backward, the
  all-reduce and update left outside; "", nothing."""

  def __init__(self, config, source, model, *, optimizer, learning_rate, all_reduce, ema,
               xla_scope):
    self.config, self.source, self.model = config, source, model
    self.variables = model.trainable_variables
    self.num_classes = source.num_classes
    self.optimizer, self.learning_rate = optimizer, learning_rate
    self.all_reduce, self.ema = all_reduce, ema
    self.loss = losses.per_example_loss(config.optim)
    self.loss_scale = optim.DynamicLossScale() if config.model.dtype == "fp16" else None
    self.train_metrics = Metrics("train_metrics")
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
    jit = lambda f: tf.function(f, jit_compile=True)
    whole = jit if xla_scope == "step" else (lambda f: f)
    self._compiled_gradients = jit(self._gradients) if xla_scope == "gradients" else (
        self._gradients)
    self.compiled_step = whole(self.replica_step)
    self.compiled_accumulate = whole(self.accumulate_step)
    self.compiled_apply = whole(self.apply_accumulated)

  def normalize(self, images):
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
      images = mixing.random_erasing(images, self._step_seed(micro, seeds.ERASING),
                                     options.random_erasing, options.random_erasing_fill)
    if options.mixes:
      images, targets = mixing.mix(images, targets, self._step_seed(micro, seeds.MIXING),
                                   mixup_alpha=options.mixup_alpha,
                                   cutmix_alpha=options.cutmix_alpha)
    return images, targets

  def _gradients(self, images, labels, skipped, micro):
    """This replica's gradients of its share of the step's loss, on one
    (micro-)batch; counts the batch in the training metrics. With loss
    scaling the gradients are scaled."""
    config = self.config
    images, targets = self._regularize(self.normalize(images),
                                       tf.one_hot(labels, self.num_classes), micro)
    drop_path_seed = self._step_seed(micro, seeds.DROP_PATH)  # --drop_path_rate's
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
    lr = self.learning_rate(self.optimizer.iterations)
    step = self.optimizer.apply(grads, lr, apply)
    self.grad_norm_sum.assign_add(tf.linalg.global_norm(grads))
    if self.ema is not None:
      self.ema.update(step)
    return stops[0] > 0

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
