"""Reuse of a run's weights: the exported SavedModel, --init_checkpoint."""

import glob
import os
import subprocess
import sys

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
import numpy as np
import tensorflow as tf
from absl.testing import absltest

from resnet_dist import checkpoints, export, models
from resnet_dist.config import Config
from resnet_dist.data import sources
from resnet_dist.errors import ConfigError, StorageError
from tests import launching

# Loads a SavedModel and prints its probabilities for images.npy, in a fresh process.
PREDICT = """
import sys, numpy as np, tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
images = np.load(sys.argv[2])
out = model.signatures["serving_default"](images=tf.constant(images))
np.save(sys.argv[3], out["probabilities"].numpy())
"""


def make_run(model_dir, model="resnet20", num_classes=10, seed=0):
  """A model_dir with run.json and one checkpoint of a randomly initialised model."""
  tf.keras.utils.set_random_seed(seed)
  net = models.get_model(model, num_classes=num_classes, image_size=32)
  source = sources.Source(name="test", num_classes=num_classes, train_split="train",
                          eval_split="test", image_size=32, crop="inception",
                          mean=(100.0, 110.0, 120.0), std=(50.0, 60.0, 70.0))
  checkpoints.write_run_record(model_dir, Config.from_flat(model=model, image_size=32), source)
  tf.train.CheckpointManager(tf.train.Checkpoint(model=checkpoints.model_state(net)),
                             os.path.join(model_dir, "checkpoints"), 1).save(checkpoint_number=1)
  return net


class ExportTest(absltest.TestCase):

  def test_saved_model_in_a_fresh_process_predicts_as_the_model(self):
    model_dir = self.create_tempdir().full_path
    make_run(model_dir)
    export_dir = os.path.join(model_dir, "exported")
    result = launching.run("launch.export", f"--model_dir={model_dir}",
                           f"--checkpoint={model_dir}/checkpoints/ckpt-1",
                           f"--export_dir={export_dir}")
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    # Any size, not square, not the model's 32x32.
    images = np.random.RandomState(1).randint(0, 256, (5, 45, 61, 3)).astype(np.uint8)
    np.save(os.path.join(model_dir, "images.npy"), images)
    subprocess.run([sys.executable, "-c", PREDICT, export_dir, f"{model_dir}/images.npy",
                    f"{model_dir}/exported.npy"], check=True, env=launching.ENV)
    exported = np.load(f"{model_dir}/exported.npy")
    classifier, _ = export.load_classifier(model_dir)
    expected = classifier.serve(tf.constant(images))["probabilities"].numpy()
    self.assertEqual(exported.shape, (5, 10))
    np.testing.assert_allclose(exported.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(exported, expected, atol=1e-6)
    # The same preprocessing as evaluation: centre crop, resize, normalise.
    centre = tf.image.resize(images[:, 3:42, 11:50], [32, 32])
    logits = classifier.model((centre - (100.0, 110.0, 120.0)) / (50.0, 60.0, 70.0))
    np.testing.assert_allclose(tf.nn.softmax(logits), expected, atol=2e-3)

  def test_safetensors_export_loads_back_as_the_model(self):
    model_dir = self.create_tempdir().full_path
    net = make_run(model_dir)
    result = launching.run("launch.export", f"--model_dir={model_dir}", "--format=safetensors")
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    path = os.path.join(model_dir, "export", "1", "model.safetensors")
    self.assertEqual(result.stdout.strip(), f"exported {model_dir}/checkpoints/ckpt-1 to {path}")
    again = models.get_model("resnet20", num_classes=10, image_size=32)
    models.load_weights(again, path)
    for a, b in zip(net.variables, again.variables):
      np.testing.assert_array_equal(a.numpy(), b.numpy(), a.path)

  def test_an_unwritable_export_dir_a_damaged_checkpoint_and_no_run_are_refused(self):
    # In this process: launch.export turns these into exit statuses 74 and 2
    # with one line, as every entrypoint does (exits_test).
    model_dir = self.create_tempdir().full_path
    make_run(model_dir)
    blocker = os.path.join(model_dir, "file")
    open(blocker, "w").close()
    classifier, _ = export.load_classifier(model_dir)
    with self.assertRaisesRegex(StorageError, rf"^cannot write {blocker}/export \("):
      export.save(classifier, f"{blocker}/export")
    with self.assertRaisesRegex(StorageError, rf"^cannot write {blocker}/w.safetensors \("):
      export.save_weights(classifier, f"{blocker}/w.safetensors")
    data_file = glob.glob(os.path.join(model_dir, "checkpoints", "ckpt-1.data-*"))[0]
    with open(data_file, "r+b") as f:
      f.truncate(os.path.getsize(data_file) // 2)
    with self.assertRaisesRegex(ConfigError, r"^cannot read checkpoint .*ckpt-1 \("):
      export.load_classifier(model_dir)
    with self.assertRaisesRegex(ConfigError, r"has no run.json"):
      export.load_classifier(self.create_tempdir().full_path)


class InitCheckpointTest(absltest.TestCase):

  def assert_fresh_classifier_on_the_source_body(self, source, init_path):
    tf.keras.utils.set_random_seed(1)
    target = models.get_model("resnet20", num_classes=7, image_size=32)
    fresh_fc = target.get_layer("fc").kernel.numpy().copy()
    fresh = checkpoints.init_from(target, init_path)
    self.assertEqual(sorted(fresh), ["fc/bias", "fc/kernel"])
    for a, b in zip(source.variables, target.variables):
      if not a.path.startswith("fc/"):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), a.path)
    np.testing.assert_array_equal(target.get_layer("fc").kernel.numpy(), fresh_fc)

  def test_fine_tuning_keeps_the_body_and_starts_a_fresh_classifier(self):
    model_dir = self.create_tempdir().full_path
    source = make_run(model_dir, num_classes=10, seed=0)
    self.assert_fresh_classifier_on_the_source_body(
        source, checkpoints.find_checkpoint(model_dir))

  def test_fine_tuning_from_a_weights_file(self):
    tf.keras.utils.set_random_seed(0)
    source = models.get_model("resnet20", num_classes=10, image_size=32)
    path = os.path.join(self.create_tempdir().full_path, "published.safetensors")
    models.save_weights(source, path)
    self.assert_fresh_classifier_on_the_source_body(
        source, checkpoints.find_initial_weights(path))
    with self.assertRaisesRegex(ConfigError, r"weights file .*/nothing.pth does not exist"):
      checkpoints.find_initial_weights(os.path.join(os.path.dirname(path), "nothing.pth"))

  def test_same_classes_take_the_classifier_too(self):
    model_dir = self.create_tempdir().full_path
    source = make_run(model_dir, num_classes=10, seed=0)
    tf.keras.utils.set_random_seed(1)
    target = models.get_model("resnet20", num_classes=10, image_size=32)
    self.assertEmpty(checkpoints.init_from(target, checkpoints.find_checkpoint(model_dir)))
    np.testing.assert_array_equal(target.get_layer("fc").kernel.numpy(),
                                  source.get_layer("fc").kernel.numpy())

  def test_another_architecture_is_an_error(self):
    model_dir = self.create_tempdir().full_path
    make_run(model_dir, model="resnet20")
    target = models.get_model("resnet32", num_classes=10, image_size=32)
    with self.assertRaisesRegex(ConfigError, "not of this architecture .*no layer1.3/conv1/kernel"):
      checkpoints.init_from(target, checkpoints.find_checkpoint(model_dir))
    with self.assertRaisesRegex(ConfigError, "no checkpoint in"):
      checkpoints.find_checkpoint(self.create_tempdir().full_path)


if __name__ == "__main__":
  absltest.main()
