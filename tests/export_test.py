"""Reuse of a run's weights, in this process: export's refusals and files,
--init_checkpoint. (launch.export as a process, and the SavedModel loaded in
a fresh one: tests/launch_test.py.)"""

import contextlib
import glob
import os
import resource
import signal
from unittest import mock

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
import numpy as np
import tensorflow as tf
from absl.testing import absltest

from resnet_dist import checkpoints, export, models
from resnet_dist.errors import ConfigError, StorageError
from tests import fixtures

@contextlib.contextmanager
def disk_full_above(size):
  """Writes that would make a file larger than `size` fail, as on a full disk
  (RLIMIT_FSIZE; its SIGXFSZ ignored, so the write fails with EFBIG)."""
  limits = resource.getrlimit(resource.RLIMIT_FSIZE)
  handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (size, limits[1]))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, handler)


class ExportTest(absltest.TestCase):

  def test_safetensors_export_loads_back_as_the_model(self):
    model_dir = self.create_tempdir().full_path
    net = fixtures.make_run(model_dir)
    classifier, path = export.load_classifier(model_dir)
    self.assertEqual(path, f"{model_dir}/checkpoints/ckpt-1")
    target = os.path.join(model_dir, "w.safetensors")
    export.save_weights(classifier, target)
    again = models.get_model("resnet8", num_classes=10, image_size=32)
    models.load_weights(again, target)
    for a, b in zip(net.variables, again.variables):
      np.testing.assert_array_equal(a.numpy(), b.numpy(), a.path)

  def test_an_unwritable_export_dir_a_damaged_checkpoint_and_no_run_are_refused(self):
    # In this process: launch.export turns these into exit statuses 74 and 2
    # with one line, as every entrypoint does (exits_test).
    model_dir = self.create_tempdir().full_path
    fixtures.make_run(model_dir)
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


  def test_an_export_cut_short_by_the_disk_leaves_nothing_and_says_so(self):
    """The disk fills as an export is written (file sizes above 64 KB
    refused, as by a full disk): a SavedModel left export/<step>/variables/
    variables_temp/ behind, for a serving watcher of export/ to pick up, and
    safetensors ended in SafetensorError's traceback (exit 1, not 74)."""
    model_dir = self.create_tempdir().full_path
    fixtures.make_run(model_dir)
    classifier, path = export.load_classifier(model_dir)
    saved_model = export.default_dir(model_dir, path, of_ema=False)
    weights = os.path.join(model_dir, "export", "w", "model.safetensors")
    with disk_full_above(64 * 1024):
      with self.assertRaisesRegex(StorageError, rf"^cannot write {saved_model} \("):
        export.save(classifier, saved_model)
      with self.assertRaisesRegex(StorageError, rf"^cannot write {weights} \("):
        export.save_weights(classifier, weights)
    self.assertEqual(glob.glob(os.path.join(model_dir, "export", "**"), recursive=True),
                     [os.path.join(model_dir, "export", ""),
                      os.path.join(model_dir, "export", "w")])
    export.save(classifier, saved_model)  # with room again: whole, under its name
    self.assertTrue(tf.saved_model.contains_saved_model(saved_model))

  def test_a_checkpoint_rotated_away_as_it_is_read_gives_way_to_the_newest(self):
    """Beside a live run keeping few checkpoints, the latest one found can be
    deleted before it is read: export (and evaluate) said it could not be
    read, as though it were damaged."""
    model_dir = self.create_tempdir().full_path
    fixtures.make_run(model_dir)
    latest = os.path.join(model_dir, "checkpoints", "ckpt-1")
    rotated = os.path.join(model_dir, "checkpoints", "ckpt-0")  # found, then deleted
    with mock.patch.object(checkpoints, "find_checkpoint", side_effect=[rotated, latest]):
      _, path = export.load_classifier(model_dir)
    self.assertEqual(path, latest)
    damaged = os.path.join(model_dir, "checkpoints", "ckpt-1.index")
    with open(damaged, "r+b") as f:  # still there, but unreadable: said, not retried
      f.truncate(10)
    with self.assertRaisesRegex(ConfigError, r"^cannot read checkpoint .*ckpt-1 \("):
      export.load_classifier(model_dir)

  def test_the_ema_and_the_raw_weights_export_to_different_directories(self):
    """Catches `--use_ema=false` after an EMA export overwriting it in place
    (an EMA model.safetensors beside a raw SavedModel)."""
    path = "/runs/a/checkpoints/ckpt-88"
    self.assertEqual(export.default_dir("/runs/a", path, of_ema=True), "/runs/a/export/88-ema")
    self.assertEqual(export.default_dir("/runs/a", path, of_ema=False), "/runs/a/export/88")

  def test_a_garbled_index_is_one_line(self):
    """Catches the EMA probe (which launch.evaluate makes too) letting
    TensorFlow's 'not an sstable' escape as a traceback."""
    model_dir = self.create_tempdir().full_path
    fixtures.make_run(model_dir)
    with open(os.path.join(model_dir, "checkpoints", "ckpt-1.index"), "wb") as f:
      f.write(np.random.default_rng(0).bytes(200))
    with self.assertRaisesRegex(ConfigError, r"^cannot read checkpoint .*ckpt-1 \(.*\); "
                                             r"--checkpoint can name an earlier one$"):
      export.load_classifier(model_dir)


class InitCheckpointTest(absltest.TestCase):

  def assert_fresh_classifier_on_the_source_body(self, source, init_path):
    tf.keras.utils.set_random_seed(1)
    target = models.get_model("resnet8", num_classes=7, image_size=32)
    fresh_fc = target.get_layer("fc").kernel.numpy().copy()
    fresh = checkpoints.init_from(target, init_path)
    self.assertEqual(sorted(fresh), ["fc/bias", "fc/kernel"])
    for a, b in zip(source.variables, target.variables):
      if not a.path.startswith("fc/"):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), a.path)
    np.testing.assert_array_equal(target.get_layer("fc").kernel.numpy(), fresh_fc)

  def test_fine_tuning_keeps_the_body_and_starts_a_fresh_classifier(self):
    model_dir = self.create_tempdir().full_path
    source = fixtures.make_run(model_dir, num_classes=10, seed=0)
    self.assert_fresh_classifier_on_the_source_body(
        source, checkpoints.find_checkpoint(model_dir))

  def test_fine_tuning_from_a_weights_file(self):
    tf.keras.utils.set_random_seed(0)
    source = models.get_model("resnet8", num_classes=10, image_size=32)
    path = os.path.join(self.create_tempdir().full_path, "published.safetensors")
    models.save_weights(source, path)
    self.assert_fresh_classifier_on_the_source_body(
        source, checkpoints.find_initial_weights(path))
    with self.assertRaisesRegex(ConfigError, r"weights file .*/nothing.pth does not exist"):
      checkpoints.find_initial_weights(os.path.join(os.path.dirname(path), "nothing.pth"))

  def test_same_classes_take_the_classifier_too(self):
    model_dir = self.create_tempdir().full_path
    source = fixtures.make_run(model_dir, num_classes=10, seed=0)
    tf.keras.utils.set_random_seed(1)
    target = models.get_model("resnet8", num_classes=10, image_size=32)
    self.assertEmpty(checkpoints.init_from(target, checkpoints.find_checkpoint(model_dir)))
    np.testing.assert_array_equal(target.get_layer("fc").kernel.numpy(),
                                  source.get_layer("fc").kernel.numpy())

  def test_another_architecture_is_an_error(self):
    model_dir = self.create_tempdir().full_path
    fixtures.make_run(model_dir, model="resnet8")
    target = models.get_model("resnet20", num_classes=10, image_size=32)
    with self.assertRaisesRegex(ConfigError, "not of this architecture .*no layer1.1/conv1/kernel"):
      checkpoints.init_from(target, checkpoints.find_checkpoint(model_dir))
    with self.assertRaisesRegex(ConfigError, "no checkpoint in"):
      checkpoints.find_checkpoint(self.create_tempdir().full_path)


if __name__ == "__main__":
  absltest.main()
