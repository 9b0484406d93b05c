"""Schedules, optimisers, mixed precision and XLA in the replica step."""

import math

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest, parameterized

from resnet_dist import data, losses, optim
from resnet_dist import trainer as trainer_lib
from resnet_dist.config import Config, OptimConfig
from resnet_dist.data import sources
from resnet_dist.errors import ConfigError


class LearningRateTest(absltest.TestCase):

  def test_piecewise_with_warmup_hits_the_published_values(self):
    # Goyal et al. 2017: 0.1 x batch/256, 5 warmup epochs, x0.1 at 30, 60, 80.
    steps_per_epoch = 1251  # ImageNet at global batch 1024
    lr = optim.LearningRate(0.1, 1024, steps_per_epoch, 90 * steps_per_epoch,
                            warmup_epochs=5, schedule="piecewise", boundary_epochs=(30, 60, 80))
    self.assertAlmostEqual(lr.value_at(0), 0.0)
    self.assertAlmostEqual(lr.value_at(5 * steps_per_epoch // 2), 0.2, places=3)
    self.assertAlmostEqual(lr.value_at(5 * steps_per_epoch), 0.4, places=6)
    self.assertAlmostEqual(lr.value_at(30 * steps_per_epoch - 1), 0.4, places=6)
    self.assertAlmostEqual(lr.value_at(30 * steps_per_epoch), 0.04, places=6)
    self.assertAlmostEqual(lr.value_at(60 * steps_per_epoch), 0.004, places=7)
    self.assertAlmostEqual(lr.value_at(80 * steps_per_epoch), 0.0004, places=8)

  def test_cosine_decays_from_the_end_of_warmup_to_zero(self):
    lr = optim.LearningRate(0.1, 256, 100, 1000, warmup_epochs=1, schedule="cosine")
    self.assertAlmostEqual(lr.value_at(100), 0.1, places=6)
    self.assertAlmostEqual(lr.value_at(550), 0.05, places=6)
    self.assertAlmostEqual(lr.value_at(1000), 0.0, places=6)


  def test_timm_cosine_is_timms_per_epoch_schedule(self):
    """RSB A3's numbers: peak 8e-3 (1e-3 at batch 2048), 5 warmup epochs from
    1e-5, 100 epochs of 625 steps; against timm's CosineLRScheduler formula
    (t the epoch, no warmup prefix), written out here."""
    lr = optim.LearningRate(1e-3, 2048, 625, 100 * 625, warmup_epochs=5,
                            schedule="timm_cosine", warmup_learning_rate=1e-5)

    def timm(t):
      if t < 5:
        return 1e-5 + t * (8e-3 - 1e-5) / 5
      return 0.5 * 8e-3 * (1 + math.cos(math.pi * t / 100))

    for step in (0, 624, 625, 2 * 625 + 300, 5 * 625 - 1, 5 * 625, 50 * 625 + 7, 100 * 625 - 1):
      self.assertAlmostEqual(lr.value_at(step), timm(step // 625), places=7, msg=step)
    # Ours starts its cosine after warmup, so it lies above timm's.
    ours = optim.LearningRate(1e-3, 2048, 625, 100 * 625, warmup_epochs=5, schedule="cosine")
    self.assertGreater(ours.value_at(50 * 625), lr.value_at(50 * 625) * 1.05)

  def test_torchvision_cosine_is_its_sequential_warmup_then_cosine_per_epoch(self):
    """The torchvision V2 recipe's numbers: peak 0.5 (0.125 at batch 1024),
    LinearLR(start_factor=0.01, total_iters=5) then CosineAnnealingLR(T_max=
    595), stepped once an epoch of 1251 steps; their closed forms, written
    out here (t the epoch)."""
    lr = optim.LearningRate(0.125, 1024, 1251, 600 * 1251, warmup_epochs=5,
                            schedule="torchvision_cosine", warmup_learning_rate=0.005)

    def torchvision(t):
      if t < 5:
        return 0.5 * (0.01 + (1 - 0.01) * t / 5)
      return 0.5 * (1 + math.cos(math.pi * (t - 5) / 595)) / 2

    for step in (0, 1250, 1251, 4 * 1251 + 9, 5 * 1251, 5 * 1251 + 1250, 300 * 1251,
                 600 * 1251 - 1):
      self.assertAlmostEqual(lr.value_at(step), torchvision(step // 1251), places=7, msg=step)


class OptimizerTest(absltest.TestCase):

  def test_momentum_and_decay_match_the_formula(self):
    w = tf.Variable([1.0, -2.0])
    opt = optim.Momentum([w], [w], momentum=0.9, weight_decay=0.1)
    g = tf.constant([0.5, 0.5])
    opt.apply([g], 0.1)
    v1 = 0.1 * (g.numpy() + 0.1 * np.array([1.0, -2.0]))
    np.testing.assert_allclose(w.numpy(), [1.0, -2.0] - v1, rtol=1e-6)
    w_before = w.numpy()
    opt.apply([g], 0.1)
    v2 = 0.9 * v1 + 0.1 * (g.numpy() + 0.1 * w_before)
    np.testing.assert_allclose(w.numpy(), w_before - v2, rtol=1e-6)
    self.assertEqual(int(opt.iterations.numpy()), 2)

  def test_lars_scales_decayed_variables_by_the_trust_ratio_only(self):
    kernel, bias = tf.Variable([3.0, 4.0]), tf.Variable([3.0, 4.0])
    opt = optim.Lars([kernel, bias], [kernel], momentum=0.0, weight_decay=0.0,
                     lars_eta=0.001)
    g = tf.constant([0.6, 0.8])  # norm 1; the weights' norm is 5
    opt.apply([g, g], 1.0)
    np.testing.assert_allclose(kernel.numpy(), [3.0, 4.0] - 0.005 * g.numpy(), rtol=1e-6)
    np.testing.assert_allclose(bias.numpy(), [3.0, 4.0] - g.numpy(), rtol=1e-6)

  def test_lars_with_momentum_and_decay_matches_the_formula_over_two_steps(self):
    """A LARS that took the trust ratio before adding the decay, or left the
    momentum buffer unscaled, differs here in the first or the second step."""
    kernel = tf.Variable([3.0, 4.0])
    opt = optim.Lars([kernel], [kernel], momentum=0.9, weight_decay=0.01, lars_eta=0.002)
    w, v = np.array([3.0, 4.0]), np.zeros(2)
    for g in (np.array([0.6, 0.8]), np.array([-0.3, 0.1])):
      opt.apply([tf.constant(g, tf.float32)], 0.5)
      decayed = g + 0.01 * w
      trust = 0.002 * np.linalg.norm(w) / np.linalg.norm(decayed)
      v = 0.9 * v + 0.5 * trust * decayed
      w = w - v
      np.testing.assert_allclose(kernel.numpy(), w, rtol=1e-6)
    np.testing.assert_allclose(opt.velocities[0].numpy(), v, rtol=1e-6)

  def test_the_tables_name_every_choice_and_build_it(self):
    self.assertEqual(list(optim.OPTIMIZERS), ["sgd", "lars", "lamb"])
    self.assertEqual(list(optim.SCHEDULES),
                     ["piecewise", "cosine", "timm_cosine", "torchvision_cosine"])
    w = tf.Variable([1.0])
    for kind, cls in optim.OPTIMIZERS.items():
      self.assertIsInstance(optim.create_optimizer(OptimConfig(optimizer=kind), [w], [w]), cls)
    with self.assertRaisesRegex(ConfigError, "unknown --optimizer 'adam'; choose from sgd, "
                                             "lars, lamb"):
      optim.create_optimizer(OptimConfig(optimizer="adam"), [w], [w])

  def test_each_optimizer_reads_its_own_settings_from_the_config(self):
    w = tf.Variable([1.0])
    options = OptimConfig(momentum=0.5, nesterov=True, weight_decay=0.01, lars_eta=0.02)
    lars = optim.OPTIMIZERS["lars"].of(options, [w], [w])
    self.assertEqual((lars.momentum, lars.nesterov, lars.weight_decay, lars.lars_eta),
                     (0.5, True, 0.01, 0.02))
    sgd = optim.OPTIMIZERS["sgd"].of(options, [w], [w])
    self.assertEqual((sgd.momentum, sgd.nesterov, sgd.weight_decay), (0.5, True, 0.01))
    self.assertFalse(hasattr(sgd, "lars_eta"))
    lamb = optim.OPTIMIZERS["lamb"].of(options, [w], [w])
    self.assertEqual(lamb.weight_decay, 0.01)
    self.assertFalse(hasattr(lamb, "momentum"))
    # The default is the eta LARS had before it was a setting: runs train as they did.
    self.assertEqual(optim.OPTIMIZERS["lars"].of(OptimConfig(), [w], [w]).lars_eta, 0.001)
    with self.assertRaisesRegex(ConfigError, r"^--lars_eta=0.0 must be above 0$"):
      OptimConfig(lars_eta=0.0).validate()

  def test_a_skipped_step_changes_nothing(self):
    w = tf.Variable([1.0])
    opt = optim.Momentum([w], [], momentum=0.9)
    opt.apply([tf.constant([1.0])], 0.1, apply=tf.constant(False))
    self.assertEqual(float(w.numpy()[0]), 1.0)
    self.assertEqual(float(opt.velocities[0].numpy()[0]), 0.0)


  def test_lamb_matches_the_formula_of_timms_lamb(self):
    kernel, bias = tf.Variable([3.0, -4.0]), tf.Variable([0.5, 1.0])
    opt = optim.Lamb([kernel, bias], [kernel], weight_decay=0.1)
    w = {"kernel": np.array([3.0, -4.0]), "bias": np.array([0.5, 1.0])}
    m = {k: np.zeros(2) for k in w}
    v = {k: np.zeros(2) for k in w}
    steps = [(np.array([3.0, 0.0]), np.array([0.0, 4.0])),   # global norm 5: clipped to 1
             (np.array([0.1, -0.2]), np.array([0.2, 0.1]))]  # norm 0.316: not clipped
    for t, (g_kernel, g_bias) in enumerate(steps, start=1):
      opt.apply([tf.constant(g_kernel, tf.float32), tf.constant(g_bias, tf.float32)], 0.01)
      clip = max(np.sqrt(np.sum(g_kernel**2) + np.sum(g_bias**2)), 1.0)
      for name, g in (("kernel", g_kernel / clip), ("bias", g_bias / clip)):
        m[name] = 0.9 * m[name] + 0.1 * g
        v[name] = 0.999 * v[name] + 0.001 * g**2
        update = (m[name] / (1 - 0.9**t)) / (np.sqrt(v[name]) / np.sqrt(1 - 0.999**t) + 1e-6)
        if name == "kernel":  # decays: decoupled decay, then the trust ratio
          update = update + 0.1 * w[name]
          update *= np.linalg.norm(w[name]) / np.linalg.norm(update)
        w[name] = w[name] - 0.01 * update
      np.testing.assert_allclose(kernel.numpy(), w["kernel"], rtol=1e-5)
      np.testing.assert_allclose(bias.numpy(), w["bias"], rtol=1e-5)
    self.assertEqual(int(opt.iterations.numpy()), 2)


class LossTest(absltest.TestCase):

  def test_binary_cross_entropy_matches_the_formula(self):
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], np.float32)
    labels = np.array([0, 2])
    for smoothing in (0.0, 0.3):
      targets = np.full((2, 3), smoothing / 3)
      targets[np.arange(2), labels] = 1 - smoothing + smoothing / 3
      p = 1 / (1 + np.exp(-logits))
      expected = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean(axis=1)
      np.testing.assert_allclose(
          losses.binary_cross_entropy(np.eye(3, dtype=np.float32)[labels], logits, smoothing),
          expected, rtol=1e-5)

  def test_bce_target_threshold_makes_mixed_targets_zero_or_one_as_timms(self):
    """timm's BinaryCrossEntropy(target_threshold=0.2) on mixup targets: a
    class with more than 0.2 of the mix is a 1, one with less a 0."""
    logits = np.array([[2.0, -1.0, 0.5, 0.0], [0.0, 3.0, -2.0, 1.0]], np.float32)
    mixed = np.array([[0.7, 0.3, 0.0, 0.0], [0.0, 0.1, 0.9, 0.0]], np.float32)
    config = OptimConfig(loss="bce", label_smoothing=0.1, bce_target_threshold=0.2)
    smoothed = mixed * 0.9 + 0.1 / 4                 # 0.655, 0.295, 0.025 / 0.115, 0.835
    binary = (smoothed > 0.2).astype(np.float32)     # [1, 1, 0, 0], [0, 0, 1, 0]
    p = 1 / (1 + np.exp(-logits))
    expected = -(binary * np.log(p) + (1 - binary) * np.log(1 - p)).mean(axis=1)
    np.testing.assert_allclose(losses.per_example_loss(config)(mixed, logits), expected,
                               rtol=1e-5)
    without = losses.per_example_loss(OptimConfig(loss="bce", label_smoothing=0.1))
    self.assertFalse(np.allclose(without(mixed, logits), expected))
    with self.assertRaisesRegex(ConfigError, "--bce_target_threshold is for --loss=bce"):
      OptimConfig(bce_target_threshold=0.2).validate()

  def test_softmax_cross_entropy_matches_the_formula(self):
    logits = np.array([[2.0, -1.0, 0.5]], np.float32)
    for smoothing in (0.0, 0.3):
      targets = np.full(3, smoothing / 3)
      targets[1] += 1 - smoothing
      log_p = logits[0] - np.log(np.exp(logits[0]).sum())
      np.testing.assert_allclose(losses.cross_entropy(np.eye(3, dtype=np.float32)[[1]], logits, smoothing),
                                 [-(targets * log_p).sum()], rtol=1e-5)


def make_trainer(dtype="fp32", enable_xla=False, batch=16):
  strategy = tf.distribute.get_strategy()
  config = Config.from_flat(dtype=dtype, enable_xla=enable_xla, global_batch_size=batch,
                  base_learning_rate=0.8, weight_decay=1e-4)
  source = sources.synthetic_source(10, 32, num_examples=64)
  keras.utils.set_random_seed(0)
  trainer = trainer_lib.Trainer(config, strategy, source, steps_per_epoch=4, total_steps=100)
  input_config = data.InputSpec(batch, 32)
  dataset = data.train_dataset_fn(source, "train", input_config)(
      tf.distribute.InputContext())
  return trainer, iter(strategy.experimental_distribute_dataset(dataset))


class PrecisionTest(parameterized.TestCase):

  @parameterized.parameters("bf16", "fp16")
  def test_mixed_precision_lowers_the_loss(self, dtype):
    trainer, iterator = make_trainer(dtype)
    trainer.train_loop(iterator, tf.constant(4))
    first = trainer.replica.train_metrics.result()["loss"]
    for _ in range(3):  # the loss falls to about a quarter of the first loop's
      trainer.replica.train_metrics.reset()
      trainer.train_loop(iterator, tf.constant(4))
    # Half, not a quarter: bf16's and fp16's rounding leave some room.
    self.assertLess(trainer.replica.train_metrics.result()["loss"], first * 0.5)

  def test_fp16_overflow_skips_the_step_and_halves_the_scale(self):
    trainer, iterator = make_trainer("fp16")
    trainer.train_loop(iterator, tf.constant(1))
    weights = [v.numpy().copy() for v in trainer.variables]
    # A scale far past float16's range (65504) overflows the float16 backward pass.
    scale = 2.0**40
    trainer.replica.loss_scale.scale.assign(scale)
    step = int(trainer.step.numpy())
    trainer.train_loop(iterator, tf.constant(1))
    self.assertEqual(float(trainer.replica.loss_scale.scale.numpy()), scale / 2)
    self.assertEqual(int(trainer.step.numpy()), step + 1)  # counted, not applied
    for before, v in zip(weights, trainer.variables):
      np.testing.assert_array_equal(before, v.numpy())
    trainer.replica.loss_scale.scale.assign(1024.0)  # back in range: the next step applies
    trainer.train_loop(iterator, tf.constant(1))
    self.assertTrue(any(not np.array_equal(b, v.numpy())
                        for b, v in zip(weights, trainer.variables)))


class XlaTest(absltest.TestCase):

  def test_compiled_replica_step_matches_the_uncompiled_one(self):
    # Same initial weights and batches; XLA may fuse and reorder float sums,
    # so the weights agree to float32 rounding over a few steps, not bit for bit.
    plain, plain_iterator = make_trainer(enable_xla=False)
    compiled, compiled_iterator = make_trainer(enable_xla=True)
    for a, b in zip(plain.variables, compiled.variables):
      np.testing.assert_array_equal(a.numpy(), b.numpy())
    plain.train_loop(plain_iterator, tf.constant(3))
    compiled.train_loop(compiled_iterator, tf.constant(3))
    worst = max(float(np.max(np.abs(a.numpy() - b.numpy())))
                for a, b in zip(plain.variables, compiled.variables))
    self.assertLess(worst, 1e-4)
    moved = max(float(np.max(np.abs(a.numpy() - b)))
                for a, b in zip(plain.variables, [v.numpy() for v in make_trainer()[0].variables]))
    self.assertGreater(moved, 1e-3)  # the steps really changed the weights


if __name__ == "__main__":
  absltest.main()
