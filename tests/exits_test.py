"""launch/exits.py: the exit status and the one line each failure gets."""

import ast
import contextlib
import glob
import io
import os

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

  def test_a_bug_keeps_its_traceback(self):
    with self.assertRaises(TypeError):
      self.fail(TypeError("a bug"))

  def test_statuses_are_distinct(self):
    statuses = [exits.OK, exits.USAGE, exits.NONFINITE, exits.WORKER_LOST, exits.STORAGE,
                exits.PREEMPTED, exits.INTERRUPTED]
    self.assertLen(set(statuses), len(statuses))


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
