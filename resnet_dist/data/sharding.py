"""Which examples each input pipeline, and each replica of it, takes.

Indexed splits cut each global batch into one chunk per replica, and a
pipeline keeps the chunks of its replicas (keep_own_chunks). Record splits
give each pipeline its own files when there are at least as many files as
pipelines, and every pipeline-th record of each file otherwise (shard_of).

Repeated augmentation (InputSpec.repeats, --repeated_augmentations): each
epoch's stream holds every example `repeats` times running, cut to
repeated_epoch() positions, and each global batch (indexed splits) or
pipeline batch (record splits) is dealt to its replicas as torchvision's
RASampler deals (spread_copies), so the copies train on different replicas.
"""

import tensorflow as tf


def repeated_epoch(num_examples, repeats, num_replicas):
  """Training positions in an epoch of num_examples with each example
  repeated `repeats` times, as torchvision's RASampler (DeiT's) sets it: the
  examples rounded down to a multiple of 256, then of the replicas. So an
  epoch takes as many steps as without repeats, and sees a repeats-th of the
  examples, each `repeats` times, on as many replicas."""
  if repeats == 1:
    return num_examples
  return (num_examples // 256 * 256) // num_replicas * num_replicas


def pipeline_batch(context, spec):
  """(per-replica batch, batch of one input pipeline: its replicas' batches)."""
  per_replica = context.get_per_replica_batch_size(spec.global_batch_size)
  return per_replica, per_replica * (context.num_replicas_in_sync // context.num_input_pipelines)


def spread_copies(ds, rows, columns):
  """Deals each run of rows x columns elements out as torchvision's RASampler
  deals its stream to `columns` replicas: element i * columns + c goes to
  position c * rows + i, the c-th replica's chunk of `rows`. So the copies
  of a repeated example, next to each other in the stream, go to different
  replicas (with fewer replicas than copies, some share one)."""
  def dealt(block):
    def transposed(t):
      grid = tf.reshape(t, [rows, columns, *t.shape[1:]])
      grid = tf.transpose(grid, [1, 0, *range(2, len(t.shape) + 1)])
      return tf.reshape(grid, [rows * columns, *t.shape[1:]])
    return tf.nest.map_structure(transposed, block)
  return ds.batch(rows * columns, drop_remainder=True).map(dealt).unbatch()


def keep_own_chunks(ds, context, per_replica_batch):
  """Keeps the per-replica chunks this input pipeline feeds, in order."""
  replicas_per_pipeline = context.num_replicas_in_sync // context.num_input_pipelines
  ds = ds.batch(per_replica_batch * replicas_per_pipeline, drop_remainder=True)
  ds = ds.shard(context.num_input_pipelines, context.input_pipeline_id)
  return ds.unbatch()


def shard_of(split, num_pipelines, pipeline_id):
  """(files, records of this pipeline, example-level?) for one input pipeline
  of a record split. Sharded by example, a pipeline keeps the records whose
  index in their file is pipeline_id modulo num_pipelines."""
  if len(split.files) >= num_pipelines:
    return split.files[pipeline_id::num_pipelines], sum(split.counts[pipeline_id::num_pipelines]), False
  return (split.files, sum(len(range(pipeline_id, c, num_pipelines)) for c in split.counts),
          True)


def shard_files(split, num_pipelines, pipeline_id, example_level):
  """(indices in the split, record counts) of a pipeline's files (every file,
  sharded by example)."""
  indices = range(len(split.files)) if example_level else range(
      pipeline_id, len(split.files), num_pipelines)
  return (tf.constant(list(indices), tf.int64),
          tf.constant([split.counts[i] for i in indices], tf.int64))


def keeper(num_pipelines, pipeline_id, example_level):
  """keep(index in the file): whether a pipeline sharded by example keeps a
  record; None when it keeps every record of its files."""
  if not example_level:
    return None
  return lambda index: index % num_pipelines == pipeline_id
