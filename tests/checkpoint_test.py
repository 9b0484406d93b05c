"""Checkpoints: exact resume after SIGKILL and SIGTERM, and the fault paths."""

import contextlib
import glob
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
import numpy as np
import tensorflow as tf
from absl.testing import absltest

from resnet_dist import checkpoints, models, train
from resnet_dist.config import Config
from resnet_dist.errors import ConfigError, StorageError
from tests import launching

COMMON = ["--model=resnet20", "--dataset=digits", "--global_batch_size=32",
          "--train_steps=16", "--steps_per_loop=2", "--checkpoint_every_steps=4",
          "--deterministic", "--seed=5", "--skip_eval", "--base_learning_rate=0.4",
          "--keep_checkpoints=10"]
# Every recipe flag, for the resumed runs: each of their random draws must
# replay exactly on resume. The training size grows to 64 at step 13, after
# the kill.
RECIPE = ["--ema_decay=0.9", "--ema_every_steps=2", "--mixup_alpha=0.2", "--cutmix_alpha=1.0",
          "--augment=trivialaugment_wide", "--random_erasing=0.25", "--label_smoothing=0.1",
          "--progressive_resize=32:64:0.2:0.35", "--grad_accum_steps=2", "--optimizer=lamb",
          "--loss=bce", "--base_learning_rate=0.01"]


def variables(model_dir, number=None):
  directory = os.path.join(model_dir, "checkpoints")
  path = os.path.join(directory, f"ckpt-{number}") if number else tf.train.latest_checkpoint(directory)
  reader = tf.train.load_checkpoint(path)
  # save_counter counts saves (a SIGTERM adds one), not training state.
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if not k.startswith(("_CHECKPOINTABLE", "save_counter"))}


def registered_step(model_dir):
  """The step of the latest checkpoint the manager has registered, or 0."""
  latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
  return int(latest.rsplit("-", 1)[1]) if latest else 0


def saved_steps(model_dir):
  return sorted(int(p.split("ckpt-")[1].split(".")[0])
                for p in glob.glob(os.path.join(model_dir, "checkpoints", "ckpt-*.index")))


def _ended_pid():
  """The pid of a process that has ended (as a killed run's is)."""
  process = subprocess.Popen(["true"])
  process.wait()
  return process.pid


class ModelStateTest(absltest.TestCase):

  def test_checkpoint_holds_every_model_variable(self):
    # Blocks keep their layers in lists, which tf.train.Checkpoint does not
    # follow from a keras.Model: BN moving statistics would go unsaved.
    model = models.get_model("resnet20", num_classes=10)
    path = tf.train.Checkpoint(model=checkpoints.model_state(model)).write(
        os.path.join(self.create_tempdir().full_path, "ckpt"))
    keys = [k for k in tf.train.load_checkpoint(path).get_variable_to_shape_map()
            if k.startswith("model/")]
    self.assertLen(keys, len(model.variables))
    self.assertLen([k for k in keys if "moving_variance" in k], 19)  # every BN, blocks included


class CheckpointTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = launching.digits_dir()  # prepared once, before any process starts
    cls.reference = {}

  def args(self, model_dir, *extra):
    return [*COMMON, f"--model_dir={model_dir}", f"--data_dir={self.data_dir}", *extra]

  def train(self, model_dir, *extra):
    return launching.run_train(*self.args(model_dir, *extra))

  def start_and_signal_after_first_checkpoint(self, model_dir, sig, *extra):
    process = launching.start("launch.train", *self.args(model_dir, *extra))
    deadline = time.time() + 300
    while not registered_step(model_dir) and process.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    process.send_signal(sig)
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err

  def uninterrupted(self, strategy_flags):
    key = tuple(strategy_flags)
    if key not in self.reference:
      model_dir = self.create_tempdir().full_path
      result = self.train(model_dir, *strategy_flags)
      self.assertEqual(result.returncode, 0, result.stderr[-3000:])
      self.reference[key] = variables(model_dir)
    return self.reference[key]

  def assert_bit_identical(self, a, b):
    self.assertEqual(sorted(a), sorted(b))
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)

  def test_sigkill_then_resume_is_bit_exact(self):
    # On one device with every recipe flag (their steps trace once per replica).
    strategy_flags = ["--strategy=one_device", *RECIPE]
    model_dir = self.create_tempdir().full_path
    code, _, _ = self.start_and_signal_after_first_checkpoint(
        model_dir, signal.SIGKILL, *strategy_flags)
    self.assertEqual(code, -signal.SIGKILL)
    killed_at = registered_step(model_dir)
    self.assertLess(killed_at, 16, "the run finished before the kill; nothing was tested")
    result = self.train(model_dir, *strategy_flags)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn(f"resuming from step {killed_at}", result.stdout)
    self.assertIn("training images are 64x64 from step 13", result.stdout)
    reference = self.uninterrupted(strategy_flags)
    self.assertTrue(any(key.startswith("ema/") for key in reference))
    self.assert_bit_identical(reference, variables(model_dir))

  def test_sigterm_saves_then_resumes_exactly(self):
    # On one device: over several replicas a checkpoint between the regular
    # saves holds the replicas' mean BN statistics, which the uninterrupted
    # run averages only at its next save, so the two differ in the last bit
    # (docs/checkpoints.md). With the recipe flags, as the SIGKILL case: the
    # two share their uninterrupted run.
    strategy_flags = ["--strategy=one_device", *RECIPE]
    model_dir = self.create_tempdir().full_path
    code, out, _ = self.start_and_signal_after_first_checkpoint(
        model_dir, signal.SIGTERM, *strategy_flags)
    self.assertEqual(code, 75)
    self.assertIn("SIGTERM: saved a checkpoint at step", out)
    stopped_at = registered_step(model_dir)
    self.assertLess(stopped_at, 16)
    result = self.train(model_dir, *strategy_flags)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn(f"resuming from step {stopped_at}", result.stdout)
    self.assert_bit_identical(self.uninterrupted(strategy_flags), variables(model_dir))


class FaultPathTest(absltest.TestCase):
  """What a run does with damaged, foreign or unwritable checkpoints: train.run()
  in this process (launch_test and exits_test cover the one-line errors and
  exit statuses the entrypoints make of these exceptions)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = launching.digits_dir()  # prepared once, before any process starts
    # A run of 8 steps with ckpt-4 and ckpt-8, copied by the tests that damage it.
    cls.two = os.path.join(tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir()), "two")
    cls.train(cls.two, train_steps=8)

  @classmethod
  def train(cls, model_dir, **changes):
    """train.run() of the COMMON settings on one device; its console output."""
    settings = dict(model="resnet20", dataset="digits", data_dir=cls.data_dir,
                    global_batch_size=32, train_steps=16, steps_per_loop=2,
                    checkpoint_every_steps=4, seed=5, skip_eval=True, base_learning_rate=0.4,
                    keep_checkpoints=10, strategy="one_device", model_dir=model_dir)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      train.run(Config.from_flat(**{**settings, **changes}))
    return out.getvalue()

  def two_checkpoints(self):
    copy = os.path.join(self.create_tempdir().full_path, "run")
    shutil.copytree(self.two, copy)
    self.assertEqual(saved_steps(copy), [4, 8])
    return copy

  def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(self):
    model_dir = self.create_tempdir().full_path
    with self.assertRaisesRegex(FloatingPointError,
                                r"non-finite (training loss|weights) at step (\d+)") as caught:
      self.train(model_dir, base_learning_rate=1e7, checkpoint_every_steps=1,
                 steps_per_loop=1, train_steps=40)
    bad_step = int(str(caught.exception).split("at step ")[1].split(";")[0])
    self.assertNotEmpty(saved_steps(model_dir))
    self.assertTrue(all(step < bad_step for step in saved_steps(model_dir)))
    for value in variables(model_dir).values():
      if value.dtype == np.float32:
        self.assertTrue(np.all(np.isfinite(value)))

  def test_truncated_latest_checkpoint_falls_back_to_the_previous(self):
    model_dir = self.two_checkpoints()
    data_file = glob.glob(os.path.join(model_dir, "checkpoints", "ckpt-8.data-*"))[0]
    with open(data_file, "r+b") as f:
      f.truncate(os.path.getsize(data_file) // 2)
    out = self.train(model_dir, train_steps=12)
    self.assertIn("warning: cannot read checkpoint", out)
    self.assertIn("resuming from step 4", out)

  def test_a_lost_or_garbled_state_file_still_resumes_from_the_newest(self):
    for damage in ("remove", "garble"):
      model_dir = self.two_checkpoints()
      state = os.path.join(model_dir, "checkpoints", "checkpoint")
      if damage == "remove":
        os.remove(state)
      else:
        with open(state, "w") as f:
          f.write("model_checkpoint_path: \x00\x01 not a proto {{{")
      self.assertIn("resuming from step 8 ", self.train(model_dir, train_steps=12), damage)
      self.assertEqual(saved_steps(model_dir), [4, 8, 12], damage)

  def assert_untouched(self, model_dir, before):
    after = {p: os.path.getmtime(p) for p in glob.glob(f"{model_dir}/checkpoints/ckpt-*")}
    self.assertEqual(before, after)

  def test_resuming_with_another_structure_or_model_is_refused_and_keeps_the_checkpoints(self):
    model_dir = self.two_checkpoints()
    before = {p: os.path.getmtime(p) for p in glob.glob(f"{model_dir}/checkpoints/ckpt-*")}
    for changes, message in (
        ({"dtype": "fp16"}, r"ckpt-8 was saved by a run without --dtype=fp16 .*resume it with "
                            r"the same"),
        ({"model": "resnet32"}, r"^--model_dir=.* holds checkpoints of another model "
                                r"\(model resnet20 there, resnet32 here\)"),
        ({"global_batch_size": 16}, r"was trained at --global_batch_size=32; resuming at 16 "
                                    r"would move the data position and the learning rate")):
      with self.assertRaisesRegex(ConfigError, message, msg=str(changes)):
        self.train(model_dir, train_steps=12, **changes)
      self.assert_untouched(model_dir, before)

  def test_no_readable_checkpoint_stops_unless_asked_to_start_over(self):
    model_dir = self.two_checkpoints()
    for data_file in glob.glob(os.path.join(model_dir, "checkpoints", "ckpt-*.data-*")):
      with open(data_file, "r+b") as f:
        f.truncate(os.path.getsize(data_file) // 2)
    with self.assertRaisesRegex(ConfigError, r"none of the 2 checkpoints in .* can be read; "
                                             r"--start_over trains from step 0 and replaces them"):
      self.train(model_dir, train_steps=12)
    self.assertNotIn("resuming", self.train(model_dir, train_steps=4, start_over=True))
    self.assertEqual(saved_steps(model_dir), [4])

  def test_a_second_run_on_a_model_dir_is_refused_and_a_dead_runs_lock_taken_over(self):
    model_dir = self.create_tempdir().full_path
    lock = os.path.join(model_dir, "training.lock")
    with open(lock, "w") as f:  # held by a live process: this test's
      f.write(f"{socket.gethostname()} {os.getpid()}\n")
    with self.assertRaisesRegex(ConfigError, r"--model_dir=.* is in use by another run \(\S+ "
                                             rf"{os.getpid()}\); if that run is gone, delete "):
      self.train(model_dir)
    self.assertFalse(os.path.exists(os.path.join(model_dir, "checkpoints")))
    with open(lock, "w") as f:
      f.write(f"{socket.gethostname()} {_ended_pid()}\n")
    out = self.train(model_dir, train_steps=4)
    self.assertIn("warning: taking over the lock of a run that is gone", out)
    self.assertFalse(os.path.exists(lock))  # released at the end

  def test_a_failed_save_keeps_the_checkpoint_before(self):
    model_dir = self.create_tempdir().full_path
    os.makedirs(os.path.join(model_dir, "checkpoints"))
    # Where step 8's files would be written, a file: the write fails as on a full disk.
    open(os.path.join(model_dir, "checkpoints", "ckpt-8_temp"), "w").close()
    with self.assertRaisesRegex(StorageError, r"^cannot save the checkpoint of step 8 in "
                                              r".*; the last saved one is .*ckpt-4$"):
      self.train(model_dir, train_steps=8)
    self.assertEqual(saved_steps(model_dir), [4])
    self.assertEqual(glob.glob(os.path.join(model_dir, "checkpoints", "*_temp*")), [])


class PreemptionNoticeTest(absltest.TestCase):

  def test_sigterm_stops_inside_a_host_loop_and_saves_within_seconds(self):
    """One host loop covers the whole run (22,000 steps). The signal comes
    once the loop has trained for a while (15 s of CPU after the handler is
    in place: tracing takes a few), so a loop that looked at the stop request
    only as it began would train on for minutes, and one that stopped only at
    its end would save step 22,000: the saved step must be past the first and
    far below the last, and the exit come within seconds."""
    model_dir = self.create_tempdir().full_path
    args = ["--flagfile=launch/configs/digits.cfg", "--train_epochs=1000",
            "--steps_per_loop=100000", "--checkpoint_every_steps=100000",
            f"--model_dir={model_dir}", f"--data_dir={model_dir}/data"]
    process = launching.start("launch.train", *args)
    total = next(int(line.split()[1]) for line in process.stdout
                 if line.startswith("schedule"))
    launching.wait_until_catches(process, signal.SIGTERM)  # the host loop has begun
    launching.wait_for_cpu_seconds(process, 15)
    signalled = time.time()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    latency = time.time() - signalled
    self.assertEqual(process.returncode, 75, err[-3000:])
    step = registered_step(model_dir)
    self.assertBetween(step, 2, total // 10)
    self.assertIn(f"SIGTERM: saved a checkpoint at step {step}; run again to resume", out)
    # A hang detector: tracing, the step in progress, a save and the exit take seconds.
    self.assertLess(latency, 15, "from the signal to the exit, checkpoint saved")
    print(f"exited {latency:.1f} s after SIGTERM, at step {step} of {total}")
    # That the run resumes from it: CheckpointTest.test_sigterm_saves_then_resumes_exactly.


if __name__ == "__main__":
  absltest.main()
