"""Running the entrypoints as users do, from tests: `python -m launch.X ...`."""

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# As a user's shell: TensorFlow's log level left to the entrypoints (Bazel sets one for tests).
ENV = {**{k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
       "PYTHONPATH": ROOT}
if "TEST_TMPDIR" in os.environ:
  # What a killed process leaves in its temp dir (autograph's generated
  # sources, which it deletes at exit) stays in the test's own directory.
  ENV["TMPDIR"] = os.environ["TEST_TMPDIR"]


def digits_dir():
  """The embedded digits, prepared before any process of the target starts."""
  from tests import fixtures  # pylint: disable=g-import-not-at-top
  return fixtures.digits_dir()


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


def catches(pid, signum):
  """Whether process `pid` has a handler for signal `signum` (its SigCgt mask)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
  except (OSError, StopIteration):
    return False
  return bool(mask & (1 << (signum - 1)))


def wait_until_catches(process, signum, timeout=300):
  """Waits, without a fixed sleep, until a running process handles signum: a
  signal sent then reaches the handler, not the default action."""
  deadline = time.time() + timeout
  while not catches(process.pid, signum):
    if process.poll() is not None or time.time() > deadline:
      raise AssertionError(f"process {process.pid} never handled signal {signum} "
                           f"(exit status {process.poll()})")
    time.sleep(0.02)


def cpu_seconds(pid):
  """User and system CPU time process `pid` has used so far."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_cpu_seconds(process, seconds, timeout=300):
  """Waits until a running process has used `seconds` more CPU time: work
  done, whatever the machine's speed, rather than a fixed wall-clock sleep."""
  target, deadline = cpu_seconds(process.pid) + seconds, time.time() + timeout
  while cpu_seconds(process.pid) < target:
    if process.poll() is not None or time.time() > deadline:
      raise AssertionError(f"process {process.pid} ended or stalled before using {seconds} s "
                           f"of CPU (exit status {process.poll()})")
    time.sleep(0.05)


def pod_of(job):
  """(command, environment) of the container of launch.kubernetes's Job, as
  the manifest gives them to every pod (Kubernetes adds the index)."""
  from launch import kubernetes  # pylint: disable=g-import-not-at-top
  _, indexed_job = kubernetes.manifest(job)["items"]
  container, = indexed_job["spec"]["template"]["spec"]["containers"]
  return ([*container["command"], *container["args"]],
          {variable["name"]: variable["value"] for variable in container["env"]})
