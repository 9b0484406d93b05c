"""Real datasets built on the fly: ImageNet TFRecords, image folders, TFDS.

Nothing is downloaded: the JPEGs and PNGs are encoded here, the TFRecords are
written in the standard layout, TFDS datasets are the embedded digits or
tfds.testing.mock_data.
"""

import dataclasses
import os
import struct
import tempfile

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import absltest, parameterized

from resnet_dist import checkpoints, data
from resnet_dist.data import (indexed_reader, pipeline, preprocess, records, sharding, skips,
                              sources)
from resnet_dist.errors import ConfigError, DataError


def context(num_pipelines, pipeline_id, num_replicas):
  return tf.distribute.InputContext(num_input_pipelines=num_pipelines,
                                    input_pipeline_id=pipeline_id,
                                    num_replicas_in_sync=num_replicas)


def jpeg(value, height=40, width=52):
  """A JPEG whose pixels are all `value`: its label can be read off the image."""
  return tf.io.encode_jpeg(np.full((height, width, 3), value, np.uint8), quality=100).numpy()


def numbered_records(directory, n, num_files, split="train"):
  """n JPEGs, example i has label i and pixels of value 2 * i (n <= 128)."""
  images = [jpeg(2 * i, 40 + i % 5, 52 - i % 3) for i in range(n)]
  return records.write_imagenet_records(directory, split, images, list(range(n)), num_files)


def labels_from_pixels(images):
  """Label i <- pixel value 2i (JPEG rounding stays well within 1)."""
  return np.round(images.numpy().reshape(images.shape[0], -1).mean(1) / 2).astype(int)


class ImagenetRecordsTest(parameterized.TestCase):

  def test_labels_become_zero_based_and_images_are_uint8(self):
    directory = self.create_tempdir().full_path
    numbered_records(directory, 12, 2, "validation")
    with tf.io.gfile.GFile(f"{directory}/validation-00000-of-00002", "rb") as f:
      first = tf.train.Example.FromString(next(iter(
          tf.data.TFRecordDataset(f.name).as_numpy_iterator())))
    self.assertEqual(first.features.feature["image/class/label"].int64_list.value[0], 1)
    source = data.get_source("imagenet", directory, num_classes=100)
    ds = data.eval_dataset_fn(source, "validation", data.InputSpec(4, 32))(context(1, 0, 1))
    labels, pixels = [], []
    for images, batch_labels, weights in ds:
      self.assertEqual(images.shape, (4, 32, 32, 3))
      self.assertEqual(images.dtype, tf.uint8)
      labels += batch_labels.numpy()[weights.numpy() > 0].tolist()
      pixels += labels_from_pixels(images)[weights.numpy() > 0].tolist()
    self.assertCountEqual(labels, range(12))   # 0-based: record label 1 is class 0
    self.assertEqual(labels, pixels)           # each label stays with its own image

  def test_the_crop_flag_picks_the_training_window_sampler(self):
    """--crop=random_resized reaches the decoding: on a horizontal ramp the
    windows differ from the default inception sampler's (same seeds, same
    order); evaluation's central crop is the same for both."""
    directory = self.create_tempdir().full_path
    ramp = np.broadcast_to(np.linspace(0, 255, 96).astype(np.uint8)[None, :, None], (64, 96, 3))
    records.write_imagenet_records(directory, "train", [tf.io.encode_jpeg(ramp).numpy()] * 16,
                                   list(range(16)), 2)
    source = data.get_source("imagenet", directory, num_classes=100)
    batches = {}
    for crop in ("", "random_resized"):
      spec = data.InputSpec(16, 32, deterministic=True, shuffle_buffer=1, crop=crop)
      images, labels, _ = next(iter(data.train_dataset_fn(source, "train", spec)(
          context(1, 0, 1))))
      batches[crop] = (images.numpy(), labels.numpy())
      evaluated = next(iter(data.eval_dataset_fn(source, "train", spec)(context(1, 0, 1))))
      batches[crop, "eval"] = evaluated[0].numpy()
    np.testing.assert_array_equal(batches[""][1], batches["random_resized"][1])
    self.assertFalse(np.array_equal(batches[""][0], batches["random_resized"][0]))
    np.testing.assert_array_equal(batches["", "eval"], batches["random_resized", "eval"])

  @parameterized.parameters(1, 2, 3)
  def test_pipelines_partition_the_records(self, num_pipelines):
    # 2 files: file-level sharding for 1 and 2 pipelines, example-level for 3.
    directory = self.create_tempdir().full_path
    n = 26
    numbered_records(directory, n, 2)
    source = data.get_source("imagenet", directory, num_classes=100)
    split = source.split("train")
    seen = []
    for p in range(num_pipelines):
      _, count, example_level = sharding.shard_of(split, num_pipelines, p)
      self.assertEqual(example_level, num_pipelines > 2)
      # One replica per pipeline, per-replica batch 1: one epoch is `count` batches.
      # In order: `count` batches are exactly one epoch.
      config = data.InputSpec(num_pipelines, 32, shuffle_buffer=8, deterministic=True)
      ds = data.train_dataset_fn(source, "train", config)(context(num_pipelines, p, num_pipelines))
      epoch = [int(b[1][0]) for b in ds.take(count)]
      self.assertLen(set(epoch), count)       # no example twice within the epoch
      seen += epoch
    self.assertCountEqual(seen, range(n))     # together: the dataset, no overlap

  def test_repeated_augmentation_deals_each_records_copies_to_the_hosts_replicas(self):
    """--repeated_augmentations=2 on records, one pipeline feeding 2 replicas:
    each record's two copies go one to each replica, in the same step; an
    epoch keeps its 512 positions (520 rounded down to a multiple of 256) and
    holds 256 records twice each."""
    directory = self.create_tempdir().full_path
    images = [jpeg(i % 250, 8, 8) for i in range(520)]
    records.write_imagenet_records(directory, "train", images, list(range(520)), 2)
    source = data.get_source("imagenet", directory, num_classes=520)
    spec = data.InputSpec(8, 32, seed=1, deterministic=True, repeats=2, shuffle_buffer=64)
    ds = data.train_dataset_fn(source, "train", spec)(context(1, 0, 2))
    batches = [b[1].numpy().tolist() for b in ds.take(64)]  # replica 0, replica 1, ...
    for step in range(32):
      self.assertEqual(batches[2 * step], batches[2 * step + 1], step)
    counts = np.bincount(np.concatenate(batches), minlength=520)
    self.assertEqual(set(counts.tolist()), {0, 2})

  def test_eval_is_exact_with_two_replicas_and_an_odd_count(self):
    directory = self.create_tempdir().full_path
    n = 37
    numbered_records(directory, n, 3, "validation")
    source = data.get_source("imagenet", directory, num_classes=100)
    split = source.split("validation")
    steps = data.eval_steps(split, 8, num_pipelines=2)
    counts = np.zeros(n)
    for p in range(2):
      batches = list(data.eval_dataset_fn(source, "validation", data.InputSpec(8, 32))(
          context(2, p, 2)))
      self.assertLen(batches, steps)
      for _, labels, weights in batches:
        np.add.at(counts, labels.numpy(), weights.numpy())
    np.testing.assert_array_equal(counts, np.ones(n))

  def test_resume_skips_to_the_same_records(self):
    directory = self.create_tempdir().full_path
    numbered_records(directory, 20, 3)
    source = data.get_source("imagenet", directory, num_classes=100)
    config = data.InputSpec(4, 32, seed=5, shuffle_buffer=6, deterministic=True)
    full = [b[1].numpy().tolist() for b in
            data.train_dataset_fn(source, "train", config)(context(1, 0, 1)).take(14)]
    resumed = [b[1].numpy().tolist() for b in
               data.train_dataset_fn(source, "train", config, start_step=9)(
                   context(1, 0, 1)).take(5)]
    self.assertEqual(resumed, full[9:])      # crosses into the second epoch
    self.assertNotEqual(full[:5], full[5:10])  # epochs are shuffled differently

  def test_cache_data_serves_the_same_examples_by_index(self):
    directory = self.create_tempdir().full_path
    numbered_records(directory, 10, 2)
    source = data.get_source("imagenet", directory, num_classes=100, cache=True)
    split = source.split("train")
    self.assertIsInstance(split, sources.IndexedSplit)
    spec = data.InputSpec(10, 32, deterministic=True)  # in order: a batch is an epoch
    ds = data.train_dataset_fn(source, "train", spec)(context(1, 0, 1))
    self.assertCountEqual(next(iter(ds))[1].numpy(), range(10))

  def test_record_counts_come_from_headers_and_truncation_is_named(self):
    directory = self.create_tempdir().full_path
    paths = numbered_records(directory, 7, 2)
    self.assertEqual([records.count_records(p) for p in paths], [4, 3])
    with open(paths[1], "r+b") as f:
      f.truncate(os.path.getsize(paths[1]) - 10)
    with self.assertRaisesRegex(ConfigError, "truncated TFRecord file .*train-00001"):
      records.count_records(paths[1])

  def test_missing_or_empty_data_fails_clearly(self):
    with self.assertRaisesRegex(ConfigError, "--data_dir=/no/such/dir does not exist"):
      data.get_source("imagenet", "/no/such/dir").split("train")
    with self.assertRaisesRegex(ConfigError, "needs --data_dir"):
      data.get_source("imagenet", "").split("train")
    directory = self.create_tempdir().full_path
    with self.assertRaisesRegex(ConfigError, "no ImageNet train files train-"):
      data.get_source("imagenet", directory).split("train")
    records.write_imagenet_records(directory, "train", [], [], 1)
    with self.assertRaisesRegex(ConfigError, "split in .* is empty"):
      data.get_source("imagenet", directory).split("train")


class BadImagesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.directory = self.create_tempdir().full_path
    images = [jpeg(2 * i) for i in range(10)]
    images[3] = images[3][:len(images[3]) // 2]                  # truncated
    images[6] = images[6][:200] + b"\x00" * 300 + images[6][-2:]  # garbage inside
    records.write_imagenet_records(self.directory, "train", images, list(range(10)), 1)
    records.write_imagenet_records(self.directory, "validation", images, list(range(10)), 1)
    self.source = data.get_source("imagenet", self.directory, num_classes=10)

  def test_bad_images_are_skipped_and_counted(self):
    # In order: the decoder's own rejection (garbage inside) is counted too.
    config = data.InputSpec(4, 32, shuffle_buffer=1, deterministic=True)
    batches = list(data.train_dataset_fn(self.source, "train", config)(
        context(1, 0, 1)).take(4))   # 16 good examples: two epochs of 8
    labels = np.concatenate([b[1].numpy() for b in batches])
    skipped = sum(int(tf.reduce_sum(b[2])) for b in batches)
    self.assertNotIn(3, labels)
    self.assertNotIn(6, labels)
    self.assertEqual(skipped, 4)  # two bad records in each of two epochs
    counted = sum(float(tf.reduce_sum(b[2])) for b in
                  data.eval_dataset_fn(self.source, "validation", config)(context(1, 0, 1)))
    self.assertEqual(counted, 8)  # the eval weights: 8 good examples of 10

  def test_out_of_order_a_jpeg_corrupt_inside_drops_its_batch_alone(self):
    # The decoding map is fused with its batch, so the decoder's rejection
    # fails the batch: it is dropped, the others train, and what was found
    # before decoding (the truncated image) is still counted.
    config = data.InputSpec(4, 32, shuffle_buffer=1)
    batches = list(data.train_dataset_fn(self.source, "train", config)(
        context(1, 0, 1)).take(8))
    labels = np.concatenate([b[1].numpy() for b in batches])
    self.assertEqual(labels.shape, (32,))
    self.assertNotIn(3, labels)
    self.assertNotIn(6, labels)
    self.assertEqual(set(labels), {0, 1, 2, 4, 5, 7, 8, 9})
    self.assertGreaterEqual(sum(int(tf.reduce_sum(b[2])) for b in batches), 2)

  def test_the_decoding_map_is_followed_by_its_batch_alone(self):
    """tf.data fuses a map followed directly by a batch, copying each image
    into its batch while it is in cache: out of order, nothing may stand
    between the two (docs/benchmarks.md: a tenth of the input's CPU)."""
    def stages(deterministic):
      ds = data.train_dataset_fn(self.source, "train", data.InputSpec(
          4, 32, deterministic=deterministic))(context(1, 0, 1))
      names = []
      while hasattr(ds, "_input_dataset"):
        names.append(type(ds).__name__)
        ds = ds._input_dataset  # pylint: disable=protected-access
      return names

    unordered = stages(False)
    batch = unordered.index("_BatchDataset")
    self.assertEqual(unordered[batch + 1], "_ParallelMapDataset", unordered)
    ordered = stages(True)  # in order, each rejection is skipped alone and counted
    self.assertNotEqual(ordered[ordered.index("_BatchDataset") + 1], "_ParallelMapDataset")

  def test_unusable_images_are_counted_on_the_next_example_across_groups(self):
    """An image found unusable before decoding (empty, cut short, not an image)
    is dropped in its group and counted on the next example kept, also when
    the next one is in a later group; so it is counted however the examples
    then leave the parallel decoding."""
    n = 2 * skips.GROUP + 2
    encoded = [jpeg(i) for i in range(n)]
    bad = {0: b"", 63: encoded[63][:100], 64: b"not an image", 100: encoded[100][:-2]}
    for i, image in bad.items():
      encoded[i] = image
    images = tf.constant(encoded)
    split = sources.IndexedSplit(n, lambda i: (tf.gather(images, i), i, tf.constant("")),
                                 encoded=True)
    elements = tf.data.Dataset.range(n).map(lambda i: {"index": i, "key": i})
    kept = list(skips.usable(elements, indexed_reader.reading(split), strict=False))
    self.assertEqual([int(example["label"]) for example in kept],
                     [i for i in range(n) if i not in bad])
    self.assertEqual({int(e["label"]): int(e["skipped"]) for e in kept if e["skipped"]},
                     {1: 1, 65: 2, 101: 1})

  def test_strict_data_stops_naming_the_file(self):
    config = data.InputSpec(4, 32, shuffle_buffer=1, strict=True, deterministic=True)
    ds = data.train_dataset_fn(self.source, "train", config)(context(1, 0, 1))
    with self.assertRaisesRegex(DataError,
                                "^undecodable image: record 3 of .*/train-00000-of-00001 "):
      with data.data_errors(10):
        list(ds.take(3))

  def test_strict_data_stops_at_a_jpeg_corrupt_inside_with_the_decoders_words(self):
    # Complete, with valid markers, garbage inside: only the decoder finds it,
    # and its error does not say which file it was decoding.
    images = [jpeg(2 * i) for i in range(4)]
    images[2] = images[2][:200] + b"\x00" * 300 + images[2][-2:]
    directory = self.create_tempdir().full_path
    records.write_imagenet_records(directory, "train", images, list(range(4)), 1)
    source = data.get_source("imagenet", directory, num_classes=10)
    config = data.InputSpec(4, 32, shuffle_buffer=1, strict=True, deterministic=True)
    with self.assertRaisesRegex(DataError, r"^undecodable image \(Invalid JPEG data.*\); "
                                           r"--strict_data stops at such images"):
      with data.data_errors(10):
        list(data.train_dataset_fn(source, "train", config)(context(1, 0, 1)).take(1))

  def test_labels_outside_the_classes_stop_the_run(self):
    records.write_imagenet_records(self.directory, "validation", [jpeg(1)], [12], 1)
    source = data.get_source("imagenet", self.directory, num_classes=10)
    ds = data.eval_dataset_fn(source, "validation", data.InputSpec(4, 32))(context(1, 0, 1))
    with self.assertRaisesRegex(DataError, "^label 12 is outside 0..9: record 0 of .*/validation-"):
      with data.data_errors(10):
        list(ds)


def corrupt_record(path, index):
  """Flips a byte inside a record's data: its CRC no longer matches, the file's size stays."""
  with open(path, "r+b") as f:
    position = 0
    for _ in range(index):
      f.seek(position)
      (length,) = struct.unpack("<Q", f.read(8))
      position += 12 + length + 4
    f.seek(position + 12 + 20)
    byte = f.read(1)[0]
    f.seek(position + 12 + 20)
    f.write(bytes([byte ^ 0xFF]))


class CorruptRecordTest(parameterized.TestCase):
  """TensorFlow reads no further in a file than its first corrupt record."""

  def setUp(self):
    super().setUp()
    self.directory = self.create_tempdir().full_path
    files = numbered_records(self.directory, 20, 2)  # file 0: labels 0, 2, ..., 18
    corrupt_record(files[0], 2)                      # loses labels 4, 6, ..., 18

  @parameterized.parameters(False, True)
  def test_the_records_after_a_corrupt_one_are_skipped_and_counted(self, cache_data):
    source = data.get_source("imagenet", self.directory, num_classes=20, cache=cache_data)
    config = data.InputSpec(4, 32, shuffle_buffer=1, deterministic=True)
    # 12 good records an epoch: two epochs and the first batch of a third.
    batches = list(data.train_dataset_fn(source, "train", config)(context(1, 0, 1)).take(7))
    labels = np.concatenate([b[1].numpy() for b in batches])
    self.assertEqual(set(labels), {0, 2} | set(range(1, 20, 2)))
    if not cache_data:  # in file order, so no lost record comes after the last batch's
      self.assertEqual(sum(int(tf.reduce_sum(b[2])) for b in batches), 16)  # 8 an epoch
    weights = [float(tf.reduce_sum(b[2])) for b in
               data.eval_dataset_fn(source, "train", config)(context(1, 0, 1))]
    self.assertEqual(sum(weights), 12)
    self.assertLen(weights, 5)  # 20 records in batches of 4, as the headers say

  def test_a_corrupt_record_in_the_start_up_sample_is_skipped(self):
    """Catches a decodability sample that reads through a corrupt record
    (record 2 of 10 is in the first file's share) and stops the run."""
    source = data.get_source("imagenet", self.directory, num_classes=20)
    pipeline.check_decodable(source.split("train"), "train")

  def test_strict_data_names_the_corrupt_record(self):
    source = data.get_source("imagenet", self.directory, num_classes=20)
    config = data.InputSpec(4, 32, shuffle_buffer=1, strict=True, deterministic=True)
    ds = data.train_dataset_fn(source, "train", config)(context(1, 0, 1))
    with self.assertRaisesRegex(DataError, "^corrupt TFRecord: record 2 of "
                                ".*/train-00000-of-00002 and the rest of that file"):
      with data.data_errors(20):
        list(ds.take(5))


class NotAnExampleTest(absltest.TestCase):

  def test_a_record_is_told_from_bytes_that_are_no_example_in_a_few_ops(self):
    examples = [tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x" * size]))}))
                .SerializeToString() for size in (0, 100, 200, 20000, 3000000)]  # 1 to 4 varint bytes
    others = [b"", records.CORRUPT, b"\xff\xfe not a proto", examples[2][:-1],
              examples[2] + b"\x0a\x00", b"\x0a\x05abc", b"\x12\x00"]
    verdicts = records.looks_like_examples(tf.constant(examples + others)).numpy()
    self.assertEqual(list(verdicts), [True] * len(examples) + [False] * len(others))

  def test_a_record_without_a_feature_is_skipped_and_counted_or_named_under_strict(self):
    directory = self.create_tempdir().full_path
    files = numbered_records(directory, 8, 1)
    written = list(tf.data.TFRecordDataset(files[0]).as_numpy_iterator())
    example = tf.train.Example.FromString(written[3])
    del example.features.feature["image/class/label"]
    written[3] = example.SerializeToString()
    with tf.io.TFRecordWriter(files[0]) as writer:
      for record in written:
        writer.write(record)
    source = data.get_source("imagenet", directory, num_classes=8)
    in_order = data.InputSpec(7, 32, deterministic=True)  # the first batch is the first epoch
    batch = next(iter(data.train_dataset_fn(source, "train", in_order)(context(1, 0, 1))))
    self.assertEqual(sorted(batch[1].numpy()), [0, 1, 2, 4, 5, 6, 7])
    self.assertEqual(int(tf.reduce_sum(batch[2])), 1)
    strict = data.InputSpec(7, 32, strict=True)
    with self.assertRaisesRegex(DataError, "^a record has no image/class/label: record 3 of "
                                ".*/train-00000-of-00001; every record needs"):
      with data.data_errors(8):
        next(iter(data.train_dataset_fn(source, "train", strict)(context(1, 0, 1))))


  def test_records_whose_labels_are_strings_are_named_as_such_at_start(self):
    """Records with image/class/label as bytes ("n01440764"): the images are
    fine, yet the run said none of them could be decoded."""
    directory = self.create_tempdir().full_path
    files = numbered_records(directory, 8, 1)
    written = list(tf.data.TFRecordDataset(files[0]).as_numpy_iterator())
    with tf.io.TFRecordWriter(files[0]) as writer:
      for record in written:
        example = tf.train.Example.FromString(record)
        del example.features.feature["image/class/label"]
        example.features.feature["image/class/label"].bytes_list.value.append(b"n01440764")
        writer.write(example.SerializeToString())
    source = data.get_source("imagenet", directory, num_classes=8)
    with self.assertRaisesRegex(DataError, r"^no record sampled from the train split can be "
                                           r"parsed: the first of \S+/train-00000-of-00001 holds "
                                           r"image/class/label as a bytes_list, not the "
                                           r"int64_list it must be$"):
      pipeline.check_decodable(source.split("train"), "train")

  def test_a_record_that_is_no_example_is_skipped_and_counted(self):
    """Catches a start-up sample or a pipeline that fails on a record whose
    bytes are not a tf.train.Example (TensorFlow's message about it quotes
    them, and they are not UTF-8)."""
    directory = self.create_tempdir().full_path
    files = numbered_records(directory, 8, 1)
    written = list(tf.data.TFRecordDataset(files[0]).as_numpy_iterator())
    written[0] = b"\xff\xfe not a proto"  # the first record the sample reads
    with tf.io.TFRecordWriter(files[0]) as writer:
      for record in written:
        writer.write(record)
    source = data.get_source("imagenet", directory, num_classes=8)
    pipeline.check_decodable(source.split("train"), "train")
    spec = data.InputSpec(7, 32, deterministic=True)  # the first batch is the first epoch
    batches = list(data.train_dataset_fn(source, "train", spec)(
        context(1, 0, 1)).take(1))
    self.assertEqual(sorted(batches[0][1].numpy()), list(range(1, 8)))
    self.assertEqual(int(tf.reduce_sum(batches[0][2])), 1)
    strict = data.InputSpec(7, 32, strict=True)
    with self.assertRaisesRegex(DataError, "^not a tf.train.Example: record 0 of .*/train-"):
      with data.data_errors(8):
        next(iter(data.train_dataset_fn(source, "train", strict)(context(1, 0, 1))))


class RemotePathTest(absltest.TestCase):

  def test_a_remote_path_that_cannot_be_read_is_one_line_that_says_so(self):
    """Catches a gs:// path reported as plainly missing (with no network or
    credentials TensorFlow cannot tell), or TensorFlow's own error escaping."""
    path = "gs://resnet-dist-no-such-bucket/data"
    for what, call in (("--data_dir", lambda: data.get_source("imagenet", path).split("train")),
                       ("image folder",
                        lambda: data.get_source("folder:" + path).split("train")),
                       ("checkpoint", lambda: checkpoints.find_checkpoint(path + "/ckpt-1"))):
      with self.assertRaisesRegex(ConfigError, r"(does not exist or cannot be read from here "
                                               r"\(credentials, network\)|^cannot read gs://)",
                                  msg=what):
        call()


PIXELS = {"ant": 40, "moth": 80, "zebra": 0, "only": 10}


def write_folder(root, classes, per_class, split="train", ext="jpg"):
  for name in classes:
    os.makedirs(os.path.join(root, split, name), exist_ok=True)
    for i in range(per_class):
      pixels = np.full((20 + i, 30, 3), PIXELS[name], np.uint8)
      encoded = (tf.io.encode_png(pixels) if ext == "png" else tf.io.encode_jpeg(pixels)).numpy()
      with open(os.path.join(root, split, name, f"{i}.{ext}"), "wb") as f:
        f.write(encoded)


class FolderTest(absltest.TestCase):

  def test_sorted_class_names_are_the_labels(self):
    root = self.create_tempdir().full_path
    write_folder(root, ["zebra", "ant", "moth"], 3)
    write_folder(root, ["ant", "moth", "zebra"], 2, split="val", ext="png")
    source = data.get_source("folder:" + root, image_size=32)
    self.assertEqual(source.class_names, ("ant", "moth", "zebra"))
    self.assertEqual((source.train_split, source.eval_split), ("train", "val"))
    self.assertEqual(source.split("train").num_examples, 9)
    for split in ("train", "val"):
      ds = data.eval_dataset_fn(source, split, data.InputSpec(3, 32))(context(1, 0, 1))
      for images, labels, _ in ds:
        for image, label in zip(images.numpy(), labels.numpy()):
          self.assertAlmostEqual(image.mean(), PIXELS[source.class_names[label]], delta=2)

  def test_hidden_entries_are_not_classes_or_images(self):
    """Catches a notebook's .ipynb_checkpoints becoming a class (every
    evaluation would then be scored against one more class than trained)."""
    root = self.create_tempdir().full_path
    write_folder(root, ["ant", "moth"], 2)
    os.makedirs(os.path.join(root, "train", ".ipynb_checkpoints"))
    with open(os.path.join(root, "train", "ant", ".hidden.jpg"), "wb") as f:
      f.write(b"not an image")
    source = data.get_source("folder:" + root, image_size=32)
    self.assertEqual(source.class_names, ("ant", "moth"))
    self.assertEqual(source.split("train").num_examples, 4)

  def test_a_dangling_link_is_skipped_and_counted_or_named_under_strict_data(self):
    """Catches the start-up sample or the pipeline failing with TensorFlow's
    NotFoundError on a file listed but gone."""
    root = self.create_tempdir().full_path
    write_folder(root, ["ant", "moth"], 3)
    os.symlink("/nonexistent.png", os.path.join(root, "train", "moth", "x.png"))
    source = data.get_source("folder:" + root, image_size=32)
    pipeline.check_decodable(source.split("train"), "train")
    spec = data.InputSpec(5, 32, deterministic=True)  # in order: unreadable files are counted
    ds = data.train_dataset_fn(source, "train", spec)(context(1, 0, 1))
    self.assertEqual(int(tf.reduce_sum(next(iter(ds))[2])), 1)  # one epoch: 5 of 6 files
    strict = data.train_dataset_fn(source, "train", dataclasses.replace(spec, strict=True))(
        context(1, 0, 1))  # in order, the unreadable file is in the first batch
    with self.assertRaisesRegex(DataError, r"^cannot read .*/train/moth/x.png \(no such file "
                                           r"or directory\); --strict_data stops"):
      with data.data_errors(2):
        next(iter(strict))

  def test_a_fifo_among_the_images_is_skipped_and_counted_or_named_under_strict_data(self):
    """A FIFO named like an image (as a file on a stalled mount behaves):
    reading it waited forever, hanging the run before its first steps."""
    root = self.create_tempdir().full_path
    write_folder(root, ["ant", "moth"], 3)
    os.mkfifo(os.path.join(root, "train", "moth", "x.png"))
    source = data.get_source("folder:" + root, image_size=32)
    spec = data.InputSpec(5, 32, deterministic=True)
    ds = data.train_dataset_fn(source, "train", spec)(context(1, 0, 1))
    self.assertEqual(int(tf.reduce_sum(next(iter(ds))[2])), 1)  # one epoch: 5 of 6 files
    strict = data.train_dataset_fn(source, "train", dataclasses.replace(spec, strict=True))(
        context(1, 0, 1))
    with self.assertRaisesRegex(DataError, r"^cannot read .*/train/moth/x.png#not-a-regular-"
                                           r"file \(no such file or directory\); --strict_data"):
      with data.data_errors(2):
        next(iter(strict))

  def test_a_data_dir_that_is_no_directory_is_named_as_what_it_is(self):
    root = self.create_tempdir().full_path
    fifo, plain = os.path.join(root, "fifo"), os.path.join(root, "file")
    os.mkfifo(fifo)
    open(plain, "w").close()
    with self.assertRaisesRegex(ConfigError, rf"^--data_dir={fifo} is a FIFO, not a directory$"):
      data.get_source("imagenet", fifo).split("train")
    with self.assertRaisesRegex(ConfigError, rf"^image folder {plain} is a file, not a "
                                             r"directory$"):
      data.get_source("folder:" + plain)
    with self.assertRaisesRegex(ConfigError, r"^--data_dir=/no/where does not exist$"):
      data.get_source("imagenet", "/no/where").split("train")

  def test_bad_folders_fail_clearly(self):
    root = self.create_tempdir().full_path
    with self.assertRaisesRegex(ConfigError, "has no train/ directory"):
      data.get_source("folder:" + root)
    write_folder(root, ["only"], 2)
    with self.assertRaisesRegex(ConfigError, "1 class directories; classification needs at least 2"):
      data.get_source("folder:" + root)
    with self.assertRaisesRegex(ConfigError, "image folder /no/where does not exist"):
      data.get_source("folder:/no/where")


class TfdsTest(absltest.TestCase):

  def test_large_or_varied_datasets_stream_the_same_examples(self):
    data_dir = self.create_tempdir().full_path
    in_memory = data.get_source("digits", data_dir)
    streamed = data.get_source("digits", data_dir)
    original = sources.MAX_IN_MEMORY_BYTES
    sources.MAX_IN_MEMORY_BYTES = 0
    try:
      split = streamed.split("test")
    finally:
      sources.MAX_IN_MEMORY_BYTES = original
    self.assertIsInstance(split, sources.RecordSplit)
    self.assertEqual(split.num_examples, 359)
    config = data.InputSpec(359, 32)
    a = next(iter(data.eval_dataset_fn(in_memory, "test", config)(context(1, 0, 1))))
    b = next(iter(data.eval_dataset_fn(streamed, "test", config)(context(1, 0, 1))))
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())  # PNG decoding == arrays
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())

  def test_mock_tfds_dataset_in_memory(self):
    # mock_data needs the dataset's metadata; this TFDS wheel ships none, so write it.
    data_dir = self.create_tempdir().full_path
    builder = tfds.builder("cifar10", data_dir=data_dir)
    template = tfds.core.ShardedFileTemplate(data_dir=builder.data_dir, dataset_name="cifar10",
                                             split="train", filetype_suffix="tfrecord")
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=name, shard_lengths=[24], num_bytes=0,
                            filename_template=template.replace(split=name))
        for name in ("train", "test")]))
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)
    with tfds.testing.mock_data(num_examples=24, data_dir=data_dir):
      source = data.get_source("tfds:cifar10", data_dir)
      self.assertEqual(source.num_classes, 10)
      self.assertEqual(source.crop, "pad_crop_flip")
      ds = data.train_dataset_fn(source, "train", data.InputSpec(8, 32))(context(1, 0, 1))
      images, labels, skipped = next(iter(ds))
    self.assertEqual(images.shape, (8, 32, 32, 3))
    self.assertTrue(np.all((labels.numpy() >= 0) & (labels.numpy() < 10)))
    self.assertEqual(int(tf.reduce_sum(skipped)), 0)

  def test_never_downloads_unless_asked(self):
    with self.assertRaisesRegex(ConfigError, "not in --data_dir.*--download"):
      data.get_source("tfds:mnist", self.create_tempdir().full_path)


class PreprocessTest(absltest.TestCase):

  def test_inception_crop_and_centre_crop(self):
    # Left half 0, right half 200: the centre crop keeps 87.5% of the shorter side.
    pixels = np.zeros((300, 400, 3), np.uint8)
    pixels[:, 200:] = 200
    encoded = tf.io.encode_png(pixels)
    seed = tf.constant([1, 2], tf.int64)
    centre = preprocess.preprocess(encoded, "inception", 64, False, seed, True)
    self.assertEqual(centre.shape, (64, 64, 3))
    self.assertAlmostEqual(float(tf.reduce_mean(tf.cast(centre, tf.float32))), 100, delta=3)
    crops = [preprocess.preprocess(encoded, "inception", 64, True,
                                   tf.constant([i, 3], tf.int64), True) for i in range(20)]
    means = [float(tf.reduce_mean(tf.cast(c, tf.float32))) for c in crops]
    self.assertGreater(np.std(means), 10)   # random crops land on different halves
    again = preprocess.preprocess(encoded, "inception", 64, True, tf.constant([0, 3], tf.int64),
                                  True)
    np.testing.assert_array_equal(again.numpy(), crops[0].numpy())  # stateless
    self.assertTrue(bool(preprocess.looks_decodable(tf.io.encode_jpeg(pixels))))
    self.assertFalse(bool(preprocess.looks_decodable(tf.io.encode_jpeg(pixels).numpy()[:-40])))
    self.assertFalse(bool(preprocess.looks_decodable(encoded.numpy()[:-20])))

  def test_the_evaluation_crop_is_the_central_87_5_percent_of_the_shorter_side(self):
    """Pixels that encode their own row and column: a crop off centre, of
    another size or none at all moves every value, and fails here (a mean
    over symmetric halves, the test above, cannot see it)."""
    rows, cols = np.meshgrid(np.arange(300), np.arange(400), indexing="ij")
    pixels = np.stack([cols // 2, rows // 2, np.zeros_like(rows)], -1).astype(np.uint8)
    out = preprocess.preprocess(tf.io.encode_png(pixels), "inception", 64, training=False,
                                seed=tf.constant([0, 0], tf.int64), encoded=True)
    side = int(0.875 * 300)  # 262, at rows 19..280 and columns 69..330
    top, left = (300 - side) // 2, (400 - side) // 2
    expected = tf.cast(tf.round(tf.image.resize(pixels[top:top + side, left:left + side],
                                                [64, 64])), tf.uint8)
    np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=1)
    whole = tf.cast(tf.round(tf.image.resize(pixels, [64, 64])), tf.uint8)
    self.assertGreater(np.abs(out.numpy().astype(int) - whole.numpy()).mean(), 5)

  def test_training_crops_cover_8_to_100_percent_at_aspect_3_4_to_4_3(self):
    """torchvision's RandomResizedCrop ranges, over 300 seeds: a crop of one
    fixed size or shape, or one outside the ranges, fails."""
    shape = tf.constant([300, 400], tf.int32)
    areas, aspects = [], []
    for i in range(300):
      _, _, height, width = preprocess._random_window(  # pylint: disable=protected-access
          shape, tf.constant([i, 7], tf.int64)).numpy()
      areas.append(height * width / (300 * 400))
      aspects.append(width / height)
    self.assertGreaterEqual(min(areas), 0.08 - 0.005)
    self.assertLessEqual(max(areas), 1.0)
    self.assertGreaterEqual(min(aspects), 3 / 4 - 0.02)
    self.assertLessEqual(max(aspects), 4 / 3 + 0.02)
    self.assertLess(min(areas), 0.15)   # the ranges are used, not one crop
    self.assertGreater(max(areas), 0.7)
    self.assertLess(min(aspects), 0.85)
    self.assertGreater(max(aspects), 1.2)


if __name__ == "__main__":
  # TFDS leaves an empty temp dir for each dataset it looks up unprepared: in the test's own.
  tempfile.tempdir = absltest.get_default_test_tmpdir()
  absltest.main()
