"""Where examples come from.

A split is one of two kinds:
  IndexedSplit  random access by index (in-memory arrays, image folders). Every
                input pipeline draws its slice of one global order, so N
                pipelines see exactly the batches one pipeline sees, and
                resuming at any step is free and exact (indexed_reader.py).
  RecordSplit   TFRecord files streamed in order (ImageNet, large TFDS
                datasets), sharded by file, with the record count of each file
                known up front, so evaluation is exact and resuming skips
                straight to the right epoch.
"""

import dataclasses
import fcntl
import os
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from resnet_dist.data import folder, records
from resnet_dist.data.splits import IndexedSplit, RecordSplit
from resnet_dist.errors import ConfigError

# Per-channel statistics on the 0..255 scale.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# In-memory TFDS splits beyond this size belong to a streaming source.
MAX_IN_MEMORY_BYTES = 4 << 30


@dataclasses.dataclass
class Source:
  """A dataset the pipeline can read.

  crop: how training crops its images, a preprocess.CROPS entry. mean/std normalise the 0..255
  pixels. image_size is the size the source's images naturally have (0:
  they vary). class_names: label id -> name, when the source names its classes.
  """
  name: str
  num_classes: int
  train_split: str
  eval_split: str
  image_size: int
  crop: str = "pad_crop_flip"
  mean: tuple = IMAGENET_MEAN
  std: tuple = IMAGENET_STD
  load_split: Callable = None   # split name -> IndexedSplit or RecordSplit
  class_names: tuple = ()
  _loaded: dict = dataclasses.field(default_factory=dict, repr=False)

  cache: bool = False  # hold a TFRecord split in memory (--cache_data)
  # A source that makes its training batches itself: (InputSpec, InputContext)
  # -> dataset of (images, labels, skipped); None: the pipeline reads its splits.
  train_batches: Optional[Callable] = None

  def split(self, name):
    """The split, loaded once: every evaluation reuses it."""
    if name not in self._loaded:
      split = self.load_split(name)
      if self.cache and isinstance(split, RecordSplit):
        split = records.held_in_memory(split)
      self._loaded[name] = split
    return self._loaded[name]


def _in_memory_split(images, labels):
  images = tf.constant(images)
  labels = tf.constant(labels, tf.int64)
  return IndexedSplit(int(labels.shape[0]),
                      lambda i: (tf.gather(images, i), tf.gather(labels, i), tf.constant("")))


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
      # Re-read: a builder made before the data existed has no split info.
      builder = tfds.builder(name, data_dir=data_dir)
    else:
      raise ConfigError(
          f"TFDS dataset {name!r} is not in --data_dir={builder.data_dir_root}; "
          "pass --download to fetch and prepare it, or point --data_dir at a prepared copy")
  return builder


def _prepare_once(builder):
  """Prepares a TFDS dataset; local worker processes racing to do it take turns.

  The lock lives in the local temp dir, data_dir may be on GCS or read-only:
  in $TMPDIR (or /tmp) itself, which worker processes share, not in
  tempfile.gettempdir(), which an entrypoint points at a dir of its own.
  """
  lock_path = os.path.join(os.environ.get("TMPDIR") or "/tmp",
                           f"resnet_dist-prepare-{builder.name}.lock")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with open(lock_path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not builder.is_prepared():
      # One line instead of TFDS's progress bars, which fill stderr with redraws.
      print(f"preparing TFDS dataset {builder.name} in {builder.data_dir_root} (once)",
            flush=True)
      tfds.disable_progress_bar()
      builder.download_and_prepare()


def _check_labels(labels, num_classes, where):
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if bad.size:
    raise ConfigError(f"{where} has label {int(bad[0])}, outside 0..{num_classes - 1}")


def _style(image_size):
  """The crop for a source's native image size (0: sizes vary)."""
  return "pad_crop_flip" if 0 < image_size <= 64 else "inception"


def tfds_source(name, data_dir=None, download=False):
  """Any TFDS image-classification dataset: held in memory when its images share
  one size and the split fits in MAX_IN_MEMORY_BYTES, streamed otherwise."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _tfds_builder(name, data_dir, download)
  info = builder.info
  image_key, label_key = info.supervised_keys or ("image", "label")
  splits = list(info.splits.keys())
  train_split = "train" if "train" in splits else splits[0]
  eval_split = next((s for s in ("test", "validation") if s in splits), train_split)
  shape = info.features[image_key].shape
  image_size = 0 if None in shape[:2] or shape[0] != shape[1] else shape[0]
  num_classes = info.features[label_key].num_classes

  def load_split(split):
    if split not in info.splits:
      raise ConfigError(f"{name!r} has no split {split!r}; it has {', '.join(splits)}")
    if info.splits[split].num_examples == 0:
      raise ConfigError(f"split {split!r} of {name!r} is empty")
    if image_size == 0 or info.splits[split].num_bytes > MAX_IN_MEMORY_BYTES:
      return records.tfds_split(builder, split, image_key, label_key)
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    labels = arrays[label_key].astype(np.int64)
    _check_labels(labels, num_classes, f"split {split!r} of {name!r}")
    return _in_memory_split(arrays[image_key], labels)

  digits = name == "digits"
  return Source(
      name=name, num_classes=num_classes,
      train_split=train_split, eval_split=eval_split, image_size=image_size,
      crop="pad_crop" if digits else _style(image_size),
      # digits: a foreground stroke on a zero background; mid-range statistics.
      mean=(64.0,) * 3 if digits else IMAGENET_MEAN,
      std=(96.0,) * 3 if digits else IMAGENET_STD,
      load_split=load_split, class_names=tuple(info.features[label_key].names))


def imagenet_source(data_dir, num_classes=1000, image_size=224):
  """TFRecords in ImageNet's standard layout (records.IMAGENET_SPLITS): ImageNet
  itself, or a dataset of one's own written so (at --image_size <= 64, the
  32x32 augmentation applies)."""
  return Source(name="imagenet", num_classes=num_classes, train_split="train",
                eval_split="validation", image_size=0, crop=_style(image_size),
                load_split=lambda split: records.imagenet_split(data_dir, split))


def folder_source(root, image_size):
  names, train_split, eval_split, load_split = folder.folder_splits(root)
  return Source(name=f"folder:{root}", num_classes=len(names), train_split=train_split,
                eval_split=eval_split, image_size=0, crop=_style(image_size),
                load_split=load_split, class_names=tuple(names))


def synthetic_source(num_classes, image_size, num_examples=1024):
  """Random images and labels made once per input pipeline and repeated
  (pipeline.py): the step's speed without any input work. Evaluation reads
  num_examples images made from their index."""
  def fetch(index):
    seed = tf.stack([index, tf.constant(0x5E, tf.int64)])
    image = tf.random.stateless_uniform([image_size, image_size, 3], seed=seed, maxval=256,
                                        dtype=tf.int32)
    label = tf.random.stateless_uniform([], seed=seed + 1, maxval=num_classes, dtype=tf.int64)
    return tf.cast(image, tf.uint8), label, tf.constant("")

  def train_batches(spec, context):
    """One random batch per pipeline, repeated: no input work at all."""
    per_replica = context.get_per_replica_batch_size(spec.global_batch_size)
    seed = tf.constant([spec.seed, context.input_pipeline_id], tf.int64)
    size = spec.image_size
    images = tf.random.stateless_uniform([per_replica, size, size, 3], seed=seed, maxval=256,
                                         dtype=tf.int32)
    labels = tf.random.stateless_uniform([per_replica], seed=seed + 1, maxval=num_classes,
                                         dtype=tf.int64)
    batch = (tf.cast(images, tf.uint8), labels, tf.zeros([per_replica], tf.int32))
    return tf.data.Dataset.from_tensors(batch).repeat()

  split = IndexedSplit(num_examples, fetch)
  return Source(name="synthetic", num_classes=num_classes, train_split="train",
                eval_split="validation", image_size=image_size, crop="none",
                load_split=lambda _: split, train_batches=train_batches)


@dataclasses.dataclass(frozen=True)
class Opening:
  """What opening a source may need besides its --dataset argument."""
  data_dir: str = ""
  download: bool = False
  num_classes: int = 1000
  image_size: int = 224


# The source table (--dataset): a name, or a prefix ending in ":" that takes an
# argument, -> (open(argument, Opening) -> Source, the words --helpshort gives).
SOURCES = {
    "digits": (lambda _, o: tfds_source("digits", o.data_dir or default_data_dir()),
               "digits (embedded)"),
    "synthetic": (lambda _, o: synthetic_source(o.num_classes, o.image_size), "synthetic"),
    "imagenet": (lambda _, o: imagenet_source(o.data_dir, o.num_classes, o.image_size),
                 "imagenet (TFRecords in --data_dir)"),
    "tfds:": (lambda name, o: tfds_source(name, o.data_dir or default_data_dir(), o.download),
              "tfds:NAME (e.g. tfds:cifar10)"),
    "folder:": (lambda root, o: folder_source(root, o.image_size),
                "folder:PATH (PATH/<split>/<class>/*.jpg)"),
}
DATASETS_HELP = ", ".join(help_ for _, help_ in SOURCES.values())


def _entry(dataset):
  """(SOURCES key, its argument) of a --dataset value; (None, None) if none fits."""
  if dataset in SOURCES and not dataset.endswith(":"):
    return dataset, ""
  prefix = dataset.split(":", 1)[0] + ":"
  if ":" in dataset and prefix in SOURCES and len(dataset) > len(prefix):
    return prefix, dataset[len(prefix):]
  return None, None


def is_dataset_name(dataset):
  return _entry(dataset)[0] is not None


def get_source(dataset, data_dir=None, download=False, num_classes=1000, image_size=224,
               cache=False):
  """Opens a --dataset value (DATASETS_HELP) through its SOURCES entry."""
  key, argument = _entry(dataset)
  if key is None:
    raise ConfigError(f"unknown dataset {dataset!r}; use {DATASETS_HELP}")
  opening = Opening(data_dir=data_dir or "", download=download, num_classes=num_classes,
                    image_size=image_size)
  source = SOURCES[key][0](argument, opening)
  source.cache = cache
  return source


def default_data_dir():
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
