"""What in-process tests share: datasets made in the test process, the
embedded digits prepared once per target, a run's directory without
training, a quiet console."""

import contextlib
import io
import os

import numpy as np
import tensorflow as tf

from resnet_dist import checkpoints, models
from resnet_dist.config import Config
from resnet_dist.data import sources


def numbered_source(n, size=32):
  """Image i is filled with the value i % 256 and labelled i: examples are traceable."""
  images = np.broadcast_to((np.arange(n) % 256).astype(np.uint8)[:, None, None, None],
                           (n, size, size, 3)).copy()
  split = sources._in_memory_split(images, np.arange(n, dtype=np.int64))  # pylint: disable=protected-access
  return sources.Source(name="numbered", num_classes=n, train_split="train",
                        eval_split="test", image_size=size, crop="none",
                        mean=(0.0,) * 3, std=(1.0,) * 3, load_split=lambda _: split)


def digits_dir():
  """The embedded digits, prepared once per test target in its temp dir."""
  from absl.testing import absltest  # pylint: disable=g-import-not-at-top
  path = os.path.join(absltest.get_default_test_tmpdir(), "data")
  sources.tfds_source("digits", path)
  return path


@contextlib.contextmanager
def quiet():
  """A run's console lines kept off the test's output; yields what they were."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    yield out


def make_run(model_dir, model="resnet8", num_classes=10, seed=0):
  """A model_dir with run.json and one checkpoint of a randomly initialised
  model, as a run's; returns the model."""
  tf.keras.utils.set_random_seed(seed)
  net = models.get_model(model, num_classes=num_classes, image_size=32)
  source = sources.Source(name="test", num_classes=num_classes, train_split="train",
                          eval_split="test", image_size=32, crop="inception",
                          mean=(100.0, 110.0, 120.0), std=(50.0, 60.0, 70.0))
  checkpoints.write_run_record(model_dir, Config.from_flat(model=model, image_size=32), source)
  tf.train.CheckpointManager(tf.train.Checkpoint(model=checkpoints.model_state(net)),
                             os.path.join(model_dir, "checkpoints"), 1).save(checkpoint_number=1)
  return net


def assert_same_training(initial, a, b, per_variable=0.1, overall=0.02):
  """Two runs from the same `initial` weights ({key: array}) trained alike:
  every variable in `initial` moved in `a`, and its displacement in `b`
  differs from that in `a` by less than `per_variable` of its size (and all
  of them together by less than `overall`). A lost or doubled share of the
  gradient changes every displacement by about a half, which an absolute
  tolerance on weights that barely moved would not see."""
  total, differing = 0.0, 0.0
  for key, start in initial.items():
    moved, other = a[key] - start, b[key] - start
    size, gap = np.linalg.norm(moved), np.linalg.norm(moved - other)
    if not size > 0:
      raise AssertionError(f"{key} did not move")
    if gap > per_variable * size:
      raise AssertionError(f"{key}: displacements differ by {gap / size:.3g} of their size")
    total, differing = total + size**2, differing + gap**2
  if differing > overall**2 * total:
    raise AssertionError(f"displacements differ by {(differing / total)**0.5:.3g} of their size")


def make_image_folder(root, per_class=24, size=32, classes=("a", "b")):
  """root/train/<class>/<i>.png and root/validation/..., small random images."""
  rng = np.random.default_rng(0)
  for split in ("train", "validation"):
    for name in classes:
      directory = os.path.join(root, split, name)
      os.makedirs(directory)
      for i in range(per_class):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        tf.io.write_file(os.path.join(directory, f"{i:03d}.png"), tf.io.encode_png(pixels))


def images_to_fifos(root):
  """Every training image of root becomes a FIFO nobody writes: a read of
  it waits forever, as one on a stalled mount does. Renamed into place, so
  a read already open finishes."""
  for directory, _, files in os.walk(os.path.join(root, "train")):
    for name in files:
      path = os.path.join(directory, name)
      fifo = path + ".fifo"
      os.mkfifo(fifo)
      os.replace(fifo, path)
