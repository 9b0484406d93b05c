"""Evaluation, in one place: the eval step, its loop, a whole split's result,
and evaluate(), which scores a checkpoint on its own.

A split is evaluated exactly once per example (data.eval_dataset_fn pads
every pipeline to the same whole number of batches with zero-weight
examples), with the replicas' BatchNorm statistics averaged first, of the
weights or of their EMA.
"""

import dataclasses

import tensorflow as tf

from resnet_dist import checkpoints, data, losses, run_setup
from resnet_dist import distributed_input
from resnet_dist import strategy as strategy_lib
from resnet_dist.config import Config
from resnet_dist.errors import DataError
from resnet_dist.replica_step import Metrics
from resnet_dist.trainer import Trainer


class Evaluator:
  """The evaluation of a Trainer's model (or its EMA), over whole splits."""

  def __init__(self, trainer):
    self.trainer = trainer
    with trainer.strategy.scope():
      self.metrics = Metrics("eval_metrics")
    # Whether this process can stop an evaluation by itself (a signal to it):
    # where other workers learn of a stop only inside a training step, each
    # finishes the evaluation and all stop at that step.
    self.stops_alone = strategy_lib.stops_alone(trainer.strategy)

  def evaluate(self, source, split_name, spec, ema=False):
    """Loss, top-1, top-5 and count over a whole split, and the step."""
    trainer, strategy = self.trainer, self.trainer.strategy
    split = source.split(split_name)
    steps = data.eval_steps(split, spec.global_batch_size,
                            strategy_lib.num_input_pipelines(strategy))
    self.metrics.reset()
    trainer.sync_moving_statistics()
    dataset = distributed_input.distribute_input(strategy,
                                            data.eval_dataset_fn(source, split_name, spec))
    with data.data_errors(source.num_classes):
      self.eval_loop(iter(dataset), tf.constant(steps), ema)
    result = self.metrics.result()
    if not result["count"] and not bool(trainer.stop_requested.numpy()):  # (stopped: nothing read)
      raise DataError(f"no image of the {split_name} split ({split.num_examples} records) "
                      f"could be decoded")
    return {**result, "step": int(trainer.step.numpy())}

  def eval_step(self, images, labels, weights, ema=False):
    trainer = self.trainer
    model = trainer.ema_model if ema else trainer.model
    source = trainer.source
    logits = model(data.normalize(images, source.mean, source.std, model.compute_dtype),
                   training=False)
    # Softmax cross-entropy whatever --loss is: eval losses compare across recipes.
    per_example = losses.cross_entropy(tf.one_hot(labels, trainer.num_classes), logits)
    self.metrics.update(labels, logits, per_example, weights)

  @tf.function
  def eval_loop(self, iterator, num_steps, ema=False):
    """ema: evaluate the EMA of the weights instead of the weights. A stop
    asked of this process ends the loop before its next step, where this
    process can stop alone (see stops_alone)."""
    for _ in tf.range(num_steps):
      if self.stops_alone and self.trainer.stop_requested:
        break
      self.trainer.strategy.run(self.eval_step, args=next(iterator), kwargs={"ema": ema})


def eval_input(config, spec):
  """Evaluation reads its split here, exactly once, with or without a service."""
  return dataclasses.replace(spec, image_size=config.data.eval_size, data_service="")


def evaluate(config: Config, checkpoint_path, split_name=None, strategy=None, use_ema=False):
  """Evaluates the model of a checkpoint on a split (default: the eval split);
  use_ema: the EMA of its weights, which the checkpoint must hold."""
  config.validate()
  strategy = strategy or run_setup.create_strategy(config)
  source = run_setup.open_source(config, strategy)
  split_name = split_name or source.eval_split
  trainer = Trainer(config.replace(ema_decay=0.0), strategy, source,
                    steps_per_epoch=1, total_steps=1)
  checkpoints.restore_model(trainer.model, checkpoint_path,
                            checkpoints.EMA_KEY if use_ema else checkpoints.MODEL_KEY)
  result = Evaluator(trainer).evaluate(source, split_name,
                                       eval_input(config, run_setup.input_spec(config)))
  result.update(checkpoint=checkpoint_path, split=split_name,
                split_examples=source.split(split_name).num_examples)
  del result["step"]
  return result
