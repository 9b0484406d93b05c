"""launch/exits.py: the exit status and the one line each failure gets."""

import ast
import contextlib
import glob
import io
import os
import signal
import time

from launch import exits  # pylint: disable=g-bad-import-order  # first, as the entrypoints do
import tensorflow as tf
from absl.testing import absltest

from resnet_dist import preemption
from resnet_dist.errors import ConfigError, DataError, StorageError

# What TensorFlow's coordination service says when worker 1 misses its heartbeats.
UNHEALTHY = ("Collective ops is aborted by: The following tasks are unhealthy (stopped "
             "sending heartbeats):\n/job:worker/replica:0/task:1\nThe collective ops will "
             "retry")


class FailTest(absltest.TestCase):

  def fail(self, exception):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
      status = exits.fail(exception)
    return status, stderr.getvalue()

  def test_each_failure_has_its_status_and_one_line(self):
    cases = [
        (ConfigError("--model_dir=x is not writable"), exits.USAGE,
         "error: --model_dir=x is not writable\n"),
        (DataError("label 12 is outside 0..9: record 7 of f"), exits.USAGE,
         "error: label 12 is outside 0..9: record 7 of f\n"),
        (FloatingPointError("non-finite training loss at step 9; no checkpoint was saved "
                            "before it"), exits.NONFINITE,
         "error: non-finite training loss at step 9; no checkpoint was saved before it\n"),
        (StorageError("cannot save the checkpoint of step 8"), exits.STORAGE,
         "error: cannot save the checkpoint of step 8\n"),
        (KeyboardInterrupt(), exits.INTERRUPTED,
         "error: interrupted (SIGINT) outside training steps; nothing new was saved\n"),
        (tf.errors.UnavailableError(None, None, UNHEALTHY), exits.WORKER_LOST,
         "error: worker 1 stopped responding; start every worker again to resume from the "
         "last checkpoint\n"),
        (preemption.Preempted(8, "SIGTERM"), exits.PREEMPTED, ""),
    ]
    for exception, status, line in cases:
      self.assertEqual(self.fail(exception), (status, line), repr(exception))

  def test_the_lost_worker_named_is_never_this_one(self):
    """A collective whose peer's socket closed names both ends: the peer
    (the remote target) and, where this task called it, this task."""
    message = ("Socket closed\nAdditional GRPC error information from remote target "
               "/job:worker/replica:0/task:0 while calling /tensorflow.WorkerService/RecvBuf "
               "for /job:worker/replica:0/task:1")
    self.assertEqual(exits.lost_workers(message, own="worker 1"), ["worker 0"])
    self.assertEqual(exits.lost_workers(UNHEALTHY, own="worker 0"), ["worker 1"])

  def test_a_bug_keeps_its_traceback(self):
    with self.assertRaises(TypeError):
      self.fail(TypeError("a bug"))

  def test_statuses_are_distinct(self):
    statuses = [exits.OK, exits.USAGE, exits.NONFINITE, exits.WORKER_LOST, exits.STALLED,
                exits.STORAGE, exits.PREEMPTED, exits.INTERRUPTED]
    self.assertLen(set(statuses), len(statuses))

  def test_a_flag_file_that_cannot_be_opened_is_one_plain_line(self):
    """absl words it "ERROR:: Unable to open flagfile", which read "error: ERROR::"."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), self.assertRaises(SystemExit) as ended:
      exits.parse_flags(["train", "--flagfile=/no/such.cfg"])
    self.assertEqual(ended.exception.code, exits.USAGE)
    self.assertEqual(stderr.getvalue(), "error: Unable to open flagfile: [Errno 2] No such file "
                                        "or directory: '/no/such.cfg'\n")


class StopRequestTest(absltest.TestCase):

  def test_sighup_asks_the_run_to_stop_and_save_unless_nohup_ignores_it(self):
    """An ssh session that drops sends SIGHUP: it killed the run at once,
    nothing saved, the lock left behind (in this process, the test's)."""
    stop = tf.Variable(False)
    with preemption.StopRequest(stop) as request:
      os.kill(os.getpid(), signal.SIGHUP)
      deadline = time.time() + 10
      while not bool(stop.numpy()) and time.time() < deadline:
        time.sleep(0.01)
    self.assertTrue(bool(stop.numpy()))
    self.assertEqual(request.reason, "SIGHUP")
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
    try:
      with preemption.StopRequest(tf.Variable(False)):
        self.assertEqual(signal.getsignal(signal.SIGHUP), signal.SIG_IGN)
    finally:
      signal.signal(signal.SIGHUP, previous)


class EntrypointTest(absltest.TestCase):

  def test_every_entrypoint_parses_its_flags_with_the_one_line_parser(self):
    """Catches an entrypoint left on absl's own parser, whose bad flag is a
    two-line 'FATAL Flags parsing error' and exit 1 (launch_test runs one)."""
    launch = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
    runs = {}
    for path in sorted(glob.glob(os.path.join(launch, "*.py"))):
      with open(path) as f:
        tree = ast.parse(f.read())
      for call in ast.walk(tree):
        if isinstance(call, ast.Call) and ast.unparse(call.func) == "app.run":
          runs[os.path.basename(path)] = {k.arg: ast.unparse(k.value) for k in call.keywords}
    self.assertGreaterEqual(len(runs), 7, sorted(runs))  # train, evaluate, export, ...
    for name, keywords in runs.items():
      self.assertEqual(keywords.get("flags_parser"), "exits.parse_flags", name)


if __name__ == "__main__":
  absltest.main()
