"""Interrupted processes: a SIGKILLed run resumes bit-exactly, and SIGTERM
stops a run from inside a host loop, saves and exits 75, within seconds, as
does a GCE preemption or maintenance notice (from a stand-in metadata server
on 127.0.0.1), this host's or another's through launch.notices.

(That a stop resumes exactly with every recipe flag, on one device and over
replicas, is tests/resume_test.py, in-process; these are what only a process
shows: a kill that leaves what it leaves, a real signal.)
"""

import http.server
import os
import signal
import socket
import threading
import time

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
import numpy as np
import tensorflow as tf
from absl.testing import absltest

from resnet_dist import preemption
from tests import fixtures, launching

COMMON = ["--model=resnet8", "--dataset=digits", "--global_batch_size=32",
          "--train_steps=16", "--steps_per_loop=2", "--checkpoint_every_steps=4",
          "--deterministic", "--seed=5", "--skip_eval", "--base_learning_rate=0.4",
          "--keep_checkpoints=10"]
# Every recipe flag: each of their random draws must replay exactly on
# resume. The training size grows to 64 at step 13, after the kill.
RECIPE = ["--ema_decay=0.9", "--ema_every_steps=2", "--mixup_alpha=0.2", "--cutmix_alpha=1.0",
          "--augment=trivialaugment_wide", "--random_erasing=0.25", "--label_smoothing=0.1",
          "--progressive_resize=32:64:0.2:0.35", "--grad_accum_steps=2", "--optimizer=lamb",
          "--loss=bce", "--base_learning_rate=0.01"]


def variables(model_dir):
  reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints"))
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if not k.startswith(("_CHECKPOINTABLE", "save_counter"))}


def registered_step(model_dir):
  """The step of the latest checkpoint the manager has registered, or 0."""
  latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
  return int(latest.rsplit("-", 1)[1]) if latest else 0


class SigkillTest(absltest.TestCase):

  def test_sigkill_then_resume_is_bit_exact(self):
    """A kill leaves the last complete checkpoint; the rerun resumes there and
    ends bit-identical to a run never killed, with every recipe flag (one
    device: their steps trace once per replica)."""
    data_dir = launching.digits_dir()
    args = lambda model_dir: [*COMMON, "--strategy=one_device", *RECIPE,
                              f"--model_dir={model_dir}", f"--data_dir={data_dir}"]
    model_dir = self.create_tempdir().full_path
    process = launching.start("launch.train", *args(model_dir))
    deadline = time.time() + 300
    while not registered_step(model_dir) and process.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=300)
    self.assertEqual(process.returncode, -signal.SIGKILL)
    killed_at = registered_step(model_dir)
    self.assertLess(killed_at, 16, "the run finished before the kill; nothing was tested")
    result = launching.run_train(*args(model_dir))
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn(f"resuming from step {killed_at}", result.stdout)
    self.assertIn("training images are 64x64 from step 13", result.stdout)
    reference_dir = self.create_tempdir().full_path
    reference = launching.run_train(*args(reference_dir))
    self.assertEqual(reference.returncode, 0, reference.stderr[-3000:])
    expected, resumed = variables(reference_dir), variables(model_dir)
    self.assertTrue(any(key.startswith("ema/") for key in expected))
    self.assertEqual(sorted(expected), sorted(resumed))
    for key in expected:
      np.testing.assert_array_equal(expected[key], resumed[key], err_msg=key)


class SigtermTest(absltest.TestCase):

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


class StuckReadTest(absltest.TestCase):

  def test_sigterm_while_a_read_never_returns_exits_75_within_the_grace(self):
    """The images turn into FIFOs mid-run (a stalled mount): the loop waits
    on its input inside TensorFlow, where it never reads the stop request.
    The signal was ignored until SIGKILL, the lock left behind."""
    root = self.create_tempdir().full_path
    data_dir, model_dir = os.path.join(root, "images"), os.path.join(root, "run")
    fixtures.make_image_folder(data_dir)
    bound = 30  # the progress bound: a stop is waited for half of it
    process = launching.start(
        "launch.train", "--model=resnet8", f"--dataset=folder:{data_dir}", "--image_size=32",
        "--global_batch_size=8", "--train_steps=100000", "--steps_per_loop=2",
        "--checkpoint_every_steps=4", "--skip_eval", "--strategy=one_device",
        f"--model_dir={model_dir}", f"--progress_timeout_seconds={bound}")
    deadline = time.time() + 300
    while registered_step(model_dir) < 4 and process.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    fixtures.images_to_fifos(data_dir)
    # Until the prefetched batches run out the loop still steps; then it waits, idle.
    idle_since, used = time.time(), launching.cpu_seconds(process.pid)
    while time.time() - idle_since < 3 and process.poll() is None:
      time.sleep(0.2)
      if launching.cpu_seconds(process.pid) > used + 0.1:
        idle_since, used = time.time(), launching.cpu_seconds(process.pid)
    process.send_signal(signal.SIGTERM)
    signalled = time.time()
    out, err = process.communicate(timeout=300)
    lasted = time.time() - signalled
    print(f"exited {lasted:.0f} s after SIGTERM (grace {bound // 2} s)")
    self.assertEqual(process.returncode, 75, err[-3000:])
    self.assertRegex(err, r"(?m)^error: SIGTERM, but the run did not reach the end of a step "
                          rf"within {bound // 2} s \(in training steps \d+ to \d+; .*\); "
                          r"exiting without a new checkpoint: run again to resume from the "
                          r"last one$")
    self.assertLess(lasted, bound)  # before the stall's own exit (70)
    self.assertFalse(os.path.exists(os.path.join(model_dir, "training.lock")))
    self.assertGreaterEqual(registered_step(model_dir), 4)


class FakeMetadataServer:
  """A stand-in for GCE's metadata server on 127.0.0.1 (GCE's own cannot run
  here): answers `answers` ({key under computeMetadata/v1: value}) only to
  requests with the Metadata-Flavor header, as GCE's does, 404 otherwise."""

  def __init__(self, answers):
    asked = self.asked = []

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_GET(self):  # pylint: disable=invalid-name
        key = self.path.split("?")[0].removeprefix("/computeMetadata/v1/")
        asked.append(key)
        flavoured = self.headers.get("Metadata-Flavor") == "Google"
        body = answers.get(key) if flavoured else None
        self.send_response(200 if body is not None else (404 if flavoured else 403))
        self.end_headers()
        self.wfile.write((body or "").encode())

      def log_message(self, *args):
        del args

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=self.server.serve_forever, daemon=True).start()
    self.url = f"http://127.0.0.1:{self.server.server_port}/computeMetadata/v1"

  def close(self):
    self.server.shutdown()
    self.server.server_close()


class NoticeTest(absltest.TestCase):
  ARGS = ["--flagfile=launch/configs/digits.cfg", "--train_epochs=1000",
          "--steps_per_loop=100000", "--checkpoint_every_steps=100000"]

  def metadata(self, answers):
    server = FakeMetadataServer(answers)
    self.addCleanup(server.close)
    return server

  def assert_saved_and_exited_75(self, process, model_dir, reason):
    out, err = process.communicate(timeout=300)
    self.assertEqual(process.returncode, 75, err[-3000:])
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    self.assertIsNotNone(latest)
    step = int(latest.rsplit("-", 1)[1])
    self.assertIn(f"{reason}: saved a checkpoint at step {step}; run again to resume", out)

  def test_this_hosts_preemption_notice_saves_and_exits_75(self):
    server = self.metadata({"instance/preempted": "TRUE",
                            "instance/maintenance-event": "NONE"})
    model_dir = self.create_tempdir().full_path
    process = launching.start("launch.train", *self.ARGS, f"--gce_metadata={server.url}",
                              f"--model_dir={model_dir}", f"--data_dir={model_dir}/data")
    self.assert_saved_and_exited_75(process, model_dir,
                                    f"a preemption notice for {socket.gethostname()}")
    self.assertIn("instance/preempted", server.asked)

  def test_another_hosts_maintenance_notice_reaches_the_run_through_its_model_dir(self):
    """The relay (launch.notices, a process, as on each host of a slice)
    leaves its host's notice where the run's own poll finds it; from there
    the stop is the path the test above runs. A notice of an earlier run is
    cleared at start, not obeyed."""
    other = self.metadata({"instance/preempted": "FALSE",
                           "instance/maintenance-event": "TERMINATE_ON_HOST_MAINTENANCE"})
    model_dir = self.create_tempdir().full_path
    quiet = self.metadata({"instance/preempted": "FALSE", "instance/maintenance-event": "NONE"})
    run_watch = preemption.Notices(quiet.url, f"{model_dir}/notices")
    run_watch.leave("a notice of an earlier run")
    run_watch.clear()
    self.assertIsNone(run_watch.poll())
    relay = launching.run("launch.notices", f"--model_dir={model_dir}",
                          f"--gce_metadata={other.url}", "--notice_poll_seconds=0.2")
    reason = (f"a maintenance notice (TERMINATE_ON_HOST_MAINTENANCE) for "
              f"{socket.gethostname()}")
    self.assertEqual(relay.returncode, 0, relay.stderr[-2000:])
    self.assertEqual(relay.stdout.strip(), f"{reason}: left in {model_dir}/notices")
    self.assertEqual(run_watch.poll(), reason)
    stop = tf.Variable(False)
    with preemption.StopRequest(stop, preemption.Notices(quiet.url, run_watch.notices_dir,
                                                         interval=0.05)) as request:
      deadline = time.time() + 30
      while not bool(stop.numpy()) and time.time() < deadline:
        time.sleep(0.05)
    self.assertEqual(request.reason, reason)


if __name__ == "__main__":
  absltest.main()
