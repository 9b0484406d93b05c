"""The reader of indexed splits (splits.IndexedSplit: in memory, image folders).

Indexed splits: one global order of example indices, a permutation per epoch
seeded by (seed, epoch), is cut into global batches and each global batch
into one chunk per replica; a pipeline keeps the chunks of its replicas. So
the global batch of step s holds the same examples for 1 device, N replicas
or N workers, and resuming at step s starts the index stream at
s * global_batch_size.

An element of the stream is a dict: index (the example's in the split) and
key (its position in the global order, which seeds its augmentation; in
evaluation the index itself). fetch() reads its example alone (for an image
folder, a file read each).
"""

import functools
import math

import tensorflow as tf

from resnet_dist.data import decoding, seeds, sharding
from resnet_dist.data import skips


def epoch_order(num_examples, seed, epoch):
  """The example indices of one epoch, in that epoch's order."""
  return tf.random.experimental.stateless_shuffle(
      tf.range(num_examples, dtype=tf.int64),
      seed=tf.stack([tf.cast(seed + seeds.ORDER, tf.int64), epoch]))


def _epoch_indices(num_examples, seed, epoch, repeats, length):
  """The elements of one epoch, in that epoch's order: each index `repeats`
  times running, the first `length` of them, keyed by global position."""
  positions = epoch * length + tf.range(length, dtype=tf.int64)
  order = tf.repeat(epoch_order(num_examples, seed, epoch), repeats)[:length]
  return tf.data.Dataset.from_tensor_slices({"index": order, "key": positions})


def train(source, split, spec, context, start_step=0):
  """One pipeline's (images, labels, skipped) from start_step on."""
  per_replica, _ = sharding.pipeline_batch(context, spec)
  n = split.num_examples
  length = sharding.repeated_epoch(n, spec.repeats, context.num_replicas_in_sync)
  first_epoch, offset = divmod(start_step * spec.global_batch_size, length)
  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(
      lambda epoch: _epoch_indices(n, spec.seed, epoch, spec.repeats, length)).skip(offset)
  if spec.repeats > 1:
    ds = sharding.spread_copies(ds, per_replica, context.num_replicas_in_sync)
  ds = sharding.keep_own_chunks(ds, context, per_replica)
  return decoding.train_batches(ds, reading(split), source, spec, per_replica_batch=per_replica)


def evaluation(source, split, spec, context):
  """One pipeline's (images, labels, weights): its chunks of every global batch."""
  per_replica, pipeline_batch = sharding.pipeline_batch(context, spec)
  n = split.num_examples
  steps = eval_steps(split, spec.global_batch_size)
  # Returns only its argument, so tf.data skips calling it per example.
  positions = tf.data.Dataset.range(steps * spec.global_batch_size).map(
      lambda position: {"index": position, "key": position})
  ds = sharding.keep_own_chunks(positions, context, per_replica)
  ds = ds.filter(lambda element: element["index"] < n)
  return decoding.eval_batches(ds, reading(split), source, spec,
                               num_examples=steps * pipeline_batch, per_replica_batch=per_replica)


def eval_steps(split, global_batch_size, num_pipelines=1):
  """Steps that cover the split exactly once on every pipeline."""
  del num_pipelines  # every pipeline takes its chunks of the same global batches
  return math.ceil(split.num_examples / global_batch_size)


# --- Through a tf.data service (service_reader.py) ---------------------------

def service_chunk(num_examples):
  """Examples per slot: 128, or a 1024th of a larger epoch, as each slot
  shuffles the whole epoch's indices to find its own."""
  return max(128, num_examples // 1024)


def service_slots(split, spec, start, context):
  """The elements of this pipeline's slots (every num_pipelines-th chunk of
  service_chunk() examples of an epoch's order) from the one holding global
  position `start`."""
  n = split.num_examples
  chunk = service_chunk(n)
  per_epoch = math.ceil(n / chunk)
  p, num_pipelines = context.input_pipeline_id, context.num_input_pipelines
  first = start // n * per_epoch + start % n // chunk
  first += (p - first) % num_pipelines

  def examples(slot):
    epoch, begin = slot // per_epoch, slot % per_epoch * chunk
    end = tf.minimum(begin + chunk, n)
    positions = epoch * n + tf.range(begin, end)
    order = epoch_order(n, spec.seed, epoch)[begin:end]
    return tf.data.Dataset.from_tensor_slices({"index": order, "key": positions})

  return tf.data.Dataset.range(first, 2**62, num_pipelines).flat_map(examples)


# --- The decoding stage's hooks ------------------------------------------------

def reading(split):
  fetch = functools.partial(_fetch, split)
  return decoding.Reading(encoded=split.encoded, describe=_describe,
                          usable_groups=functools.partial(_usable_groups, fetch), fetch=fetch)


def _fetch(split, element):
  image, label, where = split.fetch(element["index"])
  return {"key": element["key"], "image": image, "label": label, "where": where}


def _describe(where):
  """Assert data naming an example: its name in the split."""
  return [where]


def _usable_groups(fetch, numbered, strict):
  """skips.kept() groups of (number, element) pairs, each example read alone
  in parallel and in order: one that cannot be read (a dangling link in a
  folder dataset) is dropped, outside strict, leaving a gap in the numbers."""
  fetched = numbered.map(lambda number, element: (number, fetch(element)),
                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  fetched = fetched if strict else fetched.ignore_errors()
  return fetched.batch(skips.GROUP).map(
      lambda numbers, examples: skips.kept(numbers, examples,
                                           tf.fill(tf.shape(examples["key"]), ""),
                                           strict=strict, describe=_describe))


# --- The decodability probe (pipeline.check_decodable) -------------------------

def sampled_images(split, split_name, sample):
  """Up to `sample` encoded images spread over the split; None for one that
  cannot be read (a dangling link in a folder dataset, say)."""
  del split_name  # a failed read is a missing image, not a split that cannot be parsed
  step = max(1, split.num_examples // sample)
  return [_fetched_image(split, i) for i in range(0, split.num_examples, step)][:sample]


def _fetched_image(split, index):
  try:
    return split.fetch(tf.constant(index, tf.int64))[0]
  except tf.errors.OpError:
    return None
