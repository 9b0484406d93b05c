"""Sharded tf.data input for tf.distribute, exact for training and evaluation.

Training: one global order of example indices, an independent permutation per
epoch seeded by (seed, epoch), is cut into global batches of global_batch_size.
Each global batch is cut into one chunk per replica; an input pipeline keeps the
chunks of the replicas it feeds, fetches and augments only those examples, and
batches them at the per-replica size. So the global batch of step s is the same
set of examples for 1 device, N replicas or N workers, and resuming at step s
just starts the index stream at element s * global_batch_size.

Augmentation is stateless, seeded by (seed, position in the global stream):
an example is augmented the same way whichever replica or restart sees it.

Evaluation: the split is padded to whole global batches with examples of
weight 0, so every example counts exactly once and the last batch keeps its
static shape (TPUs need it).
"""

import dataclasses
import math
import os

import tensorflow as tf

from resnet_dist.errors import ConfigError

_AUGMENT_SALT = 0x5EED


def _finish(ds, per_replica_batch, load):
  """Parallel load, batch and prefetch with fixed parallelism.

  tf.data autotuning is off on purpose: in TensorFlow 2.21 an iterator's
  destructor waits for autotuning's optimisation thread, which sleeps up to a
  minute (measured 50 s at the end of a run); the fixed settings below keep
  the cores busy on the pipelines here.
  """
  ds = ds.map(load, num_parallel_calls=os.cpu_count() or 1, deterministic=True)
  ds = ds.batch(per_replica_batch, drop_remainder=True).prefetch(2)
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options)


@dataclasses.dataclass(frozen=True)
class InputConfig:
  global_batch_size: int
  image_size: int
  dtype: tf.DType = tf.float32
  seed: int = 0


def check_batch_divides(global_batch_size, num_replicas):
  if global_batch_size % num_replicas:
    raise ConfigError(
        f"--global_batch_size={global_batch_size} does not divide among "
        f"{num_replicas} replicas")


def _preprocess(source, image, label, position, config, training):
  """uint8 image -> normalised, augmented image of config.image_size in config.dtype."""
  image = tf.cast(image, tf.float32)
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  size = config.image_size
  if image.shape[0] != size or image.shape[1] != size:
    image = tf.image.resize(image, [size, size], method="bilinear")
  if training and source.augment != "none":
    seed = tf.stack([tf.cast(config.seed + _AUGMENT_SALT, tf.int64), position])
    pad = max(size // 8, 1)  # 4 pixels at 32x32, as He et al. 2015.
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, [size, size, 3], seed=seed)
    if source.augment == "crop_flip":
      image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
  image = (image - tf.constant(source.mean)) / tf.constant(source.std)
  return tf.cast(image, config.dtype), label


def _epoch_indices(num_examples, seed, epoch):
  """(index, global position) pairs of one epoch, in that epoch's order."""
  order = tf.random.experimental.stateless_shuffle(
      tf.range(num_examples, dtype=tf.int64),
      seed=tf.stack([tf.cast(seed, tf.int64), epoch]))
  positions = epoch * num_examples + tf.range(num_examples, dtype=tf.int64)
  return tf.data.Dataset.from_tensor_slices((order, positions))


def _keep_own_chunks(ds, context, per_replica_batch):
  """Keeps the per-replica chunks this input pipeline feeds, in order."""
  replicas_per_pipeline = context.num_replicas_in_sync // context.num_input_pipelines
  ds = ds.batch(per_replica_batch * replicas_per_pipeline, drop_remainder=True)
  ds = ds.shard(context.num_input_pipelines, context.input_pipeline_id)
  return ds.unbatch()


def train_dataset_fn(source, split, config, start_step=0):
  """A dataset_fn for strategy.distribute_datasets_from_function, from start_step."""
  data = source.split(split)
  n = data.num_examples

  def dataset_fn(context):
    per_replica_batch = context.get_per_replica_batch_size(config.global_batch_size)
    start = start_step * config.global_batch_size
    first_epoch, offset = start // n, start % n
    ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(
        lambda epoch: _epoch_indices(n, config.seed, epoch)).skip(offset)
    ds = _keep_own_chunks(ds, context, per_replica_batch)

    def load(index, position):
      image, label = data.fetch(index)
      return _preprocess(source, image, label, position, config, training=True)

    return _finish(ds, per_replica_batch, load)

  return dataset_fn


def eval_steps(num_examples, global_batch_size):
  return math.ceil(num_examples / global_batch_size)


def eval_dataset_fn(source, split, config):
  """Yields (images, labels, weights); weights are 0 on the padding."""
  data = source.split(split)
  n = data.num_examples
  total = eval_steps(n, config.global_batch_size) * config.global_batch_size

  def dataset_fn(context):
    per_replica_batch = context.get_per_replica_batch_size(config.global_batch_size)
    ds = tf.data.Dataset.range(total)
    ds = _keep_own_chunks(ds, context, per_replica_batch)

    def load(position):
      image, label = data.fetch(tf.minimum(position, n - 1))
      image, label = _preprocess(source, image, label, position, config, training=False)
      return image, label, tf.cast(position < n, tf.float32)

    return _finish(ds, per_replica_batch, load)

  return dataset_fn
