"""Training input read through a tf.data service (InputSpec.data_service).

The dataset a pipeline sends to the service starts from an endless range of
split slots, which the dispatcher hands out one at a time to whichever
worker asks (ShardingPolicy.DYNAMIC): slot s is a chunk of an epoch's
order (indexed splits; indexed_reader.service_chunk examples) or one file of
an epoch's file order (record splits). Each slot goes to one worker, once.
So, with no worker lost, every example of an epoch is trained on exactly
once; the slots a lost worker held are skipped (at most once). Workers run
at their own pace: the order of the batches, and which epochs meet in a
batch near an epoch's end, differ from run to run. A run starts at the slot
holding its step's position in the data: after a resume, the slots that were
in flight at the checkpoint may be seen twice, or not at all, in that epoch.
Undecodable images are skipped but not counted: each worker sees only its
own slots.

Each kind of split's reader makes its slots (service_slots); service.py is
the trainer's side of the service (its checks, its job names, its watch).
"""

import tensorflow as tf

from resnet_dist.data import decoding
from resnet_dist.data import sharding


def train(source, split, spec, context, *, reader, start_step=0):
  """The training input of one pipeline, made by the service's workers from
  the slots of `reader`, the split's kind's reader."""
  per_replica, _ = sharding.pipeline_batch(context, spec)
  start = start_step * spec.global_batch_size
  reading = reader.reading(split)
  ds = reader.service_slots(split, spec, start, context)
  ds = decoding.decoded_batches(ds, reading, source, spec, batch_size=per_replica)

  def check(batch):
    # Each worker sees only its own slots: its skips are no count of the run's.
    return decoding.checked(source.num_classes, reading.describe,
                            {**batch, "skipped": tf.zeros_like(batch["skipped"])})

  ds = ds.map(check).prefetch(tf.data.AUTOTUNE)
  service = tf.data.experimental.service
  ds = ds.apply(service.distribute(
      processing_mode=service.ShardingPolicy.DYNAMIC, service=f"grpc://{spec.data_service}",
      job_name=f"{spec.job_name}-pipeline{context.input_pipeline_id}"))
  return decoding.finish(ds)
