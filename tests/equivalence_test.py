"""Every strategy trains the same model: one device, 2 mirrored replicas, 2 workers.

With --sync_bn, a fixed seed and --deterministic, the same global batches
(the pipeline guarantees it) must give the same weights after several steps.
"""

import os
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf
from absl.testing import absltest

from resnet_dist.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--model=resnet20", "--dataset=digits", "--global_batch_size=32",
          "--train_steps=6", "--steps_per_loop=3", "--sync_bn", "--deterministic",
          "--seed=3", "--skip_eval", "--base_learning_rate=0.8", "--weight_decay=5e-4",
          "--label_smoothing=0.1", "--lr_schedule=cosine", "--warmup_epochs=0.1"]
TOLERANCE = 1e-5


def model_weights(model_dir):
  reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints"))
  return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
          if key.startswith("model/") and reader.get_tensor(key).dtype == np.float32}


class StrategyEquivalenceTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = os.path.join(absltest.get_default_test_tmpdir(), "data")
    sources.tfds_source("digits", cls.data_dir)  # prepared once, before any worker starts
    cls.env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cls.runs = {}
    for name, module, args in (
        ("one_device", "launch.train", ["--strategy=one_device"]),
        ("mirrored", "launch.train", ["--strategy=mirrored", "--num_cpu_devices=2"]),
        ("multi_worker", "launch.multi_worker", ["--num_workers=2", "--"])):
      model_dir = tempfile.mkdtemp(prefix=f"{name}-", dir=absltest.get_default_test_tmpdir())
      result = subprocess.run(
          [sys.executable, "-m", module, *args, *COMMON, f"--model_dir={model_dir}",
           f"--data_dir={cls.data_dir}"],
          cwd=ROOT, env=cls.env, capture_output=True, text=True, timeout=600)
      assert result.returncode == 0, f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
      cls.runs[name] = model_weights(model_dir)

  def assert_same_weights(self, a, b):
    self.assertEqual(sorted(a), sorted(b))
    self.assertGreater(len(a), 50)
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    self.assertLess(worst, TOLERANCE)
    return worst

  def test_training_moved_the_weights(self):
    # Guards the comparisons below against a run that trained nothing.
    initial = subprocess.run(
        [sys.executable, "-c", "import keras; from resnet_dist import models; "
         "keras.utils.set_random_seed(3); m = models.get_model('resnet20', num_classes=10, "
         "sync_bn=True, image_size=32); print(float(m.get_layer('fc').kernel.numpy()[0, 0]))"],
        cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=120)
    trained = [v for k, v in self.runs["one_device"].items() if k.startswith("model/") and
               v.shape == (64, 10)][0]
    self.assertNotAlmostEqual(float(initial.stdout.strip().splitlines()[-1]),
                              float(trained[0, 0]), places=4)

  def test_mirrored_equals_one_device(self):
    self.assert_same_weights(self.runs["one_device"], self.runs["mirrored"])

  def test_multi_worker_equals_one_device(self):
    self.assert_same_weights(self.runs["one_device"], self.runs["multi_worker"])


if __name__ == "__main__":
  absltest.main()
