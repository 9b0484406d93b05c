"""Every strategy trains the same model: one device, 2 mirrored replicas, 2 workers.

One device and 2 mirrored replicas run in this process, from the same
command line as launch.train's. The workers are started as the README's
cluster command says: each its own
`launch.train` with the recipe's flag file (whose --strategy is auto) and the
TF_CONFIG line `launch.multi_worker --print_tf_config` printed for it. A worker
that ignored TF_CONFIG would train a model of its own, on a different batch.

With --sync_bn, a fixed seed and --deterministic, the same global batches
(the pipeline guarantees it) must give the same weights after several steps.

float32 sums are not associative, and this CPU's conv kernels are not even
reproducible run to run under load: one device alone gave step-1 gradient
norms of 2.0636189 and 2.0636902 in two runs, while one device and two
replicas differ by 1.5e-5 relative at step 1 with an identical forward loss.
Training amplifies such noise in proportion to the learning rate (2e-3 after
six steps at lr 0.1), so the proof runs at a small learning rate: trainable
weights must agree to 1e-5 and BN moving statistics, averages of batch
variances that amplify the noise most, to 1e-3 relative (1e-4 absolute near 0);
and each trainable variable's displacement from the initial weights must agree
to 10% of its size (all of them to 2%; measured: 0.3%, the worst variable 2.6%),
so a lost or doubled replica gradient, which changes every update by about
half, fails even where a weight moved less than the absolute tolerance.
"""

import json
import os
import re
import subprocess
import tempfile

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest

from flags import definitions
from launch import multi_worker
from resnet_dist import checkpoints, models, train
from resnet_dist import strategy as strategy_lib
from tests import fixtures, launching

COMMON = ["--flagfile=launch/configs/digits.cfg", "--model=resnet20", "--dataset=digits",
          "--global_batch_size=32",
          "--train_steps=6", "--steps_per_loop=3", "--sync_bn", "--deterministic",
          "--seed=3", "--skip_eval", "--base_learning_rate=0.008", "--weight_decay=5e-4",
          "--label_smoothing=0.1", "--lr_schedule=cosine", "--warmup_epochs=0"]
TOLERANCE = 1e-5


def setUpModule():
  strategy_lib.split_cpu(2)  # before any op: the mirrored run's 2 logical devices


def model_weights(model_dir):
  reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints"))
  return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
          if key.startswith("model/") and reader.get_tensor(key).dtype == np.float32}


class StrategyEquivalenceTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = launching.digits_dir()  # prepared once, before any process starts
    cls.runs, cls.worker_logs = {}, []
    for name, args in (("one_device", ["--strategy=one_device"]),
                       ("mirrored", ["--strategy=mirrored", "--num_cpu_devices=2"]),
                       ("multi_worker", None)):
      model_dir = tempfile.mkdtemp(prefix=f"{name}-", dir=absltest.get_default_test_tmpdir())
      flags = [*COMMON, *(args or []), f"--model_dir={model_dir}", f"--data_dir={cls.data_dir}"]
      if args is None:
        cls.worker_logs = cls.run_as_the_readme_says(flags)
      else:  # one process's strategies: in this one, from the same command line
        definitions.FLAGS.unparse_flags()
        definitions.FLAGS(["train", *flags])
        with fixtures.quiet():
          train.run(definitions.config_from_flags())
      cls.runs[name] = model_weights(model_dir)

  @staticmethod
  def run_as_the_readme_says(flags):
    """Two `launch.train` processes on 127.0.0.1, each with its line of
    --print_tf_config; returns their outputs."""
    hosts = ",".join(f"127.0.0.1:{port}" for port in multi_worker.free_ports(2))
    printed = launching.run("launch.multi_worker", "--print_tf_config", f"--hosts={hosts}")
    configs = re.findall(r"^127\.0\.0\.1:\d+: TF_CONFIG='(.*)'$", printed.stdout, re.M)
    if printed.returncode != 0 or len(configs) != 2:
      raise AssertionError(f"--print_tf_config printed:\n{printed.stdout}{printed.stderr}")
    workers = [subprocess.Popen(launching.command("launch.train", *flags), cwd=launching.ROOT,
                                env={**launching.ENV, "TF_CONFIG": config},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for config in configs]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
      if worker.returncode != 0:
        raise AssertionError(f"a worker failed ({worker.returncode}):\n{output[-3000:]}")
    return [json.loads(config)["task"]["index"] for config in configs], outputs

  def assert_same_weights(self, a, b):
    self.assertEqual(sorted(a), sorted(b))
    self.assertGreater(len(a), 90)  # every model variable, BN statistics included
    for key in a:
      if "moving_" in key:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-3, atol=1e-4, err_msg=key)
      else:
        self.assertLess(float(np.max(np.abs(a[key] - b[key]))), TOLERANCE, key)
    fixtures.assert_same_training(self.initial_weights(), a, b)

  @staticmethod
  def initial_weights():
    """The trainable weights every run starts from (the same seed's model)."""
    keras.utils.set_random_seed(3)
    initial = models.get_model("resnet20", num_classes=10, sync_bn=True, image_size=32)
    return {checkpoints.checkpoint_key(v.path): v.numpy() for v in initial.trainable_variables}

  def test_mirrored_equals_one_device(self):
    self.assert_same_weights(self.runs["one_device"], self.runs["mirrored"])

  def test_multi_worker_equals_one_device(self):
    self.assert_same_weights(self.runs["one_device"], self.runs["multi_worker"])

  def test_the_readme_cluster_command_made_one_run_of_two_tasks(self):
    indices, (chief, worker) = self.worker_logs
    self.assertEqual(indices, [0, 1])
    self.assertIn("strategy   multi_worker_mirrored: 2 replica(s), worker 0 of 2 tasks", chief)
    self.assertIn("done: 6 steps", chief)
    # Only the chief reports the run; the other says how it ended, no more.
    self.assertEqual(worker, "finished at step 6, worker 1 of 2 tasks, 1 CPU replica each; the "
                             "chief writes the run's summary\n")


if __name__ == "__main__":
  absltest.main()
