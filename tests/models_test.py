"""The ResNet family equals the published architectures."""

import os
import tempfile

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest, parameterized

from resnet_dist import models, optim
from resnet_dist.models import layers

# Reference figures: torchvision weight tables (ImageNet, 1000 classes) and
# He et al. 2015 Table 6 (CIFAR, 10 classes).
PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
          "resnet101": 44_549_160, "resnet152": 60_192_808, "resnet20": 269_722,
          "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018,
          "resnet110": 1_727_962,
          # Not in the paper: ResNet-20's figure less two basic blocks per stage
          # (2 x (2 x 3 x 3 x w x w + 4 w) for w = 16, 32, 64).
          "resnet8": 75_290}
MACS_224 = {("resnet18", "v1.5"): 1.814e9, ("resnet34", "v1.5"): 3.664e9,
            ("resnet50", "v1.5"): 4.089e9, ("resnet50", "v1"): 3.858e9,
            ("resnet101", "v1.5"): 7.801e9, ("resnet152", "v1.5"): 11.514e9}


def count_trainable(model):
  return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


# ---- An independent forward pass from plain TensorFlow ops ------------------

STAGES = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet50": ("bottleneck", [3, 4, 6, 3]),
          "resnet20": ("cifar", [3, 3, 3])}


def reference_logits(model, name, variant, x):
  w = {v.path: tf.convert_to_tensor(v) for v in model.variables}

  def conv(x, path, stride, pad):
    return tf.nn.conv2d(x, w[path + "/kernel"], stride,
                        padding=[[0, 0], [pad, pad], [pad, pad], [0, 0]])

  def bn(x, path):
    return tf.nn.batch_normalization(x, w[path + "/moving_mean"], w[path + "/moving_variance"],
                                     w[path + "/beta"], w[path + "/gamma"], 1e-5)

  relu = tf.nn.relu
  kind, stages = STAGES[name]
  if kind == "cifar":
    x = relu(bn(conv(x, "conv1", 1, 1), "bn1"))
  else:
    x = relu(bn(conv(x, "conv1", 2, 3), "bn1"))
    x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=-np.inf)
    x = tf.nn.max_pool2d(x, 3, 2, "VALID")
  for s, blocks in enumerate(stages, start=1):
    for b in range(blocks):
      p = f"layer{s}.{b}"
      stride = 2 if s > 1 and b == 0 else 1
      if kind == "bottleneck":
        s1, s3 = (stride, 1) if variant == "v1" else (1, stride)
        out = relu(bn(conv(x, p + "/conv1", s1, 0), p + "/bn1"))
        out = relu(bn(conv(out, p + "/conv2", s3, 1), p + "/bn2"))
        out = bn(conv(out, p + "/conv3", 1, 0), p + "/bn3")
      else:
        out = relu(bn(conv(x, p + "/conv1", stride, 1), p + "/bn1"))
        out = bn(conv(out, p + "/conv2", 1, 1), p + "/bn2")
      if kind == "cifar" and out.shape[-1] != x.shape[-1]:
        extra = out.shape[-1] - x.shape[-1]
        shortcut = tf.pad(x[:, ::2, ::2, :], [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])
      elif p + "/downsample_conv/kernel" in w:
        shortcut = bn(conv(x, p + "/downsample_conv", stride, 0), p + "/downsample_bn")
      else:
        shortcut = x
      x = relu(out + shortcut)
  x = tf.reduce_mean(x, axis=[1, 2])
  return tf.matmul(x, w["fc/kernel"]) + w["fc/bias"]


def randomize(model, seed=0):
  """Random weights everywhere, BN statistics included, so nothing is trivially 0 or 1."""
  rng = np.random.RandomState(seed)
  branch_ends = {f"{layer.name}/{layer.branch[-1].name}" for layer in model.layers
                 if isinstance(layer, models.ResidualBlock)}
  for v in model.variables:
    shape = tuple(v.shape)
    if v.path.endswith("moving_variance"):
      v.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))
    elif v.path.endswith(("moving_mean", "beta", "bias")):
      v.assign(rng.normal(0, 0.1, shape).astype(np.float32))
    elif v.path.endswith("gamma"):
      # The BN that ends a residual branch starts small, as in trained networks,
      # so the residual stream and the logits stay near unit scale.
      ends_branch = v.path.rsplit("/", 1)[0] in branch_ends
      low, high = (0.05, 0.2) if ends_branch else (0.5, 1.5)
      v.assign(rng.uniform(low, high, shape).astype(np.float32))
    elif v.path == "fc/kernel":
      v.assign(rng.normal(0, 1.0 / np.sqrt(shape[0]), shape).astype(np.float32))
    else:
      fan_in = np.prod(shape[:-1])
      v.assign(rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32))


class ArchitectureTest(parameterized.TestCase):

  def test_list_models(self):
    self.assertEqual(models.list_models(),
                     ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                      "resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"])

  @parameterized.parameters(*PARAMS)
  def test_trainable_parameters(self, name):
    cifar = name in ("resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
    variants = ["v1.5"] if cifar else ["v1.5", "v1"]
    for variant in variants:
      model = models.get_model(name, num_classes=10 if cifar else 1000, variant=variant)
      self.assertEqual(count_trainable(model), PARAMS[name], (name, variant))

  @parameterized.parameters(*MACS_224)
  def test_macs_at_224(self, name, variant):
    macs = models.count_macs(name, 224, variant=variant)
    self.assertAlmostEqual(macs / MACS_224[(name, variant)], 1.0, delta=0.005)

  def test_resnet_d_changes_stem_and_shortcut(self):
    model = models.get_model("resnet50", variant="d")
    paths = {v.path for v in model.variables}
    self.assertIn("conv1_3/kernel", paths)
    self.assertNotIn("conv1/kernel", paths)
    self.assertEqual(model.get_layer("conv1_1").kernel.shape, (3, 3, 3, 32))
    # The projection conv has stride 1: the average pool does the downsampling.
    block = model.get_layer("layer2.0")
    self.assertEqual(block.config["shortcut"], "avgpool_conv")
    self.assertEqual(models.get_model("resnet50", variant="d", num_classes=10)(
        tf.zeros([1, 64, 64, 3])).shape, (1, 10))

  def test_unknown_names_are_rejected(self):
    with self.assertRaisesRegex(ValueError, "unknown model 'resnet9000'"):
      models.get_model("resnet9000")
    with self.assertRaisesRegex(ValueError, "unknown ResNet variant 'v3'"):
      models.get_model("resnet18", variant="v3")

  def test_weight_decay_list_is_conv_and_dense_kernels(self):
    model = models.get_model("resnet18", num_classes=10)
    decay = models.weight_decay_variables(model)
    self.assertEqual(len(decay), 20 + 1)  # 17 convs + 3 projections, and fc
    self.assertTrue(all(v.path.endswith("kernel") for v in decay))
    self.assertNotIn("fc/bias", {v.path for v in decay})


class ReferenceEquivalenceTest(parameterized.TestCase):

  @parameterized.parameters(("resnet18", "v1.5", 64), ("resnet50", "v1.5", 64),
                            ("resnet50", "v1", 64), ("resnet20", "v1.5", 32))
  def test_equals_plain_tensorflow_reference(self, name, variant, size):
    model = models.get_model(name, num_classes=10, variant=variant)
    randomize(model)
    # Odd and even sizes: symmetric padding only matters at stride 2.
    for s in (size, size + 3):
      x = tf.random.stateless_normal([2, s, s, 3], seed=[1, s])
      got = model(x, training=False)
      want = reference_logits(model, name, variant, x)
      self.assertLess(float(tf.reduce_max(tf.abs(got - want))), 1e-4, (name, variant, s))


class BehaviourTest(parameterized.TestCase):

  @parameterized.parameters("float32", "mixed_bfloat16", "mixed_float16")
  def test_shapes_and_dtypes_under_policies(self, policy):
    for name, classes in (("resnet18", 7), ("resnet20", 10)):
      model = models.get_model(name, num_classes=classes, dtype=policy)
      logits = model(tf.random.normal([3, 32, 32, 3]), training=True)
      self.assertEqual(logits.shape, (3, classes))
      self.assertEqual(logits.dtype, tf.float32)
      self.assertTrue(all(v.dtype == "float32" for v in model.variables))
      if policy != "float32":
        self.assertEqual(model.get_layer("conv1").compute_dtype, policy[len("mixed_"):])

  def test_initial_weights_are_distinct_per_layer_and_fixed_by_the_seed(self):
    keras.utils.set_random_seed(7)
    first = models.get_model("resnet20", num_classes=10)
    a, b = (first.get_layer("layer1.0").branch[i].kernel.numpy() for i in (0, 3))
    self.assertEqual(a.shape, b.shape)
    self.assertFalse(np.array_equal(a, b))  # same shape, different draws
    keras.utils.set_random_seed(7)
    again = models.get_model("resnet20", num_classes=10)
    for v, w in zip(first.variables, again.variables):
      np.testing.assert_array_equal(v.numpy(), w.numpy())
    # He normal, fan out: std sqrt(2 / (3 * 3 * 16)).
    self.assertAlmostEqual(float(np.std(a)), np.sqrt(2 / 144), delta=0.02)

  def test_no_variable_is_created_after_the_first_call(self):
    model = models.get_model("resnet18", num_classes=10)
    before = [v.path for v in model.variables]
    model(tf.zeros([2, 64, 64, 3]), training=True)
    model(tf.zeros([2, 96, 96, 3]), training=False)
    self.assertEqual([v.path for v in model.variables], before)

  def test_every_batchnorm_is_tracked_and_updates_only_in_training(self):
    model = models.get_model("resnet20", num_classes=10)
    stats = [v for v in model.non_trainable_variables]
    # 1 stem BN + 9 blocks x 2 BNs, each with a moving mean and variance.
    self.assertLen(stats, 2 * 19)
    self.assertLen([v for v in model.trainable_variables if v.path.endswith("gamma")], 19)
    x = tf.random.normal([8, 32, 32, 3], mean=3.0)
    start = [v.numpy().copy() for v in stats]
    model(x, training=False)
    for s, v in zip(start, stats):
      np.testing.assert_array_equal(s, v.numpy())
    model(x, training=True)
    changed = [not np.allclose(s, v.numpy()) for s, v in zip(start, stats)]
    self.assertTrue(all(changed))
    stem_mean = model.get_layer("bn1").moving_mean.numpy()
    conv = model.get_layer("conv1")(x)
    batch_mean = tf.reduce_mean(conv, axis=[0, 1, 2]).numpy()
    np.testing.assert_allclose(stem_mean, 0.1 * batch_mean, rtol=1e-4, atol=1e-5)

  def test_residual_branch_ends_without_relu_and_relu_follows_the_add(self):
    model = models.get_model("resnet50", num_classes=10)
    block = model.get_layer("layer1.0")
    self.assertIsInstance(block.branch[-1], models.BatchNorm)
    x = tf.random.normal([1, 16, 16, 64])
    self.assertGreaterEqual(float(tf.reduce_min(block(x))), 0.0)

  def test_zero_init_residual_zeroes_the_last_gamma_of_each_block(self):
    model = models.get_model("resnet50", num_classes=10, zero_init_residual=True)
    self.assertEqual(float(tf.reduce_sum(tf.abs(model.get_layer("layer3.2").branch[-1].gamma))), 0.0)
    self.assertEqual(float(tf.reduce_min(model.get_layer("bn1").gamma)), 1.0)

  def test_drop_path_rises_linearly_over_the_blocks_as_timms(self):
    """timm: block i of n drops with rate * i / (n - 1)."""
    model = models.get_model("resnet50", num_classes=10, drop_path_rate=0.05)
    blocks = [layer for layer in model.layers if isinstance(layer, models.ResidualBlock)]
    self.assertLen(blocks, 16)
    np.testing.assert_allclose([b.config["drop_path_rate"] for b in blocks],
                               0.05 * np.arange(16) / 15)
    self.assertEqual([b.config["index"] for b in blocks], list(range(16)))

  def test_drop_path_zeroes_whole_examples_scales_the_rest_and_is_seeded(self):
    x = tf.ones([2000, 2, 2, 3])
    seed = tf.constant([4, 2], tf.int64)
    with models.drop_path_seed(seed):
      out = layers.drop_path(x, 0.3, 5).numpy()
      again = layers.drop_path(x, 0.3, 5).numpy()
      other_block = layers.drop_path(x, 0.3, 6).numpy()
    per_example = out.reshape(2000, -1)
    self.assertTrue(np.all((per_example == 0) | np.isclose(per_example, 1 / 0.7)))
    self.assertTrue(np.all(per_example.min(1) == per_example.max(1)))  # whole examples
    self.assertAlmostEqual(np.mean(per_example[:, 0] == 0), 0.3, delta=0.04)
    np.testing.assert_array_equal(out, again)
    self.assertFalse(np.array_equal(out, other_block))

  def test_drop_path_acts_in_training_only(self):
    keras.utils.set_random_seed(3)
    dropping = models.get_model("resnet8", num_classes=10, drop_path_rate=0.9)
    keras.utils.set_random_seed(3)
    plain = models.get_model("resnet8", num_classes=10)
    randomize(dropping)
    plain.set_weights(dropping.get_weights())
    x = tf.random.normal([8, 32, 32, 3])
    np.testing.assert_array_equal(dropping(x, training=False), plain(x, training=False))
    with models.drop_path_seed(tf.constant([1, 1], tf.int64)):
      self.assertFalse(np.allclose(dropping(x, training=True), plain(x, training=True)))

  def test_keras_save_and_load_round_trip(self):
    model = models.get_model("resnet20", num_classes=10, sync_bn=True)
    randomize(model)
    path = os.path.join(tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR")), "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    x = tf.random.normal([4, 32, 32, 3])
    np.testing.assert_array_equal(model(x, training=False).numpy(),
                                  loaded(x, training=False).numpy())
    self.assertTrue(loaded.get_layer("layer2.0").config["sync_bn"])

  def test_small_model_overfits_sixteen_images(self):
    keras.utils.set_random_seed(0)
    model = models.get_model("resnet20", num_classes=10)
    images = tf.random.normal([16, 32, 32, 3])
    labels = tf.constant(np.arange(16) % 10)
    opt = optim.Momentum(model.trainable_variables, models.weight_decay_variables(model),
                         momentum=0.9)

    @tf.function
    def step():
      with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
      opt.apply(tape.gradient(loss, model.trainable_variables), 0.05)
      return loss

    for _ in range(60):
      step()
    predictions = tf.argmax(model(images, training=False), axis=-1)
    self.assertEqual(int(tf.reduce_sum(tf.cast(predictions == labels, tf.int32))), 16)


if __name__ == "__main__":
  absltest.main()
