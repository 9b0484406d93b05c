"""TFRecord sources: ImageNet in the standard layout, and TFDS datasets too large
or too varied in image size to hold in memory.
"""

import concurrent.futures
import struct

import tensorflow as tf

from resnet_dist.data.splits import IndexedSplit, RecordSplit
from resnet_dist import errors
from resnet_dist.errors import ConfigError

# The layout written by tensorflow/tpu's imagenet_to_gcs.py.
IMAGENET_SPLITS = {"train": "train-*-of-*", "validation": "validation-*-of-*"}
_IMAGENET_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}


# Stands in for the records of a file after a corrupt one, which cannot be
# read (record_reader._interleave); it is no Example, so it is skipped and counted.
CORRUPT = b"resnet_dist: corrupt record"
BAD_RECORD = "resnet_dist: corrupt TFRecord"
NOT_AN_EXAMPLE = "resnet_dist: not a tf.train.Example"
_VARINT_BYTES = 5   # an Example's length, up to 2**35 bytes


def looks_like_examples(records):
  """Per serialized record [n]: whether it is one tf.train.Example at its top
  level, its field 1 (features) and a length that covers the rest of it.

  A group of records is parsed by one op, which fails as a whole on a record
  that is no proto; this finds the usual such record (another format's bytes,
  the CORRUPT stand-in) in a few ops per group, so it alone is skipped. An
  Example damaged further inside still fails its group.
  """
  head = tf.cast(tf.io.decode_raw(records, tf.uint8, fixed_length=1 + _VARINT_BYTES), tf.int64)
  tag, varint = head[:, 0], head[:, 1:]
  more = varint >= 128
  size = tf.argmin(tf.cast(more, tf.int32), axis=1, output_type=tf.int64) + 1
  digits = tf.bitwise.left_shift(tf.bitwise.bitwise_and(varint, 127),
                                 tf.range(_VARINT_BYTES, dtype=tf.int64) * 7)
  in_varint = tf.range(_VARINT_BYTES, dtype=tf.int64)[None, :] < size[:, None]
  length = tf.reduce_sum(tf.where(in_varint, digits, 0), axis=1)
  return ((tag == 0x0A) & tf.reduce_any(~more, axis=1)
          & (1 + size + length == tf.cast(tf.strings.length(records), tf.int64)))


def count_records(path):
  """Records in one TFRecord file, read from the 12-byte record headers alone."""
  size = tf.io.gfile.stat(path).length
  count = position = 0
  with tf.io.gfile.GFile(path, "rb") as f:
    while position < size:
      f.seek(position)
      header = f.read(12)  # uint64 data length, uint32 masked CRC of the length
      if len(header) < 12:
        break
      (length,) = struct.unpack("<Q", header[:8])
      position += 12 + length + 4  # header, data, CRC of the data
      count += 1
  if position != size:
    raise ConfigError(f"truncated TFRecord file {path} (record {count} is cut short)")
  return count


def count_all(files):
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    return list(pool.map(count_records, files))


def _glob(data_dir, pattern, what):
  if not tf.io.gfile.isdir(data_dir):
    raise ConfigError(errors.not_a_directory(f"--data_dir={data_dir}", data_dir))
  files = sorted(tf.io.gfile.glob(f"{data_dir.rstrip('/')}/{pattern}"))
  if not files:
    raise ConfigError(f"no {what} files {pattern} in --data_dir={data_dir}")
  return files


def imagenet_split(data_dir, split):
  """One split of ImageNet TFRecords; labels 1..1000 in the files become 0..999."""
  if not data_dir:
    raise ConfigError("--dataset=imagenet needs --data_dir, the directory of its TFRecords")
  files = _glob(data_dir, IMAGENET_SPLITS[split], f"ImageNet {split}")
  counts = count_all(files)
  if not sum(counts):
    raise ConfigError(f"the ImageNet {split} split in {data_dir} is empty")

  def parse(record):
    features = tf.io.parse_single_example(record, _IMAGENET_FEATURES)
    return features["image/encoded"], features["image/class/label"] - 1

  return RecordSplit(files, counts, parse, _parse_imagenet_group)


def _parse_imagenet_group(records):
  """parse_group for ImageNet: a record without one of the features is named
  rather than failing its group (or, vectorized, the whole parse)."""
  features = tf.io.parse_example(
      records, {name: tf.io.RaggedFeature(spec.dtype) for name, spec in _IMAGENET_FEATURES.items()})
  image, label = features["image/encoded"], features["image/class/label"]
  missing = tf.where(image.row_lengths() != 1, "image/encoded",
                     tf.where(label.row_lengths() != 1, "image/class/label", ""))
  first = lambda values, default: values.to_tensor(default, shape=[None, 1])[:, 0]
  return first(image, b""), first(label, 1) - 1, missing


def tfds_split(builder, split, image_key, label_key):
  """A prepared TFDS split read as TFRecords, images left encoded for fused decoding."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
    raise ConfigError(f"TFDS dataset {builder.name!r} is stored as "
                      f"{builder.info.file_format.value}; only tfrecord can be streamed")
  info = builder.info.splits[split]
  decoders = {image_key: tfds.decode.SkipDecoding()}

  def parse(record):
    example = builder.info.features.deserialize_example(record, decoders=decoders)
    return example[image_key], tf.cast(example[label_key], tf.int64)

  return RecordSplit([str(p) for p in info.filepaths], list(info.shard_lengths), parse)


def held_in_memory(split):
  """A RecordSplit read once into memory, served by index (--cache_data).

  Indexed, it gets what in-memory data has: a fresh permutation of the whole
  split every epoch, the same global batches on any number of replicas, and
  exact resume. Each worker holds the whole split.
  """
  serialized, names = [], []
  for path, count in zip(split.files, split.counts):
    read = list(tf.data.TFRecordDataset(path).ignore_errors().as_numpy_iterator())
    serialized += read + [CORRUPT] * (count - len(read))
    names += [f"record {i} of {path}" for i in range(count)]
  serialized, names = tf.constant(serialized), tf.constant(names)

  def fetch(index):
    record, name = tf.gather(serialized, index), tf.gather(names, index)
    with tf.control_dependencies([tf.debugging.Assert(record != CORRUPT, [BAD_RECORD, name])]):
      image, label = split.parse(record)
    return image, label, name

  return IndexedSplit(len(names), fetch, encoded=True)


def write_imagenet_records(directory, split, encoded_images, labels, num_files):
  """Writes encoded images with 0-based labels as split-0000i-of-0000n TFRecords
  in the standard layout (labels stored 1-based). Returns the file paths.

  For tests and benchmarks, and for converting small datasets of one's own.
  """
  tf.io.gfile.makedirs(directory)
  paths = [f"{directory}/{split}-{i:05d}-of-{num_files:05d}" for i in range(num_files)]
  writers = [tf.io.TFRecordWriter(p) for p in paths]
  for i, (image, label) in enumerate(zip(encoded_images, labels)):
    example = tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label + 1])),
    }))
    writers[i % num_files].write(example.SerializeToString())
  for writer in writers:
    writer.close()
  return paths
