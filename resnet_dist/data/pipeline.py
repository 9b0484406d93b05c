"""Sharded tf.data input for tf.distribute, exact for training and evaluation.

Every dataset_fn here is given to strategy.distribute_datasets_from_function
(by distributed_input.distribute_input) and builds the input of one input
pipeline (one per worker or TPU host), which feeds the replicas of that
pipeline batches of global_batch_size / replicas.

The input, a module each (each states its part of this contract):
  indexed_reader.py, record_reader.py: the reader of each kind of split
      (splits.py), chosen once from the split's type (READERS): its order,
      its resume, its training and evaluation datasets
  service_reader.py: training input made by a tf.data service's workers
      (data_service set)
  sharding.py: which examples each pipeline and replica takes; repeated
      augmentation (InputSpec.repeats)
  skips.py: bad images, found, dropped and counted
  decoding.py: decoding, crops and augmentation, the batches the replicas
      take; evaluation's padding
  input_errors.py: the checks' errors, as one-line DataErrors

Order: the readers' order, batch for batch, holds with
InputSpec.deterministic (--deterministic). By default files are interleaved
and examples leave the parallel decoding as soon as they are ready, so a
slow file or image holds up nothing: each epoch still has every example
once, and each example keeps its augmentation (seeded by its key: its place
in the global order, or its record's epoch, file and index), but which
batch it lands in, and where a resumed run restarts within a few batches,
vary.
"""

import dataclasses
from typing import TYPE_CHECKING, Optional

import tensorflow as tf

from resnet_dist.data import indexed_reader
from resnet_dist.data import preprocess as preprocess_lib
from resnet_dist.data import record_reader
from resnet_dist.data import service_reader
from resnet_dist.data.splits import IndexedSplit, RecordSplit
from resnet_dist.errors import ConfigError, DataError

if TYPE_CHECKING:  # config.py imports this package: typing only
  from resnet_dist.config import AugmentConfig


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """What one input pipeline makes: train.py derives it from a run's Config."""
  global_batch_size: int          # per (micro-)batch: what one next() yields, over all replicas
  image_size: int
  seed: int = 0
  shuffle_buffer: int = 10000     # records; record splits only
  strict: bool = False            # stop at a bad image instead of skipping it
  augment: Optional["AugmentConfig"] = None  # its policy, after crop and flip
  crop_fraction: float = preprocess_lib.EVAL_CROP_FRACTION  # evaluation's central crop
  data_service: str = ""          # HOST:PORT of a tf.data service for training input
  job_name: str = ""              # the service job's name, unique to the run and input
  # Training examples in the order they were read (--deterministic); otherwise
  # each leaves as soon as it is ready, so one slow image holds up nothing.
  # Evaluation is always in order.
  deterministic: bool = False
  slack: bool = False             # tf.data's slack in the last prefetch (accelerators)
  crop: str = ""                  # a preprocess.CROPS entry; "": the source's
  interpolation: str = "bilinear"  # a preprocess.INTERPOLATIONS entry
  antialias: bool = False          # shrinking antialiased (preprocess._resized)
  repeats: int = 1                 # --repeated_augmentations: copies of each example an epoch
  resize_first: bool = False       # evaluation resizes, then crops (preprocess.preprocess)


def check_batch_divides(global_batch_size, num_replicas):
  if global_batch_size % num_replicas:
    raise ConfigError(
        f"--global_batch_size={global_batch_size} does not divide among "
        f"{num_replicas} replicas")


# The reader of each kind of split: a module with
#   train(source, split, spec, context, start_step=0), evaluation(source,
#   split, spec, context): the dataset_fns' datasets;
#   eval_steps(split, global_batch_size, num_pipelines);
#   service_slots(split, spec, start, context): what the service's workers read;
#   reading(split): the hooks of the decoding stage (decoding.Reading);
#   sampled_images(split, split_name, sample): check_decodable's sample.
# A new kind of split is a module and an entry.
READERS = {IndexedSplit: indexed_reader, RecordSplit: record_reader}


def reader_of(split):
  return READERS[type(split)]


def check_decodable(split, split_name, sample=32):
  """Stops the run at start when a split's images cannot be decoded at all.

  Training skips undecodable images, so a split of nothing but (a folder of
  empty files, HEIC images named .jpg, JPEGs all cut short) would otherwise
  yield no batch and hang. Decodes up to `sample` records spread over the
  split (the first few of up to `sample` files of a record split) and raises
  DataError, naming the split, when none of them decodes. A split where a few
  in that sample decode trains, skipping and counting the rest.
  """
  if not split.encoded or not split.num_examples:
    return
  encoded = reader_of(split).sampled_images(split, split_name, sample)
  for image in encoded:
    if image is not None and preprocess_lib.looks_decodable(image):
      try:
        tf.io.decode_image(image, channels=3, expand_animations=False)
        return
      except tf.errors.InvalidArgumentError:
        continue
  raise DataError(f"none of {len(encoded)} images sampled from the {split_name} split can be "
                  f"decoded (empty, cut short, or not JPEG, PNG, GIF, BMP or WebP)")


def train_dataset_fn(source, split_name, spec, start_step=0):
  """A dataset_fn yielding (images, labels, skipped) from start_step on."""
  split = source.split(split_name)
  reader = reader_of(split)

  def dataset_fn(context):
    if source.train_batches is not None:  # a source that makes its own (synthetic)
      return source.train_batches(spec, context)
    if spec.data_service:
      return service_reader.train(source, split, spec, context, reader=reader,
                                  start_step=start_step)
    return reader.train(source, split, spec, context, start_step=start_step)

  return dataset_fn


def eval_steps(split, global_batch_size, num_pipelines=1):
  """Steps that cover the split exactly once on every pipeline."""
  return reader_of(split).eval_steps(split, global_batch_size, num_pipelines)


def eval_dataset_fn(source, split_name, spec):
  """A dataset_fn yielding (images, labels, weights); weights are 0 on the padding."""
  split = source.split(split_name)
  reader = reader_of(split)

  def dataset_fn(context):
    return reader.evaluation(source, split, spec, context)

  return dataset_fn
