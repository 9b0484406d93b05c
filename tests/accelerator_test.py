"""The accelerator paths, checked on the CPU as far as a CPU can check them.

- What a training step communicates, counted in the ops of its trace: one
  collective per pack of gradients (--all_reduce_pack_mb), in the dtype and
  with the implementation hint --all_reduce* ask for.
- --enable_xla under MirroredStrategy on GPUs: the real train_loop traces with
  TensorFlow told that the devices are GPUs; XLA compiles the forward and
  backward, and the all-reduce stays outside it.
- The TPU replica step of the pod recipe (ResNet-50, bf16, LARS) lowers to HLO,
  and so do the steps of the modern recipes (erasing, mixing, EMA, accumulation).
- The train loop's condition reads only its counter; only the training
  pipeline autotunes, not the per-device feeds whose teardown stalled.
"""

import os
from unittest import mock

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
import keras
import tensorflow as tf
from absl.testing import absltest, parameterized
from tensorflow.python.distribute import mirrored_run, mirrored_strategy

from resnet_dist import data
from resnet_dist import distributed_input
from resnet_dist import trainer as trainer_lib
from resnet_dist import strategy as strategy_lib
from resnet_dist.config import Config, DistributeConfig
from resnet_dist.data import sources
from resnet_dist.errors import ConfigError

BATCH = 4
MIRRORED = DistributeConfig(strategy="mirrored", num_cpu_devices=2)


def build(strategy, **options):
  """A Trainer on synthetic 32x32 data and a distributed iterator over it."""
  config = Config.from_flat(global_batch_size=BATCH, **options)
  source = sources.synthetic_source(10, config.data.image_size, num_examples=16)
  keras.utils.set_random_seed(0)
  trainer = trainer_lib.Trainer(config, strategy, source, steps_per_epoch=4, total_steps=100)
  spec = data.InputSpec(BATCH, config.data.image_size)
  dataset = distributed_input.distribute_input(strategy,
                                              data.train_dataset_fn(source, "train", spec))
  return trainer, iter(dataset)


def collectives(function):
  """(op, communication hint, dtype) -> count of the collective ops in a
  traced function and every function it calls, per replica device."""
  graph = function.graph.as_graph_def()
  counts, devices = {}, set()
  for node in [*graph.node, *(n for f in graph.library.function for n in f.node_def)]:
    if node.op.startswith("Collective"):
      key = (node.op, node.attr["communication_hint"].s.decode(),
             tf.dtypes.as_dtype(node.attr["T"].type).name)
      counts[key] = counts.get(key, 0) + 1
      devices.add(node.device)
  return {key: count / max(len(devices), 1) for key, count in counts.items()}


def collectives_in_one_step(strategy, **options):
  """The collectives a trace of one training step launches, per replica."""
  trainer, iterator = build(strategy, **options)
  return collectives(trainer.train_loop.get_concrete_function(iterator, tf.constant(1))), trainer


def loop_conditions(function):
  """{while loop's name: the dtypes its condition reads} in a traced function."""
  graph = function.graph.as_graph_def()
  library = {f.signature.name: f for f in graph.library.function}
  found = {}
  for node in [*graph.node, *(n for f in graph.library.function for n in f.node_def)]:
    if node.op in ("While", "StatelessWhile"):
      cond = library[node.attr["cond"].func.name]
      read = {i.lstrip("^").split(":")[0] for n in cond.node_def for i in n.input}
      read |= {v.split(":")[0] for v in cond.ret.values()}
      found[node.name] = sorted({tf.dtypes.as_dtype(a.type).name
                                 for a in cond.signature.input_arg if a.name in read})
  return found


class HostLoopTest(parameterized.TestCase):
  """Catches a train loop whose every step waits for the one before to reach
  the host: a loop condition that reads a step's answer (a bool) rather than
  only its counter."""

  @parameterized.parameters(1, 2)
  def test_steps_run_in_a_loop_whose_condition_reads_only_its_counter(self, grad_accum_steps):
    trainer, iterator = build(tf.distribute.get_strategy(), grad_accum_steps=grad_accum_steps)
    loops = loop_conditions(trainer.train_loop.get_concrete_function(iterator, tf.constant(1)))
    reading_answers = [name for name, dtypes in loops.items() if "bool" in dtypes]
    self.assertEqual(reading_answers, ["while"])  # the outer loop, between blocks
    inner = [name for name in loops if name.startswith("while/")]
    # The block of steps, and inside it the micro-batches of an accumulated step.
    self.assertLen(inner, 1 if grad_accum_steps == 1 else 2, loops)
    for name in inner:
      self.assertTrue(set(loops[name]) <= {"int32", "int64"}, (name, loops[name]))


class InputTeardownTest(absltest.TestCase):
  """A distributed iterator feeds each device through a small dataset of its
  own; with tf.data autotuning on there, deleting the iterator after a
  minute of training waited out the autotuner's sleep of up to a minute
  (docs/benchmarks.md). Catches those per-device datasets autotuning again
  (tf_patches lost), while the training pipeline itself keeps autotuning."""

  def test_only_the_training_pipeline_autotunes(self):
    strategy = strategy_lib.create_strategy(MIRRORED)
    _, iterator = build(strategy)
    next(iterator)
    worker = iterator._iterators[0]  # pylint: disable=protected-access
    self.assertIn(worker._dataset.options().autotune.enabled, (None, True))  # pylint: disable=protected-access
    per_device = worker._iterator._device_iterators  # pylint: disable=protected-access
    self.assertLen(per_device, 2)
    for device_iterator in per_device:
      self.assertIs(device_iterator._dataset.options().autotune.enabled, False)  # pylint: disable=protected-access


class CollectivesTest(absltest.TestCase):
  """The ops of the traced step themselves, not the calls that ask for them:
  a step that all-reduced each gradient alone, ignored --all_reduce_pack_mb
  or _dtype, or sent the stop request in a collective of its own fails here."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.strategy = strategy_lib.create_strategy(MIRRORED)

  def test_a_step_is_one_all_reduce_whatever_the_depth(self):
    # The gradients (with the stop request riding along) in one pack; BN
    # moving statistics are per replica and cost nothing.
    for model in ("resnet8", "resnet20"):
      counts, _ = collectives_in_one_step(self.strategy, model=model)
      self.assertEqual(counts, {("CollectiveReduceV2", "ring", "float32"): 1}, model)

  def test_gradients_cross_in_packs_of_the_size_asked_for(self):
    # resnet20's 1.03 MB of float32 gradients in packs of at least 0.25 MB:
    # 4 packs, TensorFlow's grouping and AllReduce.num_packs agreeing.
    counts, trainer = collectives_in_one_step(self.strategy, model="resnet20",
                                              all_reduce_pack_mb=0.25)
    self.assertEqual(counts, {("CollectiveReduceV2", "ring", "float32"): 4})
    self.assertEqual(trainer.all_reduce.num_packs(trainer.variables), 4)
    self.assertIn("1.0 MB a step in 4 packs (--all_reduce_pack_mb=0.25), in fp32",
                  trainer.all_reduce.describe(trainer.variables))

  def test_gradients_cross_in_the_dtype_asked_for(self):
    counts, trainer = collectives_in_one_step(self.strategy, model="resnet20",
                                              all_reduce_pack_mb=0, all_reduce_dtype="bf16")
    self.assertEqual(counts, {("CollectiveReduceV2", "ring", "bfloat16"): 1})
    self.assertEqual(trainer.variables[0].dtype, tf.float32)  # the update's

  def test_sync_bn_adds_two_all_reduces_per_bn_layer(self):
    # The moments forward and their gradient backward, for each of resnet8's
    # 7 BN layers (the stem's and two in each of 3 blocks).
    counts, _ = collectives_in_one_step(self.strategy, model="resnet8", sync_bn=True)
    self.assertEqual(counts, {("CollectiveReduceV2", "ring", "float32"): 1 + 2 * 7})

  def test_replicas_share_the_mean_of_their_moving_statistics(self):
    trainer, _ = build(self.strategy, model="resnet8")
    examples = (tf.random.uniform([BATCH, 32, 32, 3], 0, 255, tf.int32, seed=1),
                tf.range(BATCH, dtype=tf.int64), tf.zeros([BATCH], tf.int32))
    # Each replica gets its half of the global batch, so their statistics differ.
    dataset = tf.data.Dataset.from_tensors(examples).map(
        lambda images, *rest: (tf.cast(images, tf.uint8), *rest)).unbatch().batch(BATCH)
    iterator = iter(self.strategy.experimental_distribute_dataset(dataset.repeat()))
    trainer.train_loop(iterator, tf.constant(2))
    statistic = trainer.moving_statistics[0].value
    replicas = [v.numpy() for v in statistic.values]
    mean = (replicas[0] + replicas[1]) / 2
    self.assertTrue((replicas[0] != replicas[1]).any(), "replicas saw the same examples")
    # Read across replicas (a checkpoint, summaries) a statistic is the mean.
    self.assertSequenceAlmostEqual(statistic.numpy(), mean, places=6)
    trainer.sync_moving_statistics()
    for value in statistic.values:
      self.assertSequenceAlmostEqual(value.numpy(), mean, places=6)


def xla_compiled(function):
  """{name: its ops} of the functions a traced function runs compiled by XLA."""
  library = function.graph.as_graph_def().library.function
  return {f.signature.name: {n.op for n in f.node_def} for f in library
          if f.attr.get("_XlaMustCompile") and f.attr["_XlaMustCompile"].b}


def step_on_gpus(strategy, **options):
  """(a trainer, its train loop traced for one step) with TensorFlow told the
  replicas are GPUs and the all-reduce --all_reduce=auto picks there
  (--all_reduce_pack_mb=0: one pack)."""
  with mock.patch.object(strategy_lib, "all_on_cpu", return_value=False):
    all_reduce = strategy_lib.gradient_all_reduce(
        DistributeConfig(all_reduce_pack_mb=0), strategy)
  with mock.patch.object(mirrored_run, "_is_gpu_device", return_value=True), \
       mock.patch.object(mirrored_strategy, "_is_gpu_device", return_value=True), \
       mock.patch.object(strategy_lib, "all_on_cpu", return_value=False), \
       mock.patch.object(strategy_lib, "gradient_all_reduce", return_value=all_reduce):
    trainer, iterator = build(strategy, model="resnet8", **options)
    return trainer, trainer.train_loop.get_concrete_function(iterator, tf.constant(1))


class XlaOnGpusTest(parameterized.TestCase):
  """--enable_xla over several GPUs compiles the forward and backward only:
  an XLA-compiled collective exhausts threads on one host and cannot run
  across hosts in TensorFlow 2.21 (strategy.xla_scope). Tracing is all a
  CPU can check: XLA cannot run across logical CPU devices."""

  @parameterized.parameters("fp32", "fp16")
  def test_xla_compiles_forward_and_backward_and_leaves_the_all_reduce_outside(self, dtype):
    strategy = strategy_lib.create_strategy(MIRRORED)
    trainer, step = step_on_gpus(strategy, dtype=dtype, enable_xla=True)
    self.assertEqual(trainer.xla_scope, "gradients")
    compiled = xla_compiled(step)
    self.assertTrue(compiled, "nothing is compiled by XLA")
    for name, ops in compiled.items():
      self.assertIn("Conv2DBackpropFilter", ops, name)  # forward and backward
      self.assertFalse({op for op in ops if op.startswith(("Collective", "Nccl"))}, name)
    # The gradients still cross, once, outside XLA, as the flags ask.
    self.assertEqual(collectives(step), {("CollectiveReduceV2", "nccl", "float32"): 1})

  def test_the_8gpu_recipes_step_compiles_no_collective(self):
    """The recipe's own numerics and XLA setting, on a small model."""
    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "launch", "configs", "resnet50_imagenet_8gpu.cfg")
    with open(recipe) as f:
      flags = dict(line.strip().lstrip("-").partition("=")[::2] for line in f
                   if line.startswith("--"))
    self.assertEqual((flags["enable_xla"], flags["dtype"]), ("", "fp16"))
    self.assertNotIn("sync_bn", flags)
    self.assertNotIn("all_reduce_dtype", flags)  # fp32: GPUs have no bf16 collectives
    strategy = strategy_lib.create_strategy(MIRRORED)
    _, step = step_on_gpus(strategy, dtype=flags["dtype"], enable_xla=True)
    for name, ops in xla_compiled(step).items():
      self.assertFalse({op for op in ops if op.startswith(("Collective", "Nccl"))}, name)

  def test_one_device_compiles_the_whole_step(self):
    strategy_lib.create_strategy(MIRRORED)  # the process's logical devices, before any op
    trainer, _ = build(tf.distribute.OneDeviceStrategy("/cpu:0"), model="resnet8",
                       enable_xla=True)
    self.assertEqual(trainer.xla_scope, "step")

  def test_xla_with_sync_bn_over_gpus_is_refused(self):
    strategy = strategy_lib.create_strategy(MIRRORED)
    with self.assertRaisesRegex(ConfigError, r"^--enable_xla with --sync_bn over several GPUs"):
      step_on_gpus(strategy, enable_xla=True, sync_bn=True)

  def test_xla_across_logical_cpu_devices_is_refused_before_anything_is_traced(self):
    """The combination XLA cannot place (its variables on several CPU
    devices) is one line at start, not a failure at the first step."""
    strategy = strategy_lib.create_strategy(MIRRORED)
    with self.assertRaisesRegex(ConfigError, r"^--enable_xla needs one device, GPUs or a TPU"):
      build(strategy, model="resnet8", enable_xla=True)


class TpuStepTest(absltest.TestCase):

  def test_pod_recipe_replica_step_lowers_to_hlo(self):
    # What TPUStrategy compiles per replica: static shapes, no Python, every
    # op XLA has a kernel for. Lowering (not compiling) keeps it fast.
    strategy = tf.distribute.get_strategy()
    trainer, _ = build(strategy, model="resnet50", image_size=64, dtype="bf16",
                       optimizer="lars", sync_bn=True, label_smoothing=0.1)
    step = tf.function(trainer.replica.replica_step, jit_compile=True)
    args = (tf.zeros([BATCH, 64, 64, 3], tf.uint8), tf.zeros([BATCH], tf.int64),
            tf.zeros([BATCH], tf.int32), tf.constant(False))
    hlo = step.experimental_get_compiler_ir(*args)(stage="hlo")
    self.assertIn("ENTRY", hlo)
    self.assertIn("convolution", hlo)
    self.assertIn("bf16", hlo)
    self.assertNotIn("custom-call", hlo.replace("custom-call-target", ""))

  def test_recipe_steps_lower_to_hlo(self):
    # Random erasing, mixup and CutMix (their Beta draws included), the EMA
    # update and gradient accumulation are inside the replica step: they too
    # must lower with static shapes.
    trainer, _ = build(tf.distribute.get_strategy(), dtype="bf16", optimizer="lamb",
                       loss="bce", mixup_alpha=0.2, cutmix_alpha=1.0, random_erasing=0.25,
                       ema_decay=0.999, ema_every_steps=4, grad_accum_steps=2)
    half = BATCH // 2
    accumulate = tf.function(trainer.replica.accumulate_step, jit_compile=True)
    hlo = accumulate.experimental_get_compiler_ir(
        tf.zeros([half, 32, 32, 3], tf.uint8), tf.zeros([half], tf.int64),
        tf.zeros([half], tf.int32), tf.constant(1))(stage="hlo")
    self.assertIn("convolution", hlo)
    self.assertIn("rng", hlo)  # the stateless draws
    apply = tf.function(trainer.replica.apply_accumulated, jit_compile=True)
    hlo = apply.experimental_get_compiler_ir(tf.constant(False))(stage="hlo")
    self.assertIn("ENTRY", hlo)
    self.assertNotIn("custom-call", hlo.replace("custom-call-target", ""))


if __name__ == "__main__":
  absltest.main()
