"""folder:PATH, the user's own images: PATH/<split>/<class name>/*.jpg|jpeg|png.
Hidden directories and files (names starting with ".") are not read.

Class names, sorted, are the label ids; every split uses the training split's
classes. Files are read by index, so sharding and resume are exact as for
in-memory data.
"""

import os

import tensorflow as tf

from resnet_dist.data.splits import IndexedSplit
from resnet_dist import errors
from resnet_dist.errors import ConfigError

EXTENSIONS = (".jpg", ".jpeg", ".png")
EVAL_SPLITS = ("validation", "val", "test")


def _visible(directory):
  """Sorted names in directory but hidden ones (.ipynb_checkpoints, .DS_Store):
  no tool that makes a hidden entry means it as data."""
  return sorted(d.rstrip("/") for d in tf.io.gfile.listdir(directory) if not d.startswith("."))


def _subdirs(directory):
  return [d for d in _visible(directory) if tf.io.gfile.isdir(os.path.join(directory, d))]


def _split_dirs(root):
  if not tf.io.gfile.isdir(root):
    raise ConfigError(errors.not_a_directory(f"image folder {root}", root))
  splits = _subdirs(root)
  if "train" not in splits:
    raise ConfigError(f"image folder {root} has no train/ directory (it has: "
                      f"{', '.join(splits) or 'nothing'})")
  return splits


def class_names(root):
  """Sorted class directories of root/train; at least two."""
  train = os.path.join(root, "train")
  names = _subdirs(train)
  if len(names) < 2:
    raise ConfigError(f"image folder {train} has {len(names)} class directories; "
                      "classification needs at least 2")
  return names


# Appended to the path of an entry that is no regular file (a FIFO, a socket,
# a device): reading it could wait forever, as a FIFO nobody writes does, so
# the read is of a name that does not exist, and the image is skipped and
# counted like any unreadable one (or named, under --strict_data).
NOT_REGULAR = "#not-a-regular-file"


def _not_regular(directory):
  """The names in a local directory that exist but are no regular files
  (after symbolic links); none on remote storage, which holds only files."""
  if "://" in directory:
    return set()
  with os.scandir(directory) as entries:
    return {e.name for e in entries if not e.is_file() and not e.is_dir()
            and os.path.exists(e.path)}


def list_split(root, split, names):
  """(paths, labels) of one split, in a fixed order."""
  directory = os.path.join(root, split)
  paths, labels = [], []
  unknown = sorted(set(_subdirs(directory)) - set(names))
  if unknown:
    raise ConfigError(f"{directory} has classes not in train/: {', '.join(unknown)}")
  for label, name in enumerate(names):
    class_dir = os.path.join(directory, name)
    if not tf.io.gfile.isdir(class_dir):
      continue
    odd = _not_regular(class_dir)
    for filename in _visible(class_dir):
      if filename.lower().endswith(EXTENSIONS):
        paths.append(os.path.join(class_dir, filename) + (NOT_REGULAR if filename in odd else ""))
        labels.append(label)
  if not paths:
    raise ConfigError(f"split {split!r} of image folder {root} has no "
                      f"{'/'.join(EXTENSIONS)} images")
  empty = [name for label, name in enumerate(names) if label not in set(labels)]
  if split == "train" and empty:
    raise ConfigError(f"class directory {os.path.join(directory, empty[0])} has no "
                      f"{'/'.join(EXTENSIONS)} images: a class the model could never learn")
  return paths, labels


def folder_splits(root):
  """(class names, train split name, eval split name, split name -> IndexedSplit loader)."""
  splits = _split_dirs(root)
  names = class_names(root)
  eval_split = next((s for s in EVAL_SPLITS if s in splits), "train")

  def load_split(split):
    if split not in splits:
      raise ConfigError(f"image folder {root} has no split {split!r}")
    paths, labels = list_split(root, split, names)
    paths = tf.constant(paths)
    labels = tf.constant(labels, tf.int64)

    def fetch(index):
      path = tf.gather(paths, index)
      return tf.io.read_file(path), tf.gather(labels, index), path

    return IndexedSplit(int(labels.shape[0]), fetch, encoded=True)

  return names, "train", eval_split, load_split
