"""Throughput benchmarks; ratios are measured within one run on one machine.

  python -m launch.benchmark --mode=input
      ImageNet training preprocessing alone (JPEG decode-and-crop, resize,
      flip) on JPEGs of 500x375 pixels, the framework's pipeline against a
      bare tf.data pipeline of the same operations.
  python -m launch.benchmark --mode=train [--models=... --batch_sizes=...]
      training steps on synthetic on-device data, one subprocess per case
      (logical devices and peak memory are per process), with the model's
      FLOP/s against the machine's measured matmul peak, and a
      keras.applications ResNet-50 peer.
  python -m launch.benchmark --mode=e2e
      ResNet-20 end to end on real 32x32 JPEG TFRecords against synthetic input.

Prints a markdown table and writes the results as JSON (--output).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

flags.DEFINE_enum("mode", "input", ["input", "train", "e2e"], "What to measure.")
flags.DEFINE_integer("num_images", 512, "input: distinct JPEGs to generate.")
flags.DEFINE_integer("image_size", 224, "input: output image size.")
flags.DEFINE_integer("batch_size", 128, "input: batch size.")
flags.DEFINE_integer("warmup_batches", 5, "Batches (input) or steps (train) before timing.")
flags.DEFINE_float("seconds", 10.0, "Time spent measuring each case, at least.")
flags.DEFINE_string("output", "", "Write the results here as JSON.")
FLAGS = flags.FLAGS


def natural_jpegs(num_images, height=375, width=500, seed=0):
  """JPEGs at quality 90 of about 72 KB (ImageNet's median size and bytes are
  about 500x375 and 110 KB): smooth colour fields with sensor-like noise."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(seed)
  images = []
  for _ in range(num_images):
    base = tf.image.resize(rng.randint(0, 256, (48, 64, 3)).astype(np.float32), [height, width])
    noisy = tf.clip_by_value(base + rng.normal(0, 6, (height, width, 3)), 0, 255)
    images.append(tf.io.encode_jpeg(tf.cast(noisy, tf.uint8), quality=90).numpy())
  return images


def _rate(iterator, batch_size, warmup, seconds):
  """Images per second of an iterator of batches, after warm-up."""
  for _ in range(warmup):
    next(iterator)
  count, began = 0, time.perf_counter()
  while time.perf_counter() - began < seconds:
    next(iterator)
    count += 1
  return count * batch_size / (time.perf_counter() - began)


def _bare_pipeline(files, size, batch_size):
  """The same operations with nothing else: the yardstick for our own pipeline."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def load(record):
    encoded = tf.io.parse_single_example(
        record, {"image/encoded": tf.io.FixedLenFeature([], tf.string)})["image/encoded"]
    begin, crop, _ = tf.image.sample_distorted_bounding_box(
        tf.io.extract_jpeg_shape(encoded), tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10)
    image = tf.io.decode_and_crop_jpeg(
        encoded, tf.stack([begin[0], begin[1], crop[0], crop[1]]), channels=3)
    image = tf.image.random_flip_left_right(image)
    return tf.cast(tf.image.resize(image, [size, size]), tf.uint8)

  ds = tf.data.TFRecordDataset(files).repeat()
  return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(2)


def input_benchmark():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from resnet_dist import data  # pylint: disable=g-import-not-at-top
  from resnet_dist.data import records  # pylint: disable=g-import-not-at-top
  directory = tempfile.mkdtemp(prefix="resnet_dist_bench_")
  images = natural_jpegs(FLAGS.num_images)
  files = records.write_imagenet_records(directory, "train", images,
                                         [i % 1000 for i in range(len(images))], 8)
  source = data.get_source("imagenet", directory)
  config = data.InputConfig(FLAGS.batch_size, FLAGS.image_size, shuffle_buffer=1000)
  ours = data.train_dataset_fn(source, "train", config)(tf.distribute.InputContext())
  results = []
  for name, ds in (("resnet_dist", ours),
                   ("bare tf.data", _bare_pipeline(files, FLAGS.image_size, FLAGS.batch_size))):
    rate = _rate(iter(ds), FLAGS.batch_size, FLAGS.warmup_batches, FLAGS.seconds)
    results.append({"pipeline": name, "images_per_second": round(rate, 1)})
  results[0]["ratio_to_bare"] = round(results[0]["images_per_second"]
                                      / results[1]["images_per_second"], 3)
  for path in files:
    os.remove(path)
  os.rmdir(directory)
  mean_kb = sum(map(len, images)) / len(images) / 1024
  header = (f"ImageNet training preprocessing, {len(images)} JPEGs of 500x375 "
            f"({mean_kb:.0f} KB mean) -> {FLAGS.image_size}x{FLAGS.image_size}, "
            f"batch {FLAGS.batch_size}, {os.cpu_count()} cores")
  return header, results


def markdown(results):
  keys = list(dict.fromkeys(k for row in results for k in row))
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in results]
  return "\n".join(lines)


def main(argv):
  del argv
  header, results = {"input": input_benchmark}[FLAGS.mode]()
  print(header)
  print(markdown(results))
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump({"mode": FLAGS.mode, "setting": header, "results": results}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
