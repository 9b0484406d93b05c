"""What a run shows: TensorBoard summaries read back, the console, a profile
trace, and its evaluation, which launch.evaluate and a plain loop over the
test images reproduce. One run of the default recipe, in this process.
"""

import contextlib
import glob
import io
import json
import os
import platform
import tempfile
import time

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest
from tensorboard.backend.event_processing import event_accumulator

from flags import definitions
from resnet_dist import checkpoints, models, monitor, optim, perf, train
from resnet_dist import strategy as strategy_lib
from resnet_dist import trainer as trainer_lib
from resnet_dist.config import Config
from resnet_dist.data import sources
from tests import fixtures

STEPS, BATCH = 12, 32
RUN = ["--flagfile=launch/configs/digits.cfg", f"--train_steps={STEPS}",
       f"--global_batch_size={BATCH}", "--steps_per_loop=4", "--log_every_steps=4",
       "--profile_steps=4,8", "--warmup_epochs=0.5"]


def setUpModule():
  strategy_lib.split_cpu(2)  # as digits.cfg's 2 logical CPU devices, before any op


def parse(*args):
  """The flags of an entrypoint's command line, parsed as it would."""
  definitions.FLAGS.unparse_flags()
  definitions.FLAGS(["test", *args])


def evaluate_as_launched(*args):
  """launch.evaluate's main in this process: (status, stdout, stderr).

  Imported here: launch.exits, which every entrypoint imports first, gives
  the process a temp dir of its own, which must not happen before the test's
  own directories exist."""
  from launch import evaluate as evaluate_entrypoint  # pylint: disable=g-import-not-at-top
  parse(*args)
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = evaluate_entrypoint.main.__wrapped__(["evaluate"])
  return status, out.getvalue(), err.getvalue()


def scalars(directory):
  """tag -> {step: value} of a TensorBoard log directory."""
  accumulator = event_accumulator.EventAccumulator(
      directory, size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()

  def is_scalar(tag):
    proto = accumulator.Tensors(tag)[0].tensor_proto
    return not proto.tensor_shape.dim and proto.dtype != tf.string.as_datatype_enum

  values = {tag: {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in accumulator.Tensors(tag)}
            for tag in accumulator.Tags()["tensors"] if is_scalar(tag)}
  return values, accumulator


class HardwareNotesTest(absltest.TestCase):

  def test_reduced_precision_warning_only_for_emulated_cpus(self):
    warning = perf.emulated_precision_warning
    self.assertIn("without AVX-512", warning("bf16", True, {"avx2", "fma"}))
    self.assertEqual(warning("bf16", True, {"avx2", "avx512f"}), "")
    self.assertEqual(warning("fp32", True, {"avx2"}), "")
    self.assertEqual(warning("bf16", False, {"avx2"}), "")  # TPU, GPU
    # fp16 ran at 0.14x fp32 with AVX512-BF16 only, and at 0.006x with AVX512-FP16.
    for flags in ({"avx512f", "avx512_bf16"}, {"avx512f", "avx512_fp16", "amx_bf16"}):
      self.assertIn("--dtype=fp16 on a CPU: TensorFlow trains float16 many times slower",
                    warning("fp16", True, flags))
    self.assertEqual(warning("fp16", False, {"avx2"}), "")


class RunMonitoringTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model_dir = tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir())
    cls.data_dir = fixtures.digits_dir()
    parse(*RUN, f"--model_dir={cls.model_dir}", f"--data_dir={cls.data_dir}")
    with fixtures.quiet() as out:
      train.run(definitions.config_from_flags())
    cls.stdout = out.getvalue()
    with open(os.path.join(cls.model_dir, "summary.json")) as f:
      cls.summary = json.load(f)
    cls.train, cls.train_events = scalars(os.path.join(cls.model_dir, "train"))
    cls.eval, _ = scalars(os.path.join(cls.model_dir, "eval"))

  def test_train_summaries_once_per_host_loop(self):
    for tag in ("loss", "top1", "top5", "learning_rate", "gradient_norm",
                "perf/examples_per_second", "perf/examples_per_second_per_replica",
                "perf/step_time_ms", "perf/flop_utilization", "input/skipped_records"):
      self.assertEqual(sorted(self.train[tag]), [4, 8, 12], tag)  # a point per loop of 4
    # Not measurable over logical CPU devices (distributed_input.input_wait_measurable).
    self.assertNotIn("perf/input_wait_fraction", self.train)
    for step in (4, 8, 12):
      self.assertAlmostEqual(self.train["perf/examples_per_second_per_replica"][step] * 2,
                             self.train["perf/examples_per_second"][step], places=3)
      # The training FLOPs done over the peak measured at start (a peak measured
      # on a busy machine can make this exceed 1, so no bound on it).
      done = (self.train["perf/examples_per_second"][step]
              * perf.training_flops_per_image(self.summary["gmacs_per_image"] * 1e9))
      self.assertGreater(self.train["perf/flop_utilization"][step], 0)
      np.testing.assert_allclose(self.train["perf/flop_utilization"][step],
                                 done / (self.summary["peak_gflops"] * 1e9), rtol=1e-4)
    self.assertAlmostEqual(self.train["model/gmacs_per_image"][0], 0.0408, places=3)

  def test_logged_learning_rate_is_the_schedule(self):
    # digits: 1,438 training examples -> 44 steps per epoch at batch 32; warmup 0.5 epochs.
    schedule = optim.LearningRate(0.4, BATCH, 1438 // BATCH, STEPS, 0.5, "cosine")
    for step, value in self.train["learning_rate"].items():
      self.assertAlmostEqual(value, schedule.value_at(step - 1), places=6)
    self.assertGreater(self.train["learning_rate"][12], self.train["learning_rate"][4])

  def test_eval_summaries_match_summary_json(self):
    self.assertEqual(sorted(self.eval["top1"]), [STEPS])
    self.assertAlmostEqual(self.eval["top1"][STEPS], self.summary["eval_top1"], places=6)
    self.assertAlmostEqual(self.eval["loss"][STEPS], self.summary["eval_loss"], places=5)
    self.assertEqual(self.summary["eval_examples"], 359)

  def test_images_and_hparams_at_start(self):
    tags = self.train_events.Tags()["tensors"]
    self.assertIn("input_images", tags)
    images = self.train_events.Tensors("input_images")[0]
    self.assertEqual(len(tf.make_ndarray(images.tensor_proto)), 2 + 8)  # width, height, 8 PNGs
    self.assertIn("_hparams_/session_start_info", tags)
    hparams = self.train_events.SummaryMetadata("_hparams_/session_start_info")
    self.assertIn(b"global_batch_size", hparams.plugin_data.content)

  def test_profile_trace_is_written(self):
    traces = glob.glob(os.path.join(self.model_dir, "plugins", "profile", "*", "*.xplane.pb"))
    self.assertLen(traces, 1)
    self.assertGreater(os.path.getsize(traces[0]), 1000)

  def test_console_block_progress_and_end(self):
    out = self.stdout
    for line in ("strategy   mirrored: 2 replica(s)", f"batch      {BATCH} global, 16 per replica",
                 "model      resnet20 (v1.5), 269,722 trainable parameters, 0.041 GMACs",
                 "dataset    digits: 1,438 train / 359 eval examples, 10 classes",
                 f"model_dir  {self.model_dir}", "GFLOP/s (float32 matmul, measured)",
                 f"; CPU kernels {perf.cpu_kernels()}"):
      self.assertIn(line, out)
    progress = [l for l in out.splitlines() if l.startswith("step ")]
    self.assertLen(progress, 3)
    self.assertRegex(progress[-1], r"step 12/12 epoch 0.27 loss \d+\.\d+ top-1 \d\.\d+ lr "
                                   r"\S+ \d+ images/s ETA 0:00:00")
    self.assertIn(f"tensorboard --logdir {self.model_dir}", out)


  def test_summary_json(self):
    for key in ("global_step", "train_loss", "eval_top1", "eval_top5", "eval_examples",
                "examples_per_second", "input_wait_fraction", "flop_utilization",
                "skipped_train_records", "strategy", "num_replicas", "model", "dataset"):
      self.assertIn(key, self.summary)
    self.assertEqual(self.summary["global_step"], STEPS)
    self.assertEqual((self.summary["strategy"], self.summary["num_replicas"]), ("mirrored", 2))
    self.assertEqual(self.summary["skipped_train_records"], 0)
    self.assertIsNone(self.summary["input_wait_fraction"])  # 2 logical CPU devices
    if platform.machine() == "x86_64":  # resnet_dist turns TensorFlow's oneDNN kernels on
      self.assertEqual(self.summary["cpu_kernels"], "oneDNN")
    self.assertTrue(os.listdir(os.path.join(self.model_dir, "checkpoints")))

  def test_evaluate_reproduces_the_final_evaluation(self):
    # On one device, as the run's 2 replicas: a second MirroredStrategy in one
    # process would reuse the first one's collective keys.
    status, out, err = evaluate_as_launched(f"--model_dir={self.model_dir}",
                                            "--strategy=one_device")
    self.assertEqual((status, err), (0, ""))
    evaluation = json.loads(out.strip().splitlines()[-1])
    self.assertEqual(evaluation["count"], 359)
    self.assertEqual(evaluation["split"], "test")
    self.assertAlmostEqual(evaluation["top1"], self.summary["eval_top1"], places=6)
    self.assertAlmostEqual(evaluation["loss"], self.summary["eval_loss"], places=4)

  def test_evaluation_equals_a_plain_loop_over_every_test_image(self):
    """Exact evaluation (#33 item 10): the run's metrics against Keras's
    forward pass over all 359 raw test arrays, preprocessed by hand (resized
    to 32x32, normalised by digits' 64 and 96). An evaluation that dropped,
    doubled or padded examples into the counts, or cropped, differs here."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    test = tfds.as_numpy(tfds.builder("digits", data_dir=self.data_dir).as_dataset(
        split="test", batch_size=-1))
    images = tf.cast(tf.round(tf.image.resize(tf.image.grayscale_to_rgb(
        tf.constant(test["image"])) if test["image"].shape[-1] == 1 else test["image"],
        [32, 32])), tf.float32)
    model = models.get_model("resnet20", num_classes=10, image_size=32)
    checkpoints.restore_model(model, checkpoints.find_checkpoint(self.model_dir))
    logits = model.predict((images - 64.0) / 96.0, batch_size=64, verbose=0)
    labels = test["label"]
    self.assertLen(labels, 359)
    top1 = np.mean(np.argmax(logits, -1) == labels)
    top5 = np.mean([label in np.argsort(row)[-5:] for row, label in zip(logits, labels)])
    loss = np.mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    self.assertAlmostEqual(self.summary["eval_top1"], top1, places=6)
    self.assertAlmostEqual(self.summary["eval_top5"], top5, places=6)
    self.assertAlmostEqual(self.summary["eval_loss"], loss, places=4)

  def test_evaluate_with_another_model_is_one_line(self):
    status, _, err = evaluate_as_launched(f"--model_dir={self.model_dir}", "--model=resnet32",
                                          "--strategy=one_device")
    self.assertEqual(status, 2)
    self.assertRegex(err, r"^error: \S+ does not hold this model's weights \([^\n]*\n$")


class LinesTest(absltest.TestCase):

  def test_the_eval_line_says_how_many_images_were_left_out(self):
    result = {"step": 7, "loss": 1.5, "top1": 0.5, "top5": 0.9, "count": 350.0}
    self.assertEqual(monitor.eval_line(result, 359),
                     "eval at step 7: loss 1.5000 top-1 0.5000 top-5 0.9000 over 350 examples "
                     "(9 undecodable, skipped)")
    self.assertEqual(monitor.eval_line({**result, "count": 359.0}, 359, of_ema=True),
                     "eval (EMA) at step 7: loss 1.5000 top-1 0.5000 top-5 0.9000 over 359 "
                     "examples")


class InputWaitTest(absltest.TestCase):
  """The input wait fraction tells a slow pipeline from a fast one."""

  def wait_fraction(self, delay):
    strategy = tf.distribute.get_strategy()
    config = Config.from_flat(global_batch_size=8)
    source = sources.synthetic_source(10, 32, num_examples=64)
    keras.utils.set_random_seed(0)
    trainer = trainer_lib.Trainer(config, strategy, source, steps_per_epoch=8, total_steps=100)
    batch = (tf.zeros([8, 32, 32, 3], tf.uint8), tf.zeros([8], tf.int64), tf.zeros([8], tf.int32))

    def slow(*batch):
      time.sleep(delay)
      return batch

    dataset = tf.data.Dataset.from_tensors(batch).repeat().map(
        lambda *b: tf.numpy_function(slow, b, [tf.uint8, tf.int64, tf.int32]))
    dataset = dataset.map(lambda *b: tuple(tf.ensure_shape(t, s.shape) for t, s in zip(b, batch)))
    iterator = iter(dataset)
    trainer.train_loop(iterator, tf.constant(2))  # trace
    trainer.input_seconds.assign(0.0)
    began = time.perf_counter()
    trainer.train_loop(iterator, tf.constant(5))
    return float(trainer.input_seconds.numpy()) / (time.perf_counter() - began)

  def test_slow_input_shows(self):
    fast, slow = self.wait_fraction(0.0), self.wait_fraction(0.5)
    self.assertGreater(slow, 0.6)   # 0.5 s per batch against a step of about 0.05 s
    self.assertLess(fast, slow / 2)
    self.assertGreaterEqual(fast, 0.0)


class MixedTop1Test(absltest.TestCase):
  """Training top-1 under mixup and CutMix counts the label that weighs most
  in each mixed target. Catches a top-1 taken against the batch's own labels:
  whenever the partner outweighs an image, that counts a wrong answer."""

  def test_training_top1_counts_the_dominant_label(self):
    strategy = tf.distribute.get_strategy()
    config = Config.from_flat(global_batch_size=16, mixup_alpha=0.4, cutmix_alpha=1.0)
    source = sources.synthetic_source(3, 8, num_examples=16)
    trainer = trainer_lib.Trainer(config, strategy, source, steps_per_epoch=8, total_steps=100)
    mean, std = (tf.constant(v, tf.float32) for v in (source.mean, source.std))

    class Reader:
      """Logits = the image's mean colour before normalisation: an image of
      class c is pure channel c, so mixing its pixels mixes its logits as the
      targets are mixed, and the right answer is the dominant label."""
      compute_dtype = "float32"

      def __call__(self, images, training):
        del training
        return tf.reduce_mean(images * std + mean, axis=[1, 2])

    trainer.replica.model = Reader()
    labels = tf.constant([i % 3 for i in range(15)] + [1], tf.int64)  # no neighbours alike
    images = tf.cast(tf.one_hot(labels, 3)[:, None, None, :] * 255 * tf.ones([1, 8, 8, 1]),
                     tf.uint8)
    partner_won = 0
    for step in range(8):
      trainer.optimizer.iterations.assign(step)  # a new mixing draw each step
      trainer.replica.train_metrics.reset()
      trainer.replica._gradients(images, labels, tf.zeros([16], tf.int32), 0)  # pylint: disable=protected-access
      self.assertEqual(trainer.replica.train_metrics.result()["top1"], 1.0, f"step {step}")
      mixed, _ = trainer.replica._regularize(  # pylint: disable=protected-access
          trainer.replica.normalize(images), tf.one_hot(labels, 3), 0)  # pylint: disable=protected-access
      own = tf.reduce_mean(mixed * std + mean, axis=[1, 2])
      partner_won += int(tf.reduce_sum(tf.cast(tf.argmax(own, -1) != labels, tf.int32)))
    self.assertGreater(partner_won, 0)  # the test saw targets that a wrong top-1 misses


if __name__ == "__main__":
  absltest.main()
