"""The reader of record splits (splits.RecordSplit: TFRecord files).

Record splits: each pipeline reads its own files (file-level sharding) when
there are at least as many files as pipelines, and every pipeline-th record
of each file otherwise (example-level; sharding.shard_of). Its stream is its
shard once per epoch: files in an order seeded by (seed, epoch, pipeline),
interleaved, then a shuffle buffer seeded the same way. Resuming at step s
skips whole epochs by the known record counts and the rest of the position
as raw records, unparsed.

An element of the stream is a dict: key, record (serialized) and where, the
dict of file (its path) and key. A record's key is (epoch * files in the
split + its file) * _FILE_STRIDE + its index in the file: it seeds the
record's augmentation, whatever order the files are interleaved in, and
names the record in errors. Records are parsed a group at a time
(_parsed_group), in the decoding stage's first pass (skips.usable).
"""

import functools
import math

import tensorflow as tf

from resnet_dist.data import decoding
from resnet_dist.data import records as records_lib
from resnet_dist.data import seeds, sharding
from resnet_dist.data import skips
from resnet_dist.data.input_errors import MISSING_FEATURE
from resnet_dist.errors import ConfigError, DataError

_FILE_STRIDE = 2**32
_CYCLE_LENGTH = 16      # files read at once by one pipeline
_GCS_READ_BUFFER = 8 << 20


def _file_order(num_files, seed, epoch):
  """Indices of a pipeline's files in one epoch's order; the same on every
  pipeline, as example-level sharding needs."""
  return tf.random.experimental.stateless_shuffle(
      tf.range(num_files), seed=tf.stack([tf.constant(seed + seeds.ORDER, tf.int64), epoch]))


def _interleave(files, num_files, remote, keep=None, deterministic=True):
  """The elements of a dataset of files, dicts of path, count (its records)
  and base: key = base + the record's index in its file; keep(index):
  whether to keep a record. Files are read num_files at once (at most
  _CYCLE_LENGTH), in turns or, not deterministic, as their records arrive.

  A corrupt record (its CRC does not match) ends TFRecordDataset's reading of
  its file. Each file is therefore filled up to its known count with
  records.CORRUPT, so the records lost are skipped and counted like any bad
  image (or, under strict, stop the run naming the file), and every later
  position, the epoch length and resuming stay what the headers say.
  """
  buffer = _GCS_READ_BUFFER if remote else None

  def records(file):
    path = file["path"]
    read = tf.data.TFRecordDataset(path, buffer_size=buffer).ignore_errors()
    filled = read.concatenate(tf.data.Dataset.from_tensors(records_lib.CORRUPT).repeat())
    keyed = filled.take(file["count"]).enumerate(file["base"])
    if keep is not None:
      keyed = keyed.filter(lambda key, record: keep(key % _FILE_STRIDE))
    # Returns only its arguments, so tf.data skips calling it per record.
    return keyed.map(lambda key, record: {"key": key, "record": record,
                                          "where": {"file": path, "key": key}})

  cycle = min(_CYCLE_LENGTH, num_files)
  return files.interleave(records, cycle_length=cycle, block_length=1, num_parallel_calls=cycle,
                          deterministic=deterministic)


def _remote(files):
  return any(f.startswith("gs://") for f in files)


def _record_seed(spec, epoch, pipeline_id):
  return tf.stack([tf.constant(spec.seed + seeds.ORDER, tf.int64),
                   epoch * seeds.RECORD_EPOCH_STRIDE + pipeline_id])


def _shuffled(ds, buffer_size, seed):
  """ds through a shuffle buffer whose order depends on `seed` alone.

  shuffle() pairs its op seed with the graph seed, and fails on a tensor op
  seed when the graph seed is 0 (tf.random.set_seed(0)). So the graph seed
  is 1 while the shuffle is made, whatever seed the run set, and put back
  after: the graph is the one flat_map traces an epoch's function in.
  """
  shuffle_seed = tf.random.stateless_uniform([], seed=seed, minval=None, maxval=None,
                                             dtype=tf.int64)
  graph = tf.compat.v1.get_default_graph()
  previous, graph.seed = graph.seed, 1
  try:
    return ds.shuffle(buffer_size, seed=shuffle_seed)
  finally:
    graph.seed = previous


def _epochs(split, spec, context, length):
  """epoch -> the elements of this pipeline's shard in that epoch: its files
  in the epoch's order, interleaved, shuffled, and repeated for repeated
  augmentation, `length` of them."""
  p, num_pipelines = context.input_pipeline_id, context.num_input_pipelines
  files, _, example_level = sharding.shard_of(split, num_pipelines, p)
  indices, counts = sharding.shard_files(split, num_pipelines, p, example_level)
  paths, remote = tf.constant(files), _remote(files)
  keep = sharding.keeper(num_pipelines, p, example_level)

  def epoch_records(epoch):
    order = _file_order(len(files), spec.seed, epoch)
    bases = (epoch * len(split.files) + tf.gather(indices, order)) * _FILE_STRIDE
    files_of_epoch = tf.data.Dataset.from_tensor_slices(
        {"path": tf.gather(paths, order), "count": tf.gather(counts, order), "base": bases})
    ds = _interleave(files_of_epoch, len(files), remote, keep, spec.deterministic)
    ds = _shuffled(ds, spec.shuffle_buffer, _record_seed(spec, epoch, p))
    return _repeated_records(ds, spec.repeats).take(length) if spec.repeats > 1 else ds

  return epoch_records


def train(source, split, spec, context, start_step=0):
  """One pipeline's (images, labels, skipped) from start_step on."""
  per_replica, pipeline_batch = sharding.pipeline_batch(context, spec)
  p, num_pipelines = context.input_pipeline_id, context.num_input_pipelines
  _, count, _ = sharding.shard_of(split, num_pipelines, p)
  if count < pipeline_batch:
    raise ConfigError(f"input pipeline {p} has {count} training examples, fewer than "
                      f"its {pipeline_batch} per step")
  replicas = context.num_replicas_in_sync // num_pipelines
  length = sharding.repeated_epoch(count, spec.repeats, replicas)
  if length < pipeline_batch:
    raise ConfigError(f"input pipeline {p} has {count} training examples, {length} once "
                      f"rounded down for repeated augmentation: fewer than its "
                      f"{pipeline_batch} per step")

  first_epoch, offset = divmod(start_step * pipeline_batch, length)
  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(
      _epochs(split, spec, context, length)).skip(offset)
  if spec.repeats > 1:
    ds = sharding.spread_copies(ds, per_replica, replicas)
  return decoding.train_batches(ds, reading(split), source, spec, per_replica_batch=per_replica)


def _repeated_records(ds, repeats):
  """Each element `repeats` times running, the copies keyed key * repeats +
  copy, so each is augmented its own way; where still names the record."""
  def copies(element):
    copied = tf.nest.map_structure(lambda t: tf.repeat(t[None], repeats, 0), element)
    return {**copied, "key": element["key"] * repeats + tf.range(repeats, dtype=tf.int64)}
  return ds.map(copies).unbatch()


def evaluation(source, split, spec, context):
  """One pipeline's (images, labels, weights): every record of its shard, in order."""
  per_replica, pipeline_batch = sharding.pipeline_batch(context, spec)
  p, num_pipelines = context.input_pipeline_id, context.num_input_pipelines
  files, _, example_level = sharding.shard_of(split, num_pipelines, p)
  _, counts = sharding.shard_files(split, num_pipelines, p, example_level)
  files_ds = tf.data.Dataset.from_tensor_slices(
      {"path": tf.constant(files), "count": counts, "base": tf.zeros_like(counts)})
  ds = _interleave(files_ds, len(files), _remote(files),
                   sharding.keeper(num_pipelines, p, example_level))
  steps = eval_steps(split, spec.global_batch_size, num_pipelines)
  return decoding.eval_batches(ds, reading(split), source, spec,
                               num_examples=steps * pipeline_batch, per_replica_batch=per_replica)


def eval_steps(split, global_batch_size, num_pipelines=1):
  """Steps that cover the split exactly once on every pipeline."""
  most = max(sharding.shard_of(split, num_pipelines, p)[1] for p in range(num_pipelines))
  return math.ceil(most / (global_batch_size // num_pipelines))


def service_slots(split, spec, start, context):
  """The elements of this pipeline's files, one slot each (service_reader.py),
  from the file holding its share of global position `start`."""
  p, num_pipelines = context.input_pipeline_id, context.num_input_pipelines
  files, count, example_level = sharding.shard_of(split, num_pipelines, p)
  _, counts = sharding.shard_files(split, num_pipelines, p, example_level)
  num_files, paths = len(files), tf.constant(files)
  first_epoch, offset = divmod(start // num_pipelines, count)
  # Sharded by example, a pipeline has a num_pipelines-th of each file.
  offset *= num_pipelines if example_level else 1
  done = tf.cumsum(tf.gather(counts, _file_order(num_files, spec.seed, first_epoch))) <= offset
  first = first_epoch * num_files + tf.reduce_sum(tf.cast(done, tf.int64))

  def file_of(slot):
    index = _file_order(num_files, spec.seed, slot // num_files)[slot % num_files]
    # The base gives each record of each epoch its own augmentation seed.
    return {"path": paths[index], "count": counts[index], "base": slot * _FILE_STRIDE}

  ds = _interleave(tf.data.Dataset.range(first, 2**62).map(file_of), num_files,
                   _remote(files), sharding.keeper(num_pipelines, p, example_level),
                   deterministic=False)
  return ds.shuffle(spec.shuffle_buffer, seed=spec.seed + seeds.ORDER)


# --- The decoding stage's hooks ------------------------------------------------

def reading(split):
  return decoding.Reading(encoded=split.encoded, describe=_describe,
                          usable_groups=functools.partial(_parsed_groups, split))


def _describe(where):
  """Assert data naming a record: its index in its file, and the file."""
  return ["record", where["key"] % _FILE_STRIDE, "of", where["file"]]


def _parsed_groups(split, numbered, strict):
  return numbered.batch(skips.GROUP).map(functools.partial(_parsed_group, split, strict),
                                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _parsed_group(split, strict, numbers, elements):
  """skips.kept() of a group of elements: parsed at once, a corrupt record,
  one that is no Example and one that lacks a feature unusable."""
  records = elements["record"]
  example = records_lib.looks_like_examples(records)
  # Those that are no Example are parsed as a stand-in, one that is. Every
  # record is copied in the swap: a group of sound records is not swapped.
  template = records[tf.argmax(tf.cast(example, tf.int32))]
  parse = split.parse_group or functools.partial(_parse_vectorized, split.parse)
  images, labels, missing = parse(skips.unless_all(
      example, records, lambda: tf.where(example, records, template)))
  reasons = tf.where(
      records == records_lib.CORRUPT, records_lib.BAD_RECORD,
      tf.where(~example, records_lib.NOT_AN_EXAMPLE,
               tf.where(missing != "", tf.strings.join([MISSING_FEATURE, missing], " "), "")))
  examples = {"key": elements["key"], "image": images, "label": labels,
              "where": elements["where"]}
  return skips.kept(numbers, examples, reasons, strict=strict, describe=_describe)


def _parse_vectorized(parse, records):
  images, labels = tf.vectorized_map(parse, records)
  return images, labels, tf.fill(tf.shape(records), "")


# --- The decodability probe (pipeline.check_decodable) -------------------------

def sampled_images(split, split_name, sample):
  """The encoded images of the first few records of up to `sample` files, None
  for one that does not parse; a DataError, naming the first file, when none
  of them parses."""
  files = split.files[:sample]
  per_file = max(1, sample // len(files))
  # A corrupt record ends its file's share of the sample, as it ends the
  # file's reading in training.
  records = [(record, f) for f in files
             for record in tf.data.TFRecordDataset(f).take(per_file).ignore_errors()]
  records = records[:sample]
  encoded = [_parsed_image(split, record) for record, _ in records]
  if records and not any(image is not None for image in encoded):
    record, path = records[0]
    raise DataError(f"no record sampled from the {split_name} split can be parsed: the "
                    f"first of {path} {_unparsable(record.numpy())}")
  return encoded


def _unparsable(serialized):
  """Why a record does not parse as an image Example, in words."""
  example = tf.train.Example()
  try:
    example.ParseFromString(serialized)
  except Exception:  # pylint: disable=broad-except  # protobuf's DecodeError, by version
    return "is not a tf.train.Example"
  features = example.features.feature
  for key, kind in (("image/encoded", "bytes_list"), ("image/class/label", "int64_list")):
    if key not in features:
      return f"has no {key} (it has: {', '.join(sorted(features)) or 'nothing'})"
    found = features[key].WhichOneof("kind")
    if found != kind:
      return f"holds {key} as a {found}, not the {kind} it must be"
  return "does not parse as this dataset's records"


def _parsed_image(split, record):
  """A record's encoded image, or None when it does not parse (no label, or
  not an Example at all: TensorFlow's message then quotes bytes that are not
  UTF-8, and forming it fails)."""
  try:
    return split.parse(record)[0]
  except (tf.errors.InvalidArgumentError, UnicodeDecodeError):
    return None
