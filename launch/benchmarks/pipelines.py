"""The pipelines --mode=input times (input.py): ours, built from a Config as
a training run builds it (resnet_dist.train), plain and with each
augmentation policy, and a bare tf.data pipeline of the same operations;
and the JPEGs they read."""

import numpy as np
import tensorflow as tf

from resnet_dist import data
from resnet_dist import run_setup
from resnet_dist.config import Config
from resnet_dist.data import records

# torchvision's two policies, and timm's RandAugment as the RSB A1/A2 recipes run it.
AUGMENTED = ("randaugment", "trivialaugment_wide", "rand-m7-mstd0.5-inc1")
# Ours and the bare pipeline's alike.
_SHUFFLE_BUFFER = 1000


def natural_jpegs(num_images, height=375, width=500, seed=0):
  """JPEGs at quality 90 of about 72 KB (ImageNet's median size and bytes are
  about 500x375 and 110 KB): smooth colour fields with sensor-like noise."""
  rng = np.random.RandomState(seed)
  images = []
  for _ in range(num_images):
    base = tf.image.resize(rng.randint(0, 256, (48, 64, 3)).astype(np.float32), [height, width])
    noisy = tf.clip_by_value(base + rng.normal(0, 6, (height, width, 3)), 0, 255)
    images.append(tf.io.encode_jpeg(tf.cast(noisy, tf.uint8), quality=90).numpy())
  return images


def write_records(directory, images):
  """The images as ImageNet's training TFRecords in directory: their files."""
  return records.write_imagenet_records(directory, "train", images,
                                        [i % 1000 for i in range(len(images))], num_files=8)


def compared(directory, files, image_size, batch_size):
  """{name: dataset}: ours plain and with each AUGMENTED policy, then the bare
  pipeline, all reading the TFRecords in directory (files)."""
  # The ImageNet crop at every --image_size (a real run's source would take
  # CIFAR's at 64 and below), as the bare pipeline's.
  config = Config.from_flat(dataset="imagenet", data_dir=directory, image_size=image_size,
                            global_batch_size=batch_size, shuffle_buffer=_SHUFFLE_BUFFER,
                            crop="inception")
  # The default strategy, a process's without any: its input is on the host.
  strategy = tf.distribute.get_strategy()
  source = run_setup.open_source(config, strategy)
  policies = {"resnet_dist": "none", **{f"resnet_dist {policy}": policy for policy in AUGMENTED}}
  pipelines = {}
  for name, policy in policies.items():
    spec = run_setup.train_input_spec(config.replace(augment=policy).validate(), strategy)
    pipelines[name] = data.train_dataset_fn(source, source.train_split, spec)(
        tf.distribute.InputContext())
  pipelines["bare tf.data"] = _bare_pipeline(files, image_size, batch_size, _SHUFFLE_BUFFER)
  return pipelines


def _bare_pipeline(files, size, batch_size, shuffle_buffer):
  """The same operations with nothing else, as a user would tune them by
  hand (files read in parallel, a shuffle buffer, autotuned parallelism and
  prefetch, out of order): the yardstick for our own pipeline."""

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

  ds = tf.data.Dataset.from_tensor_slices(files).repeat().interleave(
      tf.data.TFRecordDataset, cycle_length=len(files), num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=False)
  ds = ds.shuffle(shuffle_buffer)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
