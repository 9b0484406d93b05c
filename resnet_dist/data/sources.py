"""Where examples come from: each source gives random access to a split by index.

Random access lets every input pipeline draw its slice of one global order,
which makes N pipelines see exactly the batches one pipeline sees, and makes
resuming at any step free and exact (pipeline.py).
"""

import dataclasses
import fcntl
import os
from typing import Callable

import numpy as np
import tensorflow as tf

from resnet_dist.errors import ConfigError

# Per-channel statistics on the 0..255 scale.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# In-memory TFDS splits beyond this size belong to a streaming source.
MAX_IN_MEMORY_BYTES = 4 << 30


@dataclasses.dataclass
class Split:
  """num_examples examples; fetch(index) -> (uint8 image [H, W, C], int64 label)."""
  num_examples: int
  fetch: Callable


@dataclasses.dataclass
class Source:
  """A dataset the pipeline can read.

  augment: "crop_flip" (pad 4, random crop, flip: CIFAR), "crop" (no flip:
  digits, where a mirrored 2 is not a 2), or "none". mean/std normalise the
  0..255 pixels. image_size is the size the source's images naturally have.
  """
  name: str
  num_classes: int
  train_split: str
  eval_split: str
  image_size: int
  augment: str = "crop_flip"
  mean: tuple = IMAGENET_MEAN
  std: tuple = IMAGENET_STD
  load_split: Callable = None   # split name -> Split
  _loaded: dict = dataclasses.field(default_factory=dict, repr=False)

  def split(self, name):
    """The split, loaded once: every evaluation reuses it."""
    if name not in self._loaded:
      self._loaded[name] = self.load_split(name)
    return self._loaded[name]


def _in_memory_split(images, labels):
  images = tf.constant(images)
  labels = tf.constant(labels, tf.int64)
  return Split(int(labels.shape[0]),
               lambda i: (tf.gather(images, i), tf.gather(labels, i)))


def _tfds_builder(name, data_dir, download):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if name == "digits":
    from resnet_dist.data import digits  # pylint: disable=g-import-not-at-top,unused-import
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(f"unknown TFDS dataset {name!r} (see tfds.list_builders())") from None
  if not builder.is_prepared():
    # digits is generated from scikit-learn's own files: preparing it downloads nothing.
    if name == "digits" or download:
      _prepare_once(builder)
    else:
      raise ConfigError(
          f"TFDS dataset {name!r} is not in --data_dir={builder.data_dir_root}; "
          "pass --download to fetch and prepare it, or point --data_dir at a prepared copy")
  return builder


def _prepare_once(builder):
  """Prepares a TFDS dataset; local worker processes racing to do it take turns."""
  root = builder.data_dir_root
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, f".{builder.name}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not builder.is_prepared():
      builder.download_and_prepare()


def tfds_source(name, data_dir=None, download=False):
  """Any TFDS image-classification dataset small enough to hold in memory."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _tfds_builder(name, data_dir, download)
  info = builder.info
  image_key, label_key = info.supervised_keys or ("image", "label")
  splits = list(info.splits.keys())
  train_split = "train" if "train" in splits else splits[0]
  eval_split = next((s for s in ("test", "validation") if s in splits), train_split)
  shape = info.features[image_key].shape
  if None in shape[:2]:
    raise ConfigError(f"TFDS dataset {name!r} has images of varying size; "
                      "it needs a streaming source, not an in-memory one")

  def load_split(split):
    if split not in info.splits:
      raise ConfigError(f"{name!r} has no split {split!r}; it has {', '.join(splits)}")
    if info.splits[split].num_examples == 0:
      raise ConfigError(f"split {split!r} of {name!r} is empty")
    if info.splits[split].num_bytes > MAX_IN_MEMORY_BYTES:
      raise ConfigError(f"split {split!r} of {name!r} is too large to hold in memory")
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    return _in_memory_split(arrays[image_key], arrays[label_key].astype(np.int64))

  digits = name == "digits"
  return Source(
      name=name, num_classes=info.features[label_key].num_classes,
      train_split=train_split, eval_split=eval_split, image_size=shape[0],
      augment="crop" if digits else "crop_flip",
      # digits: a foreground stroke on a zero background; mid-range statistics.
      mean=(64.0,) * 3 if digits else IMAGENET_MEAN,
      std=(96.0,) * 3 if digits else IMAGENET_STD,
      load_split=load_split)


def synthetic_source(num_classes, image_size, num_examples=1024):
  """Random uint8 images and labels, the same for every run: throughput work."""
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, (num_examples, image_size, image_size, 3), dtype=np.uint8)
  labels = rng.randint(0, num_classes, (num_examples,)).astype(np.int64)
  split = _in_memory_split(images, labels)
  return Source(name="synthetic", num_classes=num_classes, train_split="train",
                eval_split="validation", image_size=image_size, augment="none",
                load_split=lambda _: split)


def get_source(dataset, data_dir=None, download=False, num_classes=1000, image_size=224):
  """Resolves a --dataset value: digits, synthetic, tfds:NAME."""
  if dataset == "synthetic":
    return synthetic_source(num_classes, image_size)
  if dataset == "digits":
    return tfds_source("digits", data_dir)
  if dataset.startswith("tfds:") and dataset[len("tfds:"):]:
    return tfds_source(dataset[len("tfds:"):], data_dir, download)
  raise ConfigError(
      f"unknown dataset {dataset!r}; use digits, synthetic or tfds:NAME")


def default_data_dir():
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
