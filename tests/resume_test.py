"""Exact resume, in this process: a run stopped after a step (the stop request
a SIGTERM sets, here set by the test), then run again with the same config,
ends bit-identical to a run never stopped, with every recipe flag on.

Each case stops the run at a step of its own, saves, and resumes with a new
Trainer, as a restarted process would; the killed and signalled processes
are tests/interruption_test.py.
"""

import os
from unittest import mock

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
import numpy as np
import tensorflow as tf
from absl.testing import absltest, parameterized

from resnet_dist import host_loop, preemption, run_setup, train
from resnet_dist import strategy as strategy_lib
from resnet_dist.config import Config
from tests import fixtures

# Every recipe flag: each of their random draws must replay exactly on
# resume. The training size grows to 64 at step 11, after every stop.
RECIPE = dict(ema_decay=0.9, ema_every_steps=2, mixup_alpha=0.2, cutmix_alpha=1.0,
              random_erasing=0.25, label_smoothing=0.1, progressive_resize=(32, 64, 0.2, 0.35),
              grad_accum_steps=2, optimizer="lamb", loss="bce", base_learning_rate=0.01,
              drop_path_rate=0.3, repeated_augmentations=2)
STEPS = 14


def setUpModule():
  strategy_lib.split_cpu(2)
  global MIRRORED  # one for the process: a second one reuses the first's collective keys
  MIRRORED = run_setup.create_strategy(Config.from_flat(strategy="mirrored", num_cpu_devices=2))


def variables(model_dir):
  reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints"))
  # save_counter counts saves (a stop adds one), not training state.
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if not k.startswith(("_CHECKPOINTABLE", "save_counter"))}


def stopping_after(step):
  """A patch of HostLoop.train_until that asks the run to stop, as a signal
  would, once `step` steps are done: the next loop stops after one step."""
  original = host_loop.HostLoop.train_until

  def train_until(loop, stop):
    if loop.step >= step:
      loop.trainer.stop_requested.assign(True)
    return original(loop, stop)

  return mock.patch.object(host_loop.HostLoop, "train_until", train_until)


class ResumeTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = fixtures.digits_dir()

  def config(self, model_dir, **changes):
    settings = dict(model="resnet8", dataset="digits", data_dir=self.data_dir,
                    global_batch_size=32, train_steps=STEPS, steps_per_loop=1,
                    checkpoint_every_steps=4, deterministic=True, seed=5, skip_eval=True,
                    keep_checkpoints=10, peak_tflops=1.0, model_dir=model_dir)
    return Config.from_flat(**{**settings, **RECIPE, **changes})

  def run_config(self, config):
    strategy = MIRRORED if config.distribute.strategy == "mirrored" else None
    with fixtures.quiet():
      return train.run(config, strategy)

  @parameterized.named_parameters(
      # On one device a stop between the regular saves resumes exactly.
      # (TrivialAugment: tests/interruption_test.py's killed run.)
      ("one_device_autoaugment", "one_device", "autoaugment", 5),
      # Over replicas a stop's checkpoint holds the replicas' mean BN
      # statistics, which the run never stopped averages only at its next
      # save (docs/checkpoints.md): stopped on a regular save, it is exact.
      ("mirrored_timm_randaugment", "mirrored", "rand-m9-mstd0.5-inc1", 7))
  def test_a_stopped_run_resumes_bit_exactly(self, strategy, policy, stop_after):
    """A resume that replayed a random draw differently (an augmentation,
    mixing, erasing, the blocks stochastic depth drops, the EMA's schedule,
    the repeated examples) or lost optimizer state fails here."""
    changes = dict(strategy=strategy, augment=policy, randaugment_magnitude=12)
    stopped_dir = self.create_tempdir().full_path
    with stopping_after(stop_after), self.assertRaises(preemption.Preempted) as raised:
      self.run_config(self.config(stopped_dir, **changes))
    self.assertEqual(raised.exception.step, stop_after + 1)
    summary = self.run_config(self.config(stopped_dir, **changes))
    self.assertEqual(summary["global_step"], STEPS)
    reference_dir = self.create_tempdir().full_path
    self.run_config(self.config(reference_dir, **changes))
    reference, resumed = variables(reference_dir), variables(stopped_dir)
    self.assertTrue(any(key.startswith("ema/") for key in reference))
    self.assertEqual(sorted(reference), sorted(resumed))
    for key in reference:
      np.testing.assert_array_equal(reference[key], resumed[key], err_msg=key)


if __name__ == "__main__":
  absltest.main()
