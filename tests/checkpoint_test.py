"""Checkpoints, in this process: what a checkpoint holds, and what a run does
with damaged, foreign or unwritable ones (train.run(); launch_test and
exits_test cover the one-line errors and exit statuses the entrypoints make
of these exceptions). Exact resume: tests/resume_test.py; killed and
signalled processes: tests/interruption_test.py.
"""


import contextlib
import glob
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from unittest import mock

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
import numpy as np
import tensorflow as tf
from absl.testing import absltest

from resnet_dist import checkpoints, evaluation, models, preemption, run_lock, train
from resnet_dist.config import Config
from resnet_dist.errors import ConfigError, StorageError
from tests import fixtures


def variables(model_dir):
  reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints"))
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if not k.startswith(("_CHECKPOINTABLE", "save_counter"))}


def saved_steps(model_dir):
  return sorted(int(p.split("ckpt-")[1].split(".")[0])
                for p in glob.glob(os.path.join(model_dir, "checkpoints", "ckpt-*.index")))


def read_json(path):
  with open(path) as f:
    return json.load(f)


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


class FaultPathTest(absltest.TestCase):
  """What a run does with damaged, foreign or unwritable checkpoints: train.run()
  in this process (launch_test and exits_test cover the one-line errors and
  exit statuses the entrypoints make of these exceptions)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = fixtures.digits_dir()
    # A run of 8 steps with ckpt-4 and ckpt-8, copied by the tests that damage it.
    cls.two = os.path.join(tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir()), "two")
    cls.train(cls.two, train_steps=8)

  @classmethod
  def train(cls, model_dir, **changes):
    """train.run() of the COMMON settings on one device; its console output."""
    settings = dict(model="resnet8", dataset="digits", data_dir=cls.data_dir,
                    global_batch_size=32, train_steps=16, steps_per_loop=2,
                    checkpoint_every_steps=4, seed=5, skip_eval=True, base_learning_rate=0.4,
                    keep_checkpoints=10, strategy="one_device", model_dir=model_dir)
    with fixtures.quiet() as out:
      train.run(Config.from_flat(**{**settings, **changes}))
    return out.getvalue()

  def two_checkpoints(self):
    copy = os.path.join(self.create_tempdir().full_path, "run")
    shutil.copytree(self.two, copy)
    self.assertEqual(saved_steps(copy), [4, 8])
    return copy

  def test_a_resume_on_other_data_is_refused_and_another_length_said(self):
    """A digits run resumed on other data trained on it and said only
    "resuming from step 8", its run.json still describing digits; a resume
    with another length recomputed the schedule without a word."""
    model_dir = self.two_checkpoints()
    with self.assertRaisesRegex(ConfigError, r"^--model_dir=\S+ was trained on dataset digits, "
                                             r"not synthetic: a resume trains on the data it "
                                             r"began with; to train these weights on other "
                                             r"data, start a new --model_dir with "
                                             r"--init_checkpoint="):
      self.train(model_dir, dataset="synthetic", num_classes=10)
    self.assertEqual(saved_steps(model_dir), [4, 8])
    out = self.train(model_dir, train_steps=24)
    self.assertRegex(out, r"the run was begun for 8 steps, now 24: its learning-rate schedule "
                          r"is recomputed over 24 \(at step 8: [\d.e-]+, not [\d.e-]+\)")
    self.assertEqual(read_json(os.path.join(model_dir, "run.json"))["total_steps"], 24)

  def test_odd_names_keep_each_console_line_one_line_and_each_command_runnable(self):
    root = self.create_tempdir().full_path
    fixtures.make_image_folder(os.path.join(root, "images"), per_class=4,
                               classes=("ants\nand bees", "moths"))
    model_dir = os.path.join(root, "my runs", "one")
    out = self.train(model_dir, dataset=f"folder:{root}/images", train_steps=2, image_size=32,
                     global_batch_size=8)
    self.assertIn("label ids: 0='ants\\nand bees', 1=moths (saved in classes.json)\n", out)
    self.assertIn(f"look at the run: tensorboard --logdir '{model_dir}'\n", out)

  def test_a_resize_ramp_past_the_last_epoch_is_one_line_before_any_work(self):
    model_dir = self.create_tempdir().full_path
    with self.assertRaisesRegex(ConfigError, r"^--progressive_resize=32:64:0:2 ramps until "
                                             r"epoch 2, after the run's last \(0\.\d+\): it "
                                             r"would never train at 64; end the ramp by epoch"):
      self.train(model_dir, progressive_resize=(32, 64, 0.0, 2.0), train_steps=4)
    self.assertEqual(os.listdir(model_dir), [])

  def test_a_file_where_tensorboard_writes_is_one_line_before_any_work(self):
    """It ended in a 41-line traceback once the first summary was written."""
    model_dir = self.create_tempdir().full_path
    open(os.path.join(model_dir, "train"), "w").close()
    with self.assertRaisesRegex(ConfigError, r"^\S+/train is a file where the run writes a "
                                             r"directory \(TensorBoard events\); move it, or "
                                             r"use another --model_dir$"):
      self.train(model_dir)
    self.assertEqual(sorted(os.listdir(model_dir)), ["train"])

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

  def test_rerunning_a_finished_run_keeps_its_summary(self):
    """Catches a rerun (the README's way to resume) that rewrites a finished
    run's summary.json with an empty loop's figures (a NaN loss, no rate),
    and a summary that strict JSON parsers reject."""
    model_dir = self.two_checkpoints()
    summary_path = os.path.join(model_dir, "summary.json")
    with open(summary_path) as f:
      written = f.read()

    def refuse(token):
      raise ValueError(f"not strict JSON: {token}")

    finished = json.loads(written, parse_constant=refuse)
    self.assertEqual(finished["global_step"], 8)
    self.assertGreater(finished["examples_per_second"], 0)
    self.assertIsNone(finished["eval_top1"])  # --skip_eval
    out = self.train(model_dir, train_steps=8)
    self.assertIn(f"already finished at step 8: nothing to train; summary in {summary_path}",
                  out)
    self.assertNotIn("resuming", out)
    with open(summary_path) as f:
      self.assertEqual(f.read(), written)
    self.assertEqual(saved_steps(model_dir), [4, 8])

  def test_the_closing_line_rounds_and_leaves_out_what_was_not_measured(self):
    out = self.train(self.create_tempdir().full_path, train_steps=2, checkpoint_every_steps=0)
    # (One host loop: a run's first is not timed, so there is no rate either.)
    self.assertRegex(out, r"\ndone: 2 steps(, \d+ images/s)?\n")  # --skip_eval: no top-1
    out = self.train(self.create_tempdir().full_path, train_steps=2, checkpoint_every_steps=0,
                     skip_eval=False)
    self.assertRegex(out, r"\ndone: 2 steps, eval top-1 0\.\d{4}(, \d+ images/s)?\n")

  def test_keep_checkpoints_holds_across_a_resume(self):
    """Catches a resumed run that never deletes the checkpoints of the runs
    before it (TensorFlow's manager keeps those it cannot date)."""
    model_dir = self.two_checkpoints()  # ckpt-4 and ckpt-8, from a run keeping 10
    self.train(model_dir, train_steps=20, keep_checkpoints=2)
    self.assertEqual(saved_steps(model_dir), [16, 20])
    os.remove(os.path.join(model_dir, "checkpoints", "checkpoint"))  # as a SIGKILL can leave it
    self.train(model_dir, train_steps=28, keep_checkpoints=2)
    self.assertEqual(saved_steps(model_dir), [24, 28])

  def test_a_signal_during_the_final_evaluation_stops_it_and_a_rerun_evaluates(self):
    """Catches a signal dropped until the evaluation is over (the run then
    ended with status 0, as if finished and evaluated)."""
    model_dir = self.create_tempdir().full_path
    evaluate_split = evaluation.Evaluator.evaluate

    def signalled_first(evaluator, *args, **kwargs):
      os.kill(os.getpid(), signal.SIGTERM)
      for _ in range(100):  # the stop request's thread sets the flag
        if bool(evaluator.trainer.stop_requested.numpy()):
          break
        time.sleep(0.05)
      counted.append(evaluate_split(evaluator, *args, **kwargs)["count"])
      return {"count": counted[-1]}

    counted = []
    with mock.patch.object(evaluation.Evaluator, "evaluate", signalled_first):
      with self.assertRaises(preemption.Preempted):
        self.train(model_dir, train_steps=4, skip_eval=False)
    self.assertEqual(counted, [0])  # stopped before its first batch, not after its last
    self.assertEqual(saved_steps(model_dir), [4])
    self.assertFalse(os.path.exists(os.path.join(model_dir, "summary.json")))
    out = self.train(model_dir, train_steps=4, skip_eval=False)
    self.assertIn("resuming from step 4", out)
    self.assertRegex(out, r"eval at step 4: .* over 359 examples")
    with open(os.path.join(model_dir, "summary.json")) as f:
      self.assertEqual(json.load(f)["eval_examples"], 359)

  def test_truncated_latest_checkpoint_falls_back_to_the_previous(self):
    model_dir = self.two_checkpoints()
    data_file = glob.glob(os.path.join(model_dir, "checkpoints", "ckpt-8.data-*"))[0]
    with open(data_file, "r+b") as f:
      f.truncate(os.path.getsize(data_file) // 2)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      out = self.train(model_dir, train_steps=12)
    self.assertIn("warning: cannot read checkpoint", out)
    # On stderr too, which a watcher reads for what went wrong (it was stdout only).
    self.assertRegex(err.getvalue(), r"(?m)^warning: cannot read checkpoint \S+ckpt-8 .*; "
                                     r"trying the one before$")
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
        ({"dtype": "fp16"}, r"was trained with --dtype=fp32; resuming with --dtype=fp16 would "
                            r"change its arithmetic"),
        ({"dtype": "bf16"}, r"was trained with --dtype=fp32; resuming with --dtype=bf16"),
        ({"model": "resnet20"}, r"^--model_dir=.* holds checkpoints of another model "
                                r"\(model resnet8 there, resnet20 here\)"),
        ({"global_batch_size": 16}, r"was trained at --global_batch_size=32; resuming at 16 "
                                    r"would move the data position and the learning rate")):
      with self.assertRaisesRegex(ConfigError, message, msg=str(changes)):
        self.train(model_dir, train_steps=12, **changes)
      self.assert_untouched(model_dir, before)

  def test_a_start_that_fails_on_its_initial_weights_writes_nothing(self):
    """Catches run.json and classes.json written before the weights are in:
    the corrected command, with another model, would then be refused as
    "another model" although no checkpoint was ever saved."""
    other = self.create_tempdir().full_path
    fixtures.make_run(other, model="resnet8")
    model_dir = os.path.join(self.create_tempdir().full_path, "run")
    with self.assertRaisesRegex(ConfigError, r"is not of this architecture"):
      self.train(model_dir, train_steps=2, init_checkpoint=other, model="resnet20")
    self.assertEqual(sorted(os.listdir(model_dir)) if os.path.exists(model_dir) else [], [])
    self.assertIn("done: 2 steps", self.train(model_dir, train_steps=2, model="resnet8"))

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
    held = run_lock.Lease(model_dir, "SLURM job 7")  # a live process's: this test's
    with open(lock, "w") as f:
      json.dump(held.record(), f)
    with self.assertRaisesRegex(ConfigError, r"^--model_dir=.* is in use by another run \(run "
                                             rf"SLURM job 7, host \S+, pid {os.getpid()}, "
                                             r"renewed \d+ s ago\); if it is gone, its lease "
                                             r"runs out in \d+ s, or delete "):
      self.train(model_dir)
    self.assertFalse(os.path.exists(os.path.join(model_dir, "checkpoints")))
    with open(lock, "w") as f:
      json.dump({**held.record(), "pid": _ended_pid()}, f)
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


class RunLockTest(absltest.TestCase):
  """The lock is a lease naming the run: a restart of the same run takes it
  from any host or container, another run is refused while the lease is
  fresh, and a lease nobody renews runs out. (Restarts as another host and
  as PID 1 of a new PID namespace, for real: tests/restart_test.py.)"""

  def holder(self, **changes):
    """A lock record of a live process on another host, renewed just now."""
    return {**run_lock.Lease("/unused", "SLURM job 7").record(), "host": "node-b",
            "pid_namespace": 1, "pid": 1, **changes}

  def reason(self, holder, run="SLURM job 7", now=None):
    me = run_lock.Lease("/unused", run).record()
    return run_lock.takeover_reason(holder, me, now or time.time(), run_lock.LEASE_SECONDS)

  def test_a_restart_of_the_same_run_takes_the_lock_from_any_host(self):
    self.assertRegex(self.reason(self.holder()), r"^an earlier start of the same run \(run "
                                                 r"SLURM job 7, host node-b, pid 1\)$")

  def test_another_run_is_refused_while_its_lease_is_fresh_and_not_after(self):
    holder = self.holder()
    self.assertIsNone(self.reason(holder, run="SLURM job 8"))
    self.assertIsNone(self.reason(holder, run=""))  # a run no scheduler names
    later = holder["renewed"] + run_lock.LEASE_SECONDS + 1
    self.assertRegex(self.reason(holder, run="SLURM job 8", now=later),
                     r"^a run whose lease ran out 1 s ago")

  def test_pid_1_of_another_container_on_this_host_is_not_taken_for_alive(self):
    # A restarted pod: same hostname, the trainer as PID 1, a new PID namespace.
    me = run_lock.Lease("/unused", "").record()
    holder = {**me, "pid": 1, "pid_namespace": me["pid_namespace"] + 1}
    self.assertIsNone(self.reason(holder, run=""))  # alive or not, it cannot tell: the lease
    self.assertRegex(self.reason({**holder, "pid_namespace": me["pid_namespace"],
                                  "pid": _ended_pid()}, run=""), r"^a run that is gone")

  def test_the_lease_is_renewed_while_the_run_lives_and_released_at_its_end(self):
    model_dir = self.create_tempdir().full_path
    lock = os.path.join(model_dir, run_lock.LOCK_FILE)
    lease = run_lock.Lease(model_dir, "run A", lease_seconds=0.4)
    with fixtures.quiet():
      lease.take()
      try:
        first = read_json(lock)["renewed"]
        time.sleep(0.5)
        self.assertGreater(read_json(lock)["renewed"], first)
      finally:
        lease.release()
    self.assertFalse(os.path.exists(lock))

  def test_a_lease_taken_over_meanwhile_is_left_to_its_new_holder_with_a_warning(self):
    model_dir = self.create_tempdir().full_path
    lock = os.path.join(model_dir, run_lock.LOCK_FILE)
    lease = run_lock.Lease(model_dir, "run A", lease_seconds=0.2)
    with fixtures.quiet() as out, mock.patch("sys.stderr") as err:
      lease.take()
      other = self.holder(run="run B")
      with open(lock, "w") as f:
        json.dump(other, f)
      time.sleep(0.3)
      lease.release()
    self.assertEqual(read_json(lock)["run"], "run B")  # neither renewed nor removed
    self.assertIn("warning: another run took over", out.getvalue())
    self.assertIn("warning: another run took over", str(err.write.call_args_list))


if __name__ == "__main__":
  absltest.main()
