"""Sharded tf.data input for tf.distribute, exact for training and evaluation.

Every dataset_fn here is given to strategy.distribute_datasets_from_function
(by distributed_input.distribute_input) and builds the input of one input
pipeline (one per worker or TPU host), which feeds the replicas of that
pipeline batches of global_batch_size / replicas.

Indexed splits (in memory, image folders): one global order of example
indices, a permutation per epoch seeded by (seed, epoch), is cut into global
batches and each global batch into one chunk per replica; a pipeline keeps the
chunks of its replicas. So the global batch of step s holds the same examples
for 1 device, N replicas or N workers, and resuming at step s starts the index
stream at s * global_batch_size.

Record splits (TFRecord files): each pipeline reads its own files (file-level
sharding) when there are at least as many files as pipelines, and every
pipeline-th record of each file otherwise (example-level). Its stream is its
shard once per epoch: files in an order seeded by (seed, epoch, pipeline),
interleaved, then a shuffle buffer seeded the same way. Resuming at step s
skips whole epochs by the known record counts and the rest of the position as
raw records, unparsed.

Order: the above, batch for batch, holds with InputSpec.deterministic
(--deterministic). By default files are interleaved and examples leave the
parallel decoding as soon as they are ready, so a slow file or image holds up
nothing: each epoch still has every example once, and each example keeps its
augmentation (seeded by its key: its place in the global order, or its
record's epoch, file and index), but which batch it lands in, and where a
resumed run restarts within a few batches, vary.

Bad images: an image found unusable before decoding (empty, cut short, not
an image, a corrupt record, one that is no Example or lacks a feature) and
one the decoder rejects are skipped and counted (the third element of every
training batch is the number of records skipped just before each example;
out of order, an image the decoder rejects drops its batch, uncounted:
_decoded_batches), or, with
strict, stop the run naming the record or file. A label outside
0..num_classes-1 always stops the run.

Repeated augmentation (InputSpec.repeats, --repeated_augmentations): each
epoch's stream holds every example `repeats` times running, cut to
repeated_epoch() positions, and each global batch (indexed splits) or
pipeline batch (record splits) is dealt to its replicas as torchvision's
RASampler deals (_spread_copies), so the copies train on different replicas.

Through a tf.data service (data_service set): see _service_train below.

Evaluation: each pipeline's examples, then zero-weight padding up to the same
number of whole batches on every pipeline, so every example counts exactly
once and every batch keeps its static shape (TPUs need it).
"""

import contextlib
import dataclasses
import functools
import math
import os
import re
from typing import Any

import tensorflow as tf

from resnet_dist.data import augment as augment_lib
from resnet_dist.data import preprocess as preprocess_lib
from resnet_dist.data import records as records_lib
from resnet_dist.data import seeds
from resnet_dist.data.splits import IndexedSplit, RecordSplit
from resnet_dist.errors import ConfigError, DataError

BAD_IMAGE = "resnet_dist: undecodable image"
BAD_LABEL = "resnet_dist: label out of range"
_CYCLE_LENGTH = 16      # files read at once by one pipeline
_GCS_READ_BUFFER = 8 << 20


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """What one input pipeline makes: train.py derives it from a run's Config."""
  global_batch_size: int          # per (micro-)batch: what one next() yields, over all replicas
  image_size: int
  seed: int = 0
  shuffle_buffer: int = 10000     # records; record splits only
  strict: bool = False            # stop at a bad image instead of skipping it
  augment: Any = None             # a config.AugmentConfig: its policy, after crop and flip
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


def repeated_epoch(num_examples, repeats, num_replicas):
  """Training positions in an epoch of num_examples with each example
  repeated `repeats` times, as torchvision's RASampler (DeiT's) sets it: the
  examples rounded down to a multiple of 256, then of the replicas. So an
  epoch takes as many steps as without repeats, and sees a repeats-th of the
  examples, each `repeats` times, on as many replicas."""
  if repeats == 1:
    return num_examples
  return (num_examples // 256 * 256) // num_replicas * num_replicas


def check_batch_divides(global_batch_size, num_replicas):
  if global_batch_size % num_replicas:
    raise ConfigError(
        f"--global_batch_size={global_batch_size} does not divide among "
        f"{num_replicas} replicas")


def input_threads():
  """The input's private thread pool: this process's physical cores (the
  CPUs it may run on, a core's hardware threads counted once), so decoding
  does not queue behind the replicas' kernel launches in TensorFlow's
  inter-op pool, and leaves hyperthreads to the host's other work."""
  try:
    cpus = os.sched_getaffinity(0)
  except AttributeError:  # not Linux
    return os.cpu_count() or 1
  cores = set()
  for cpu in cpus:
    try:
      with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
        cores.add(f.read().strip())
    except OSError:
      cores.add(str(cpu))
  return max(len(cores), 1)


def _finish(ds, deterministic=True, slack=False):
  """The pipeline's last prefetch and its options: parallelism and buffer
  sizes tuned by tf.data's autotuning, decoding in a private thread pool."""
  options = tf.data.Options()
  options.deterministic = deterministic
  options.experimental_slack = slack
  options.threading.private_threadpool_size = input_threads()
  return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def _pipeline_batch(context, spec):
  per_replica = context.get_per_replica_batch_size(spec.global_batch_size)
  return per_replica, per_replica * (context.num_replicas_in_sync // context.num_input_pipelines)


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
  if isinstance(split, RecordSplit):
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
  else:
    step = max(1, split.num_examples // sample)
    encoded = [_fetched_image(split, i) for i in range(0, split.num_examples, step)][:sample]
  for image in encoded:
    if image is not None and preprocess_lib.looks_decodable(image):
      try:
        tf.io.decode_image(image, channels=3, expand_animations=False)
        return
      except tf.errors.InvalidArgumentError:
        continue
  raise DataError(f"none of {len(encoded)} images sampled from the {split_name} split can be "
                  f"decoded (empty, cut short, or not JPEG, PNG, GIF, BMP or WebP)")


def _fetched_image(split, index):
  """An indexed split's encoded image, or None when it cannot be read (a
  dangling link in a folder dataset, say)."""
  try:
    return split.fetch(tf.constant(index, tf.int64))[0]
  except tf.errors.OpError:
    return None


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


# --- Decoding, shared by both kinds of split ---------------------------------
#
# An encoded example goes through two stages. First, in groups of _GROUP in
# read order, records are parsed and every image is checked for the signs of
# an undecodable one (preprocess.looks_decodable); the unusable ones are
# dropped there and counted. Then each example alone is decoded, cropped and
# augmented, in parallel, and in order only under --deterministic. Per-example
# calls of small functions cost a sixth as much CPU as decoding a small image
# (docs/benchmarks.md), so the checks, the parse and the label check run once
# per group or batch, and the decoding map is the one call per example.

_GROUP = 64           # examples parsed and checked by one call
MISSING_FEATURE = "resnet_dist: a record has no"


def _describe(where):
  """Assert data naming an example: a record (path, index in its file) or a name."""
  if isinstance(where, tuple):
    path, key = where
    return ["record", key % _FILE_STRIDE, "of", path]
  return [where]


def _skips_errors(split, spec):
  return split.encoded and not spec.strict


def _usable(ds, fetch, split, spec):
  """(key, encoded image, label, where, skipped) of the examples of ds that
  look decodable, in order; skipped: the examples dropped just before each
  (unusable, unreadable, a record that does not parse). Under strict the
  first unusable one stops the run, named instead.

  fetch(*element) -> (key, encoded image, label, where) reads an indexed
  split's example, one at a time (a file read each); a record split's
  elements, (key, (record, where)), are parsed a group at a time.
  """
  ds = ds.enumerate()
  if isinstance(split, RecordSplit):
    groups = ds.batch(_GROUP).map(functools.partial(_parsed_group, split, spec.strict),
                                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    fetched = ds.map(lambda number, element: (number,) + fetch(*_as_tuple(element)),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    fetched = fetched.ignore_errors() if _skips_errors(split, spec) else fetched
    groups = fetched.batch(_GROUP).map(
        lambda numbers, keys, images, labels, where: _kept(
            spec.strict, numbers, (keys, images, labels, where), tf.fill(tf.shape(keys), "")))
  # A group that fails as a whole (a record damaged inside its Example) is
  # dropped: the gap in the numbering counts its records.
  groups = groups.ignore_errors() if _skips_errors(split, spec) else groups
  return groups.scan(tf.constant(-1, tf.int64), _with_skips).unbatch()


def _as_tuple(element):
  return element if isinstance(element, tuple) else (element,)


def _parsed_group(split, strict, numbers, keyed):
  """_kept() of a group of (key, (record, where)): parsed at once, a corrupt
  record, one that is no Example and one that lacks a feature unusable."""
  keys, (records, where) = keyed
  example = records_lib.looks_like_examples(records)
  # Those that are no Example are parsed as a stand-in, one that is. Every
  # record is copied in the swap: a group of sound records is not swapped.
  template = records[tf.argmax(tf.cast(example, tf.int32))]
  parse = split.parse_group or functools.partial(_parse_vectorized, split.parse)
  images, labels, missing = parse(_unless_all(
      example, records, lambda: tf.where(example, records, template)))
  reasons = tf.where(
      records == records_lib.CORRUPT, records_lib.BAD_RECORD,
      tf.where(~example, records_lib.NOT_AN_EXAMPLE,
               tf.where(missing != "", tf.strings.join([MISSING_FEATURE, missing], " "), "")))
  return _kept(strict, numbers, (keys, images, labels, where), reasons)


def _parse_vectorized(parse, records):
  images, labels = tf.vectorized_map(parse, records)
  return images, labels, tf.fill(tf.shape(records), "")


def _kept(strict, numbers, examples, reasons):
  """(numbers, examples) of a group, without those unusable: with a reason
  found before, or an image that does not look decodable. Under strict the
  first unusable one stops the run instead, with its reason and name."""
  keys, images, labels, where = examples
  reasons = tf.where((reasons == "") & ~preprocess_lib.looks_decodable(images), BAD_IMAGE,
                     reasons)
  usable = reasons == ""
  if strict:
    first = tf.argmin(tf.cast(usable, tf.int32))
    named = _describe(tf.nest.map_structure(lambda t: t[first], where))
    with tf.control_dependencies([tf.debugging.Assert(tf.reduce_all(usable),
                                                      [reasons[first]] + named)]):
      usable = tf.identity(usable)
  return _unless_all(usable, (numbers, examples), lambda: tf.nest.map_structure(
      lambda t: tf.boolean_mask(t, usable), (numbers, examples)))


def _unless_all(flags, unchanged, changed):
  """unchanged where every flag is true, else changed(): the group's images are
  copied by a swap or a mask, which all but a few groups do not need."""
  return tf.cond(tf.reduce_all(flags), lambda: unchanged, changed)


def _with_skips(previous, group):
  """scan() over _kept groups: each example with the examples dropped since
  the one before it (previous: the number of the last example kept)."""
  numbers, (keys, images, labels, where) = group
  numbered = tf.concat([[previous], numbers], 0)
  return numbered[-1], (keys, images, labels, where, numbers - numbered[:-1] - 1)


def _preprocessor(fetch, source, split, spec, training):
  """element -> (image, label, where, skipped): decodes, crops and augments
  one example. For an encoded split the element is one of _usable; for one
  held decoded it is read by fetch(*element) -> (key, image, label, where).
  key seeds the example's random crop and augmentation, so it is augmented
  the same way whatever order, pipeline or restart it comes in.
  """
  def load_and_preprocess(key, image, label, where, skipped):
    seed = tf.stack([tf.constant(spec.seed + seeds.EXAMPLE, tf.int64), key])
    image = preprocess_lib.preprocess(image, spec.crop or source.crop, size=spec.image_size,
                                      training=training,
                                      seed=seed, encoded=split.encoded,
                                      crop_fraction=spec.crop_fraction,
                                      interpolation=spec.interpolation,
                                      antialias=spec.antialias,
                                      resize_first=spec.resize_first)
    if training and spec.augment is not None:
      image = augment_lib.augment(image, spec.augment, seed + seeds.POLICY, spec.interpolation)
    return image, label, where, skipped

  if split.encoded:
    return load_and_preprocess
  return lambda *element: load_and_preprocess(*fetch(*element), tf.constant(0, tf.int64))


def _to_decode(ds, fetch, source, split, spec, training):
  """(elements, load): what the decoding map takes, the usable examples of
  an encoded split, and load(*element), which decodes and crops one."""
  load = _preprocessor(fetch, source, split, spec, training)
  return (_usable(ds, fetch, split, spec) if split.encoded else ds), load


def _loaded(ds, fetch, source, split, spec, training):
  """(number, (image, label, where, skipped)) of every example in order,
  decoded in parallel and numbered before decoding, so an image the decoder
  itself rejects (complete-looking, corrupt inside) leaves a gap in the
  numbers. Such an image is an error: dropped outside strict mode."""
  ds, load = _to_decode(ds, fetch, source, split, spec, training)
  ds = ds.enumerate().map(lambda number, element: (number, load(*_as_tuple(element))),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.ignore_errors() if _skips_errors(split, spec) else ds


def _decoded_batches(ds, fetch, source, split, spec, batch_size):
  """Batches of (image, label, where, skipped), each example decoded as soon
  as it can be and its batch filled as examples are ready (training out of
  order).

  The decoding map is followed by the batch alone, which tf.data fuses into
  one op that copies each image into its batch as soon as it is made, while
  it is still in the core's cache; anything between the two (the skipping of
  one failed example included) leaves every image to be copied later by one
  thread, from memory, and costs about a tenth of the input's CPU
  (docs/benchmarks.md). So a batch holding an image the decoder rejects
  (complete-looking, corrupt inside) is dropped whole, uncounted, outside
  strict mode: the images found unusable before decoding, by far the usual
  ones, are still dropped alone and counted (_usable).
  """
  ds, load = _to_decode(ds, fetch, source, split, spec, training=True)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.ignore_errors() if _skips_errors(split, spec) else ds


def _label_check(labels, where, num_classes):
  """Stops the run at a batch with a label outside 0..num_classes-1, naming it."""
  ok = (labels >= 0) & (labels < num_classes)
  first_bad = tf.argmin(tf.cast(ok, tf.int32))
  bad_where = tf.nest.map_structure(lambda t: t[first_bad], where)
  return tf.debugging.Assert(tf.reduce_all(ok),
                             [BAD_LABEL, labels[first_bad]] + _describe(bad_where))


def _checked(num_classes, images, labels, where, skipped):
  """A training batch as the replicas take it, (images, labels, skipped),
  once its labels are checked."""
  with tf.control_dependencies([_label_check(labels, where, num_classes)]):
    return tf.identity(images), labels, tf.cast(skipped, tf.int32)


def _with_rejections(previous, batch):
  """scan() over in-order batches of _loaded: each example's skipped count
  with the images the decoder rejected just before it (the gaps in the numbers)."""
  numbers, (images, labels, where, skipped) = batch
  rejected = numbers - tf.concat([[previous], numbers[:-1]], 0) - 1
  return numbers[-1], (images, labels, where, skipped + rejected)


def _train_batches(ds, fetch, source, split, spec, per_replica_batch):
  """(images, labels, skipped) of a dataset of elements for fetch: skipped
  counts the records skipped (undecodable) just before each example. In
  order (--deterministic) every skipped record is counted; out of order, not
  the batches dropped for an image the decoder rejects (_decoded_batches)."""
  if spec.deterministic:
    ds = _loaded(ds, fetch, source, split, spec, training=True)
    ds = ds.batch(per_replica_batch, drop_remainder=True).scan(
        tf.constant(-1, tf.int64), _with_rejections)
  else:
    ds = _decoded_batches(ds, fetch, source, split, spec, per_replica_batch)
  ds = ds.map(functools.partial(_checked, source.num_classes))
  return _finish(ds, spec.deterministic, spec.slack)


def _eval_batches(ds, fetch, source, split, spec, num_examples, per_replica_batch):
  """(images, labels, weights): the usable examples in order with weight 1,
  then zero-weight padding up to exactly num_examples."""
  size = spec.image_size
  ds = _loaded(ds, fetch, source, split, spec, training=False)
  ds = ds.map(lambda number, example: (example[0], example[1], tf.constant(1.0), example[2]))
  padding = tf.data.Dataset.from_tensors(
      (tf.zeros([size, size, 3], tf.uint8), tf.constant(0, tf.int64), tf.constant(0.0),
       tf.nest.map_structure(lambda spec: tf.zeros([], spec.dtype), ds.element_spec[3])))
  ds = ds.concatenate(padding.repeat()).take(num_examples)

  def check(images, labels, weights, where):
    with tf.control_dependencies([_label_check(labels, where, source.num_classes)]):
      return tf.identity(images), labels, weights

  return _finish(ds.batch(per_replica_batch, drop_remainder=True).map(check))


# --- Indexed splits ----------------------------------------------------------

def _epoch_order(num_examples, seed, epoch):
  """The example indices of one epoch, in that epoch's order."""
  return tf.random.experimental.stateless_shuffle(
      tf.range(num_examples, dtype=tf.int64),
      seed=tf.stack([tf.cast(seed + seeds.ORDER, tf.int64), epoch]))


def _epoch_indices(num_examples, seed, epoch, repeats, length):
  """(index, global position) pairs of one epoch, in that epoch's order: each
  index `repeats` times running, the first `length` of them."""
  positions = epoch * length + tf.range(length, dtype=tf.int64)
  order = tf.repeat(_epoch_order(num_examples, seed, epoch), repeats)[:length]
  return tf.data.Dataset.from_tensor_slices((order, positions))


def _spread_copies(ds, rows, columns):
  """Deals each run of rows x columns elements out as torchvision's RASampler
  deals its stream to `columns` replicas: element i * columns + c goes to
  position c * rows + i, the c-th replica's chunk of `rows`. So the copies
  of a repeated example, next to each other in the stream, go to different
  replicas (with fewer replicas than copies, some share one)."""
  def dealt(*block):
    def transposed(t):
      grid = tf.reshape(t, [rows, columns, *t.shape[1:]])
      grid = tf.transpose(grid, [1, 0, *range(2, len(t.shape) + 1)])
      return tf.reshape(grid, [rows * columns, *t.shape[1:]])
    return tf.nest.map_structure(transposed, block)
  return ds.batch(rows * columns, drop_remainder=True).map(dealt).unbatch()


def _keep_own_chunks(ds, context, per_replica_batch):
  """Keeps the per-replica chunks this input pipeline feeds, in order."""
  replicas_per_pipeline = context.num_replicas_in_sync // context.num_input_pipelines
  ds = ds.batch(per_replica_batch * replicas_per_pipeline, drop_remainder=True)
  ds = ds.shard(context.num_input_pipelines, context.input_pipeline_id)
  return ds.unbatch()


def _indexed_train(source, split, spec, start_step, context):
  per_replica, pipeline_batch = _pipeline_batch(context, spec)
  n = split.num_examples
  length = repeated_epoch(n, spec.repeats, context.num_replicas_in_sync)
  first_epoch, offset = divmod(start_step * spec.global_batch_size, length)
  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(
      lambda epoch: _epoch_indices(n, spec.seed, epoch, spec.repeats, length)).skip(offset)
  if spec.repeats > 1:
    ds = _spread_copies(ds, per_replica, context.num_replicas_in_sync)
  ds = _keep_own_chunks(ds, context, per_replica)
  return _train_batches(ds, _indexed_fetch(split), source, split, spec, per_replica)


def _indexed_fetch(split):
  """fetch() for _preprocessor: an (index, global position) element's
  example, seeded by its position in the global order."""
  def fetch(index, global_position):
    return (global_position,) + split.fetch(index)
  return fetch


def _indexed_eval(source, split, spec, context):
  per_replica, pipeline_batch = _pipeline_batch(context, spec)
  n = split.num_examples
  steps = math.ceil(n / spec.global_batch_size)
  ds = _keep_own_chunks(tf.data.Dataset.range(steps * spec.global_batch_size),
                        context, per_replica)
  ds = ds.filter(lambda position: position < n)
  return _eval_batches(ds, lambda index: (index,) + split.fetch(index), source, split, spec,
                       steps * pipeline_batch, per_replica)


# --- Record splits -----------------------------------------------------------
#
# A record's key is (epoch * files in the split + its file) * _FILE_STRIDE +
# its index in the file: it seeds the record's augmentation, whatever order
# the files are interleaved in, and names the record in errors.

_FILE_STRIDE = 2**32


def shard_of(split, num_pipelines, pipeline_id):
  """(files, records of this pipeline, example-level?) for one input pipeline.
  Sharded by example, a pipeline keeps the records whose index in their file
  is pipeline_id modulo num_pipelines."""
  if len(split.files) >= num_pipelines:
    return split.files[pipeline_id::num_pipelines], sum(split.counts[pipeline_id::num_pipelines]), False
  return (split.files, sum(len(range(pipeline_id, c, num_pipelines)) for c in split.counts),
          True)


def _shard_files(split, num_pipelines, pipeline_id, example_level):
  """(indices in the split, record counts) of a pipeline's files (every file,
  sharded by example)."""
  indices = range(len(split.files)) if example_level else range(
      pipeline_id, len(split.files), num_pipelines)
  return (tf.constant(list(indices), tf.int64),
          tf.constant([split.counts[i] for i in indices], tf.int64))


def _file_order(num_files, seed, epoch):
  """Indices of a pipeline's files in one epoch's order; the same on every
  pipeline, as example-level sharding needs."""
  return tf.random.experimental.stateless_shuffle(
      tf.range(num_files), seed=tf.stack([tf.constant(seed + seeds.ORDER, tf.int64), epoch]))


def _keeper(num_pipelines, pipeline_id, example_level):
  """keep(index in the file) for _interleave: the records of a pipeline sharded by example."""
  if not example_level:
    return None
  return lambda index: index % num_pipelines == pipeline_id


def _interleave(files, num_files, remote, keep=None, deterministic=True):
  """(key, (record, (path, key))) of a dataset of (file, record count, base):
  key = base + the record's index in its file; keep(index): whether to keep a
  record. Files are read num_files at once (at most _CYCLE_LENGTH), in
  turns or, not deterministic, as their records arrive.

  A corrupt record (its CRC does not match) ends TFRecordDataset's reading of
  its file. Each file is therefore filled up to its known count with
  records.CORRUPT, so the records lost are skipped and counted like any bad
  image (or, under strict, stop the run naming the file), and every later
  position, the epoch length and resuming stay what the headers say.
  """
  buffer = _GCS_READ_BUFFER if remote else None

  def records(path, count, base):
    read = tf.data.TFRecordDataset(path, buffer_size=buffer).ignore_errors()
    filled = read.concatenate(tf.data.Dataset.from_tensors(records_lib.CORRUPT).repeat())
    keyed = filled.take(count).enumerate(base)
    if keep is not None:
      keyed = keyed.filter(lambda key, record: keep(key % _FILE_STRIDE))
    # Returns only its arguments, so tf.data skips calling it per record.
    return keyed.map(lambda key, record: (key, (record, (path, key))))

  cycle = min(_CYCLE_LENGTH, num_files)
  return files.interleave(records, cycle_length=cycle, block_length=1, num_parallel_calls=cycle,
                          deterministic=deterministic)


def _remote(files):
  return any(f.startswith("gs://") for f in files)


def _record_seed(spec, epoch, pipeline_id):
  return tf.stack([tf.constant(spec.seed + seeds.ORDER, tf.int64),
                   epoch * seeds.RECORD_EPOCH_STRIDE + pipeline_id])


def _record_train(source, split, spec, start_step, context):
  per_replica, pipeline_batch = _pipeline_batch(context, spec)
  p, num_pipelines = context.input_pipeline_id, context.num_input_pipelines
  files, count, example_level = shard_of(split, num_pipelines, p)
  if count < pipeline_batch:
    raise ConfigError(f"input pipeline {p} has {count} training examples, fewer than "
                      f"its {pipeline_batch} per step")
  indices, counts = _shard_files(split, num_pipelines, p, example_level)
  paths, remote = tf.constant(files), _remote(files)
  keep = _keeper(num_pipelines, p, example_level)

  replicas = context.num_replicas_in_sync // num_pipelines
  length = repeated_epoch(count, spec.repeats, replicas)
  if length < pipeline_batch:
    raise ConfigError(f"input pipeline {p} has {count} training examples, {length} once "
                      f"rounded down for repeated augmentation: fewer than its "
                      f"{pipeline_batch} per step")

  def epoch_records(epoch):
    order = _file_order(len(files), spec.seed, epoch)
    bases = (epoch * len(split.files) + tf.gather(indices, order)) * _FILE_STRIDE
    files_of_epoch = tf.data.Dataset.from_tensor_slices(
        (tf.gather(paths, order), tf.gather(counts, order), bases))
    ds = _interleave(files_of_epoch, len(files), remote, keep, spec.deterministic)
    seed = _record_seed(spec, epoch, p)
    shuffle_seed = tf.random.stateless_uniform([], seed=seed, minval=None, maxval=None,
                                               dtype=tf.int64)
    # shuffle() pairs its op seed with the graph seed, and fails on a tensor op
    # seed when the graph seed is 0 (tf.random.set_seed(0)); this graph's own
    # seed makes the order depend on shuffle_seed alone.
    tf.compat.v1.get_default_graph().seed = 1
    ds = ds.shuffle(spec.shuffle_buffer, seed=shuffle_seed)
    return _repeated_records(ds, spec.repeats).take(length) if spec.repeats > 1 else ds

  first_epoch, offset = divmod(start_step * pipeline_batch, length)
  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch_records).skip(offset)
  if spec.repeats > 1:
    ds = _spread_copies(ds, per_replica, replicas)
  return _train_batches(ds, None, source, split, spec, per_replica)


def _repeated_records(ds, repeats):
  """Each (key, (record, where)) `repeats` times running, the copies keyed
  key * repeats + copy, so each is augmented its own way; where still names
  the record."""
  def copies(key, record_and_where):
    keys = key * repeats + tf.range(repeats, dtype=tf.int64)
    return keys, tf.nest.map_structure(lambda t: tf.repeat(t[None], repeats, 0),
                                       record_and_where)
  return ds.map(copies).unbatch()


def _record_eval(source, split, spec, context):
  per_replica, pipeline_batch = _pipeline_batch(context, spec)
  p, num_pipelines = context.input_pipeline_id, context.num_input_pipelines
  files, _, example_level = shard_of(split, num_pipelines, p)
  _, counts = _shard_files(split, num_pipelines, p, example_level)
  files_ds = tf.data.Dataset.from_tensor_slices(
      (tf.constant(files), counts, tf.zeros_like(counts)))
  ds = _interleave(files_ds, len(files), _remote(files),
                   _keeper(num_pipelines, p, example_level))
  steps = eval_steps(split, spec.global_batch_size, num_pipelines)
  return _eval_batches(ds, None, source, split, spec,
                       steps * pipeline_batch, per_replica)


# --- Through a tf.data service -------------------------------------------------
#
# The dataset a pipeline sends to the service starts from an endless range of
# split slots, which the dispatcher hands out one at a time to whichever
# worker asks (ShardingPolicy.DYNAMIC): slot s is a chunk of an epoch's
# order (indexed splits; service_chunk examples) or one file of an epoch's
# file order (record splits). Each slot goes to one worker, once. So, with no
# worker lost, every example of an epoch is trained on exactly once; the
# slots a lost worker held are skipped (at most once). Workers run at their
# own pace: the order of the batches, and which epochs meet in a batch near
# an epoch's end, differ from run to run. A run starts at the slot holding
# its step's position in the data: after a resume, the slots that were in
# flight at the checkpoint may be seen twice, or not at all, in that epoch.
# Undecodable images are skipped but not counted: each worker sees only its
# own slots.

def service_chunk(num_examples):
  """Examples per slot: 128, or a 1024th of a larger epoch, as each slot
  shuffles the whole epoch's indices to find its own."""
  return max(128, num_examples // 1024)


def _service_indexed(split, spec, start, context):
  """(index, position) of this pipeline's slots (every num_pipelines-th
  chunk) from the one holding global position `start`."""
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
    order = _epoch_order(n, spec.seed, epoch)[begin:end]
    return tf.data.Dataset.from_tensor_slices((order, positions))

  return tf.data.Dataset.range(first, 2**62, num_pipelines).flat_map(examples)


def _service_records(split, spec, start, context):
  """(key, (record, where)) of this pipeline's files, one slot each, from
  the file holding its share of global position `start`."""
  p, num_pipelines = context.input_pipeline_id, context.num_input_pipelines
  files, count, example_level = shard_of(split, num_pipelines, p)
  _, counts = _shard_files(split, num_pipelines, p, example_level)
  num_files, paths = len(files), tf.constant(files)
  first_epoch, offset = divmod(start // num_pipelines, count)
  # Sharded by example, a pipeline has a num_pipelines-th of each file.
  offset *= num_pipelines if example_level else 1
  done = tf.cumsum(tf.gather(counts, _file_order(num_files, spec.seed, first_epoch))) <= offset
  first = first_epoch * num_files + tf.reduce_sum(tf.cast(done, tf.int64))

  def file_of(slot):
    index = _file_order(num_files, spec.seed, slot // num_files)[slot % num_files]
    # The base gives each record of each epoch its own augmentation seed.
    return paths[index], counts[index], slot * _FILE_STRIDE

  ds = _interleave(tf.data.Dataset.range(first, 2**62).map(file_of), num_files,
                   _remote(files), _keeper(num_pipelines, p, example_level), deterministic=False)
  return ds.shuffle(spec.shuffle_buffer, seed=spec.seed + seeds.ORDER)


def _service_train(source, split, spec, start_step, context):
  """The training input of one pipeline, made by the service's workers."""
  per_replica, _ = _pipeline_batch(context, spec)
  start = start_step * spec.global_batch_size
  if isinstance(split, RecordSplit):
    ds, fetch = _service_records(split, spec, start, context), None
  else:
    ds, fetch = _service_indexed(split, spec, start, context), _indexed_fetch(split)
  ds = _decoded_batches(ds, fetch, source, split, spec, per_replica)

  def check(images, labels, where, skipped):
    # Each worker sees only its own slots: its skips are no count of the run's.
    return _checked(source.num_classes, images, labels, where, tf.zeros_like(skipped))

  ds = ds.map(check).prefetch(tf.data.AUTOTUNE)
  service = tf.data.experimental.service
  ds = ds.apply(service.distribute(
      processing_mode=service.ShardingPolicy.DYNAMIC, service=f"grpc://{spec.data_service}",
      job_name=f"{spec.job_name}-pipeline{context.input_pipeline_id}"))
  return _finish(ds)


# --- The dataset_fns ---------------------------------------------------------

# How each kind of split is read, for training and for evaluation.
_TRAIN_READERS = {IndexedSplit: _indexed_train, RecordSplit: _record_train}
_EVAL_READERS = {IndexedSplit: _indexed_eval, RecordSplit: _record_eval}

def train_dataset_fn(source, split_name, spec, start_step=0):
  """A dataset_fn yielding (images, labels, skipped) from start_step on."""
  split = source.split(split_name)

  def dataset_fn(context):
    if source.train_batches is not None:  # a source that makes its own (synthetic)
      return source.train_batches(spec, context)
    if spec.data_service:
      return _service_train(source, split, spec, start_step, context)
    return _TRAIN_READERS[type(split)](source, split, spec, start_step, context)

  return dataset_fn


def eval_steps(split, global_batch_size, num_pipelines=1):
  """Steps that cover the split exactly once on every pipeline."""
  if isinstance(split, RecordSplit):
    most = max(shard_of(split, num_pipelines, p)[1] for p in range(num_pipelines))
    return math.ceil(most / (global_batch_size // num_pipelines))
  return math.ceil(split.num_examples / global_batch_size)


def eval_dataset_fn(source, split_name, spec):
  """A dataset_fn yielding (images, labels, weights); weights are 0 on the padding."""
  split = source.split(split_name)

  def dataset_fn(context):
    return _EVAL_READERS[type(split)](source, split, spec, context)

  return dataset_fn


def _check_messages(num_classes):
  """The one line each of the input's checks stops a run with, by its marker,
  from the Assert data: [marker-with-details] [label] [record 7 of PATH | name]."""
  where = lambda fields: " ".join(fields[1:])
  skipped = "--strict_data stops here; without it they are skipped and counted"
  return {
      BAD_IMAGE: lambda f: f"undecodable image: {where(f)} ({skipped})",
      records_lib.BAD_RECORD: lambda f: (f"corrupt TFRecord: {where(f)} and the rest of that "
                                         f"file cannot be read ({skipped})"),
      records_lib.NOT_AN_EXAMPLE: lambda f: f"not a tf.train.Example: {where(f)} ({skipped})",
      MISSING_FEATURE: lambda f: (f"{f[0][len('resnet_dist: '):]}: {where(f)}; every record "
                                  "needs image/encoded and image/class/label"),
      BAD_LABEL: lambda f: f"label {f[1]} is outside 0..{num_classes - 1}: {' '.join(f[2:])}",
  }


@contextlib.contextmanager
def data_errors(num_classes):
  """The input pipeline's checks (BAD_IMAGE, BAD_LABEL, ...) as one-line DataErrors."""
  try:
    yield
  except tf.errors.InvalidArgumentError as e:
    # tf.debugging.Assert prints its data as "[marker] [label] [record] [7] [of] [path]".
    for marker, message in _check_messages(num_classes).items():
      if marker in e.message:
        fields = re.findall(r"\[(.*?)\]", e.message[e.message.index(marker) - 1:].splitlines()[0])
        raise DataError(message(fields)) from None
    decoder = re.search(r"Invalid (JPEG|PNG) data[^\n\[]*", e.message)
    if decoder:  # complete-looking but corrupt inside: the decoder does not name the file
      raise DataError(f"undecodable image ({decoder.group(0).strip()}); --strict_data stops "
                      "at such images, without it they are skipped and counted") from None
    missing = re.search(r"Feature: (\S+) \(data type: \w+\) is required but could not be found",
                        e.message)
    if missing:
      raise DataError(f"a record has no {missing.group(1)}; every record needs image/encoded "
                      f"and image/class/label") from None
    raise
  except (tf.errors.NotFoundError, tf.errors.PermissionDeniedError) as e:
    # A file listed at start that is gone or unreadable now (a dangling link).
    gone = re.search(r"(\S+); (No such file or directory|Permission denied)", e.message)
    if not gone:
      raise
    raise DataError(f"cannot read {gone.group(1)} ({gone.group(2).lower()}); --strict_data stops "
                    "at such files, without it they are skipped and counted") from None
