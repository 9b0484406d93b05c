"""The input pipeline: the embedded dataset, sharding, exact evaluation, exact resume."""

import dataclasses
import os

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
import numpy as np
import tensorflow as tf
from absl.testing import absltest, parameterized

from resnet_dist import config as config_lib, data
from resnet_dist.data import digits, indexed_reader, preprocess
from resnet_dist.errors import ConfigError
from tests.fixtures import numbered_source


def context(num_pipelines, pipeline_id, num_replicas):
  return tf.distribute.InputContext(num_input_pipelines=num_pipelines,
                                    input_pipeline_id=pipeline_id,
                                    num_replicas_in_sync=num_replicas)


def labels_of(dataset, batches):
  return [batch[1].numpy().tolist() for batch in dataset.take(batches)]


class DigitsTest(absltest.TestCase):

  def test_split_is_stratified_fixed_and_disjoint(self):
    from sklearn.datasets import load_digits
    labels = load_digits().target
    train, test = digits.stratified_split(labels)
    self.assertEqual(len(train) + len(test), 1797)
    self.assertEmpty(np.intersect1d(train, test))
    for label in range(10):
      share = np.mean(labels[test] == label) / np.mean(labels == label)
      self.assertAlmostEqual(share, 1.0, delta=0.02)
    again_train, again_test = digits.stratified_split(labels)
    np.testing.assert_array_equal(test, again_test)

  def test_tfds_builder_serves_real_images(self):
    source = data.get_source("digits", self.create_tempdir().full_path)
    self.assertEqual(source.num_classes, 10)
    train, test = source.split("train"), source.split("test")
    self.assertEqual(train.num_examples + test.num_examples, 1797)
    self.assertEqual(test.num_examples, 359)
    image, label, _ = train.fetch(tf.constant(0, tf.int64))
    self.assertEqual(image.shape, (8, 8, 1))
    self.assertEqual(image.dtype, tf.uint8)
    self.assertGreater(int(tf.reduce_max(image)), 200)  # real strokes, scaled to 0..255

  def test_bad_dataset_names_fail_clearly(self):
    with self.assertRaisesRegex(ConfigError, "unknown dataset 'nope'"):
      data.get_source("nope")
    with self.assertRaisesRegex(ConfigError, "unknown TFDS dataset 'no_such_set'"):
      data.get_source("tfds:no_such_set", self.create_tempdir().full_path)
    with self.assertRaisesRegex(ConfigError, "not in --data_dir.*--download"):
      data.get_source("tfds:mnist", self.create_tempdir().full_path)


class PipelineTest(parameterized.TestCase):

  @parameterized.parameters(1, 2, 3)
  def test_pipelines_partition_every_global_batch(self, num_pipelines):
    n, global_batch = 60, 12
    source = numbered_source(n)
    config = data.InputSpec(global_batch, 32, seed=3, deterministic=True)
    single = labels_of(data.train_dataset_fn(source, "train", config)(context(1, 0, 1)), 15)
    replicas = num_pipelines * 2  # each pipeline feeds two replicas
    per_pipeline = [labels_of(data.train_dataset_fn(source, "train", config)(
        context(num_pipelines, i, replicas)), 15 * 2) for i in range(num_pipelines)]
    for step in range(15):
      union = []
      for batches in per_pipeline:
        union += batches[2 * step] + batches[2 * step + 1]
      self.assertCountEqual(union, single[step], f"step {step}")
    # Across 5 epochs' worth of steps, every example is seen 3 times, none more.
    seen = np.bincount(np.concatenate(single), minlength=n)
    np.testing.assert_array_equal(seen, np.full(n, 3))

  def test_epochs_are_different_permutations(self):
    source = numbered_source(24)
    spec = data.InputSpec(24, 32, deterministic=True)  # in order: a batch is an epoch
    ds = data.train_dataset_fn(source, "train", spec)(context(1, 0, 1))
    first, second = labels_of(ds, 2)
    self.assertCountEqual(first, range(24))
    self.assertCountEqual(second, range(24))
    self.assertNotEqual(first, second)

  def test_resume_continues_the_same_stream(self):
    source = numbered_source(50)
    config = data.InputSpec(8, 32, seed=7, deterministic=True)
    full = labels_of(data.train_dataset_fn(source, "train", config)(context(1, 0, 1)), 20)
    resumed = labels_of(data.train_dataset_fn(source, "train", config, start_step=13)(
        context(1, 0, 1)), 7)
    self.assertEqual(resumed, full[13:])

  def test_augmentation_depends_on_stream_position_not_on_pipeline(self):
    source = data.get_source("digits", self.create_tempdir().full_path)
    config = data.InputSpec(16, 32, seed=1, deterministic=True)
    one = next(iter(data.train_dataset_fn(source, "train", config)(context(1, 0, 2))))
    two = next(iter(data.train_dataset_fn(source, "train", config)(context(2, 0, 2))))
    np.testing.assert_array_equal(one[0].numpy(), two[0].numpy())
    self.assertEqual(one[0].shape, (8, 32, 32, 3))

  def test_out_of_order_examples_keep_their_augmentation(self):
    """Without --deterministic an example may leave the pipeline before those
    read ahead of it; its crop and augmentation still come from its place in
    the global order, not from the order it arrives in: each (example,
    augmented image) of one order is one of the other's, a few batches apart."""
    source = numbered_source(48)
    spec = data.InputSpec(16, 32, seed=4, augment=config_lib.AugmentConfig(policy="randaugment"))

    def examples(deterministic, batches):
      ds = data.train_dataset_fn(source, "train", dataclasses.replace(
          spec, deterministic=deterministic))(context(1, 0, 1))
      self.assertEqual(ds.options().deterministic, deterministic)
      return [(int(label), hash(image.tobytes())) for images, labels, _ in ds.take(batches)
              for image, label in zip(images.numpy(), labels.numpy())]

    ordered, unordered = examples(True, 9), examples(False, 9)  # three epochs each
    self.assertGreater(len(set(ordered[:96])), 80)  # the augmentations differ between epochs
    self.assertTrue(set(ordered[:96]) <= set(unordered), "an example augmented otherwise")
    self.assertTrue(set(unordered[:96]) <= set(ordered), "an example augmented otherwise")

  def test_repeated_augmentation_deals_the_stream_as_torchvisions_rasampler(self):
    """RASampler (torchvision's, timm's RepeatAugSampler): the epoch's
    permutation, each index `repeats` times running, replica r taking every
    R-th from r, the first floor(n // 256 * 256 / R) of them. Here 4 replicas
    on 2 pipelines, 3 repeats, 600 examples: 128 positions a replica."""
    n, repeats, replicas, per_replica = 600, 3, 4, 4
    spec = data.InputSpec(per_replica * replicas, 32, seed=2, deterministic=True,
                          repeats=repeats)
    length = data.repeated_epoch(n, repeats, replicas)
    self.assertEqual(length, 512)
    steps = length // (per_replica * replicas)
    streams = {r: [] for r in range(replicas)}
    for p in range(2):
      ds = data.train_dataset_fn(numbered_source(n), "train", spec)(context(2, p, replicas))
      for i, labels in enumerate(labels_of(ds, 2 * steps)):
        streams[2 * p + i % 2] += labels
    order = indexed_reader.epoch_order(n, 2, 0).numpy()
    repeated = np.repeat(order, repeats)
    for r in range(replicas):
      self.assertEqual(streams[r], repeated[r::replicas][:length // replicas].tolist(), r)
    # So the copies of an example sit on different replicas.
    seen = {}
    for r, stream in streams.items():
      for index in stream:
        seen.setdefault(index, []).append(r)
    self.assertTrue(all(len(set(rs)) == len(rs) for rs in seen.values()))
    self.assertGreater(sum(len(rs) == repeats for rs in seen.values()), 160)

  def test_repeated_copies_are_augmented_apart_and_resume_exactly(self):
    source = numbered_source(300)
    spec = data.InputSpec(8, 32, seed=4, deterministic=True, repeats=2,
                          augment=config_lib.AugmentConfig(policy="rand-m9-mstd0.5-inc1"))
    full = [(b[0].numpy(), b[1].numpy()) for b in data.train_dataset_fn(
        source, "train", spec)(context(1, 0, 1)).take(40)]  # 32 steps an epoch: into the next
    resumed = [(b[0].numpy(), b[1].numpy()) for b in data.train_dataset_fn(
        source, "train", spec, start_step=29)(context(1, 0, 1)).take(11)]
    for (image, label), (again, again_label) in zip(full[29:], resumed):
      np.testing.assert_array_equal(label, again_label)
      np.testing.assert_array_equal(image, again)
    images, labels = full[0]
    self.assertEqual(labels[0], labels[1])  # one replica: the copies run side by side
    differ = [not np.array_equal(images[i], images[i + 1]) for i in range(0, 8, 2)]
    self.assertGreaterEqual(sum(differ), 2)

  def test_training_input_is_autotuned_in_a_private_pool_of_the_physical_cores(self):
    source = numbered_source(16)
    spec = data.InputSpec(8, 32, slack=True)
    train = data.train_dataset_fn(source, "train", spec)(context(1, 0, 1)).options()
    self.assertNotEqual(train.autotune.enabled, False)
    self.assertEqual(train.threading.private_threadpool_size, data.input_threads())
    self.assertTrue(train.experimental_slack)
    self.assertFalse(train.deterministic)
    evaluation = data.eval_dataset_fn(source, "test", spec)(context(1, 0, 1)).options()
    self.assertTrue(evaluation.deterministic)  # evaluation reads in order, always
    cpus = os.sched_getaffinity(0)
    try:  # as under taskset -c 0: one core
      os.sched_setaffinity(0, {min(cpus)})
      self.assertEqual(data.input_threads(), 1)
    finally:
      os.sched_setaffinity(0, cpus)

  def test_eval_counts_every_example_exactly_once_with_two_replicas(self):
    n = 37  # odd, and not a multiple of the global batch
    source = numbered_source(n)
    config = data.InputSpec(8, 32)
    steps = data.eval_steps(source.split("test"), 8)
    counts = np.zeros(n)
    for pipeline in range(2):
      ds = data.eval_dataset_fn(source, "test", config)(context(2, pipeline, 2))
      batches = list(ds)
      self.assertLen(batches, steps)  # every pipeline runs the same number of steps
      for images, labels, weights in batches:
        self.assertEqual(images.shape, (4, 32, 32, 3))  # static, even on the last batch
        for label, weight in zip(labels.numpy(), weights.numpy()):
          counts[label] += weight
    np.testing.assert_array_equal(counts, np.ones(n))

  def test_batch_must_divide_among_replicas(self):
    with self.assertRaisesRegex(ConfigError, "--global_batch_size=10 does not divide among 4"):
      data.check_batch_divides(10, 4)

  def test_images_leave_as_uint8_and_normalize_on_the_device(self):
    source = numbered_source(16)
    images = next(iter(data.eval_dataset_fn(source, "test", data.InputSpec(8, 32))(
        context(1, 0, 1))))[0]
    self.assertEqual(images.dtype, tf.uint8)
    for dtype in (tf.float32, tf.bfloat16, tf.float16):
      normalized = data.normalize(images, (2.0, 3.0, 4.0), (2.0, 4.0, 8.0), dtype)
      self.assertEqual(normalized.dtype, dtype)
      # Every channel by its own mean and std: a swapped or broadcast channel fails.
      expected = (images.numpy().astype(np.float32) - [2.0, 3.0, 4.0]) / [2.0, 4.0, 8.0]
      np.testing.assert_allclose(tf.cast(normalized, tf.float32), expected, rtol=1e-2,
                                 atol=1e-2)


class FolderTest(absltest.TestCase):

  def test_an_empty_class_directory_is_a_one_line_error(self):
    root = self.create_tempdir().full_path
    png = tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy()
    for name in ("cat", "dog"):
      os.makedirs(os.path.join(root, "train", name))
    with open(os.path.join(root, "train", "cat", "1.png"), "wb") as f:
      f.write(png)
    with self.assertRaisesRegex(ConfigError, r"class directory .*train/dog has no .* images"):
      data.get_source(f"folder:{root}", image_size=32).split("train")


class RandomResizedCropTest(absltest.TestCase):
  """--crop=random_resized against torchvision's RandomResizedCrop.get_params:
  its distribution (mean area 0.392 of a 640x427 photo over 3,000 draws,
  measured with torchvision 0.29; MLPerf's sampler, inception, gives 0.354)
  and its fallback, worked out from its source by hand."""

  def windows(self, height, width, n):
    seeds = tf.stack([tf.zeros([n], tf.int64), tf.range(n, dtype=tf.int64)], axis=1)
    shape = tf.constant([height, width])
    return tf.map_fn(lambda seed: preprocess._random_resized_window(shape, seed), seeds,  # pylint: disable=protected-access
                     fn_output_signature=tf.int32).numpy()

  def test_windows_have_torchvisions_distribution(self):
    top, left, h, w = self.windows(427, 640, 3000).T
    self.assertTrue(np.all((top >= 0) & (left >= 0) & (h >= 1) & (w >= 1)))
    self.assertTrue(np.all((top + h <= 427) & (left + w <= 640)))
    share = h * w / (427 * 640)
    self.assertBetween(share.mean(), 0.38, 0.405)
    self.assertBetween(share.min(), 0.075, 0.1)
    # Each side is rounded on its own: the ratio may leave 3/4..4/3 by a pixel's worth.
    self.assertTrue(np.all((w / h > 3 / 4 - 1.5 / h) & (w / h < 4 / 3 + 1.5 / h)))
    np.testing.assert_array_equal(self.windows(427, 640, 5), self.windows(427, 640, 5))

  def test_an_image_no_try_fits_is_cut_to_the_ratio_range_and_centred(self):
    # No draw fits in 12 rows; torchvision: h = 12, w = round(12 * 4/3), centred.
    np.testing.assert_array_equal(self.windows(12, 1000, 3), [[0, 492, 12, 16]] * 3)
    np.testing.assert_array_equal(self.windows(1000, 12, 1), [[492, 0, 16, 12]])


def resampled(image, size, kernel, support):
  """PIL's resampling, in float64 (PIL itself rounds its weights to 22 bits):
  rows, then columns; output pixel i centred at (i + 1/2) * scale on the
  input, the kernel stretched by the scale when shrinking, every input pixel
  within reach weighted by it, the weights normalised. size: a side, or
  (height, width)."""
  height, width = (size, size) if isinstance(size, int) else size
  def along(pixels, out):
    n = pixels.shape[0]
    scale = n / out
    stretch = max(scale, 1.0)
    result = np.zeros((out,) + pixels.shape[1:])
    for i in range(out):
      centre = (i + 0.5) * scale
      lo = max(int(np.floor(centre - support * stretch + 0.5)), 0)
      hi = min(int(np.floor(centre + support * stretch + 0.5)), n)
      weights = np.array([kernel((j + 0.5 - centre) / stretch) for j in range(lo, hi)])
      result[i] = np.tensordot(weights / weights.sum(), pixels[lo:hi], axes=1)
    return result
  rows = along(image.astype(np.float64), height)
  return along(rows.transpose(1, 0, 2), width).transpose(1, 0, 2)


def triangle(x):
  return max(1.0 - abs(x), 0.0)


def keys_cubic(x, a=-0.5):
  x = abs(x)
  if x < 1:
    return ((a + 2) * x - (a + 3)) * x * x + 1
  return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a if x < 2 else 0.0


class ResizeTest(parameterized.TestCase):
  """Every resize (training's crops, evaluation's, the export's) goes through
  preprocess._resized: with --antialias, checked against PIL's algorithm
  written in numpy; without, TensorFlow's plain resize, rounded."""

  # Fine stripes two pixels wide, and a smooth ramp: aliasing shows on the
  # first, the kernels' shapes on both.
  STRIPES = np.tile(np.repeat(np.array([0, 255, 0, 255], np.uint8), 2)[None, :, None],
                    (48, 6, 3))[:, :45]
  RAMP = (np.add.outer(np.arange(45) * 5, np.arange(48) * 2)[..., None] % 256
          * np.ones(3)).astype(np.uint8)

  @parameterized.parameters(("bilinear", triangle, 1.0), ("bicubic", keys_cubic, 2.0))
  def test_shrinking_is_antialiased_as_pil(self, interpolation, kernel, support):
    for image in (self.STRIPES, self.RAMP):
      ours = preprocess._resized(tf.constant(image), 16, interpolation, antialias=True).numpy()  # pylint: disable=protected-access
      reference = np.clip(np.round(resampled(image, 16, kernel, support)), 0, 255)
      self.assertEqual(ours.dtype, np.uint8)
      self.assertLessEqual(np.abs(ours.astype(int) - reference).max(), 1, interpolation)
    # Without the filter's stretch, a shrink reads a few pixels of each
    # stripe and keeps stripes the image has no room for.
    aliased = preprocess._resized(tf.constant(self.STRIPES), 16, interpolation).numpy()  # pylint: disable=protected-access
    np.testing.assert_array_equal(aliased, np.clip(np.round(tf.image.resize(
        self.STRIPES, [16, 16], method=interpolation).numpy()), 0, 255))
    self.assertGreater(np.abs(aliased - resampled(self.STRIPES, 16, kernel, support)).max(), 20)

  def test_enlarging_interpolates_and_nearest_copies(self):
    image = self.RAMP[:8, :8]
    for antialias in (False, True):  # the same when enlarging
      ours = preprocess._resized(tf.constant(image), 20, "bilinear", antialias).numpy()  # pylint: disable=protected-access
      reference = np.round(resampled(image, 20, triangle, 1.0))
      self.assertLessEqual(np.abs(ours.astype(int) - reference).max(), 1)
    nearest = preprocess._resized(tf.constant(image), 16, "nearest").numpy()  # pylint: disable=protected-access
    np.testing.assert_array_equal(nearest, np.repeat(np.repeat(image, 2, 0), 2, 1))

  def test_evaluation_resizes_then_crops_as_torchvision(self):
    """--eval_resize_size: torchvision's Resize(20) then CenterCrop(16) of a
    30x47 image: resized to 20 x int(20 * 47 / 30) = 20 x 31, then rows
    round(2.0) = 2 and columns round(7.5) = 8 on (half to even), 16 each."""
    image = (np.add.outer(np.arange(30) * 7, np.arange(47) * 3)[..., None] % 256
             * np.ones(3)).astype(np.uint8)
    evaluate = tf.function(lambda image: preprocess.preprocess(  # as the pipeline: a graph
        image, "inception", 16, False, None, encoded=False, crop_fraction=16 / 20,
        antialias=True, resize_first=True))
    ours = evaluate(tf.constant(image)).numpy()
    reference = np.round(resampled(image, (20, 31), triangle, 1.0))[2:18, 8:24]
    self.assertLessEqual(np.abs(ours.astype(int) - reference).max(), 1)
    # Cropping first (MLPerf's) samples elsewhere: the crop's 24 pixels to 16.
    cropped_first = preprocess.preprocess(tf.constant(image), "inception", 16, False, None,
                                          encoded=False, crop_fraction=16 / 20,
                                          antialias=True).numpy()
    self.assertGreater(np.abs(cropped_first.astype(int) - reference).max(), 3)

  def test_random_picks_bilinear_or_bicubic_per_training_crop_and_evaluates_bicubic(self):
    """timm's RandomResizedCropAndInterpolation with its default 'random':
    each crop bilinear or bicubic at even odds; evaluation bicubic."""
    jpeg = tf.io.encode_jpeg(self.RAMP)
    crop = tf.function(lambda seed, interpolation: preprocess.preprocess(
        jpeg, "random_resized", 24, True, seed, encoded=True, interpolation=interpolation,
        antialias=True))
    picks = []
    for i in range(40):
      seed = tf.constant([5, i], tf.int64)
      got = crop(seed, "random").numpy()
      as_bilinear = np.array_equal(got, crop(seed, "bilinear").numpy())
      as_bicubic = np.array_equal(got, crop(seed, "bicubic").numpy())
      self.assertNotEqual(as_bilinear, as_bicubic, i)  # one of the two, and they differ
      picks.append(as_bilinear)
    self.assertBetween(np.mean(picks), 0.25, 0.75)
    for interpolation in ("random", "bicubic"):
      evaluated = preprocess.preprocess(jpeg, "inception", 24, False, None, encoded=True,
                                        interpolation=interpolation).numpy()
      np.testing.assert_array_equal(evaluated, preprocess.preprocess(
          jpeg, "inception", 24, False, None, encoded=True, interpolation="bicubic").numpy())

  def test_the_flag_reaches_training_and_evaluation(self):
    jpeg = tf.io.encode_jpeg(self.STRIPES)
    seed = tf.constant([1, 2], tf.int64)
    for training in (False, True):
      outputs = {interpolation: preprocess.preprocess(
          jpeg, "inception", 32, training, seed, encoded=True,
          interpolation=interpolation).numpy()
          for interpolation in ("bilinear", "bicubic", "nearest")}
      self.assertFalse(np.array_equal(outputs["bilinear"], outputs["bicubic"]), training)
      self.assertFalse(np.array_equal(outputs["bilinear"], outputs["nearest"]), training)
      antialiased = preprocess.preprocess(jpeg, "inception", 32, training, seed, encoded=True,
                                          antialias=True).numpy()
      self.assertFalse(np.array_equal(outputs["bilinear"], antialiased), training)


class DecodingEdgeTest(absltest.TestCase):

  def test_a_one_pixel_wide_jpeg_is_an_image_at_any_size(self):
    # The central crop of a 1-pixel side used to round to 0 pixels and fail.
    from resnet_dist.data import preprocess  # pylint: disable=g-import-not-at-top
    jpeg = tf.io.encode_jpeg(np.full((50, 1, 3), 200, np.uint8))
    for training in (False, True):
      image = preprocess.preprocess(jpeg, "inception", 224, training,
                                    tf.constant([1, 2], tf.int64), encoded=True)
      self.assertEqual(image.shape, (224, 224, 3))
      self.assertEqual(int(image.numpy().mean()), 200)

  def test_empty_short_and_unknown_files_do_not_look_decodable(self):
    from resnet_dist.data import preprocess  # pylint: disable=g-import-not-at-top
    pixels = np.zeros((8, 8, 3), np.uint8)
    jpeg, png = tf.io.encode_jpeg(pixels).numpy(), tf.io.encode_png(pixels).numpy()
    for encoded, decodable in ((b"", False), (b"\xff", False), (b"\xff\xd8\xff", False),
                               (jpeg[:-2], False), (b"\x00\x00\x00\x18ftypheic", False),
                               (b"hello", False), (jpeg, True), (png, True)):
      self.assertEqual(bool(preprocess.looks_decodable(tf.constant(encoded))), decodable,
                       encoded[:12])


if __name__ == "__main__":
  absltest.main()
