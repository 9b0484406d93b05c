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
