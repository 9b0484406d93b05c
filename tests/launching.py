"""Running the entrypoints as users do, from tests: `python -m launch.X ...`."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# As a user's shell: TensorFlow's log level left to the entrypoints (Bazel sets one for tests).
ENV = {**{k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
       "PYTHONPATH": ROOT}
if "TEST_TMPDIR" in os.environ:
  # What a killed process leaves in its temp dir (autograph's generated
  # sources, which it deletes at exit) stays in the test's own directory.
  ENV["TMPDIR"] = os.environ["TEST_TMPDIR"]


def digits_dir():
  """The embedded digits, prepared once per test target in its temp dir, where
  every run and worker process of its tests reads them."""
  from absl.testing import absltest  # pylint: disable=g-import-not-at-top
  from resnet_dist.data import sources  # pylint: disable=g-import-not-at-top
  path = os.path.join(absltest.get_default_test_tmpdir(), "data")
  sources.tfds_source("digits", path)
  return path


def command(module, *args):
  return [sys.executable, "-m", module, *args]


def run(module, *args, timeout=600):
  """Runs launch.<module> to completion; a CompletedProcess with text output."""
  return subprocess.run(command(module, *args), cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=timeout)


def start(module, *args):
  """Starts launch.<module>; a Popen with text pipes."""
  return subprocess.Popen(command(module, *args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def run_train(*args, timeout=600):
  return run("launch.train", *args, timeout=timeout)
