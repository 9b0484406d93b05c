"""The progress watchdog: a run stuck where no signal and no heartbeat reach it
ends, with one line, so that its launcher restarts it.

What it catches: a peer alive but stuck (a hung NCCL call or collective;
TensorFlow's collective timeouts are off, see strategy.py, and the
coordination service's heartbeats come from a thread of their own, which a
stuck step does not stop), and a read that never returns (a stalled NFS or
FUSE mount, a FIFO among the images). In either the main thread waits inside
TensorFlow, where Python runs nothing; so this thread watches the host
loop's progress (Watchdog.progress, called between its loops, saves and
evaluations) and ends the process itself:

- no progress for timeout_seconds: one line naming what the run was doing,
  and exit status STALLED. Every task of a stuck run has the same bound from
  about the same last progress, so each ends this way.
- a stop request (SIGTERM, SIGINT, SIGHUP, a notice) that the loop has not
  reached within STOP_GRACE_SECONDS (or half the bound, if shorter): the loop
  cannot save, so the process exits with the stop's status (75), its last
  checkpoint being what a restart resumes from.
"""

import os
import sys
import threading
import time

STALLED = 70  # EX_SOFTWARE: no progress within the bound; run again to resume
PREEMPTED = 75  # the status of a stop (launch/exits.py), here without a new save
STOP_GRACE_SECONDS = 60.0


def open_files_under(directory):
  """The files under a local directory this process has open: what its input
  reads now ([] where /proc or the directory is not local)."""
  if not directory or "://" in directory:
    return []
  root = os.path.realpath(directory) + os.sep
  found = []
  try:
    for fd in os.listdir("/proc/self/fd"):
      try:
        target = os.readlink(f"/proc/self/fd/{fd}")
      except OSError:
        continue
      if target.startswith(root):
        found.append(target)
  except OSError:
    return []
  return sorted(set(found))


class Watchdog:
  """Use as a context manager around the host loop; timeout_seconds 0 turns
  the progress bound off (a stop request is still watched).

  describe(): what the run waits on, for the line (e.g. the input files it
  has open); before_exit(): what must not outlive the process (its run lock).
  """

  def __init__(self, timeout_seconds, describe=lambda: "", before_exit=lambda: None,
               poll_seconds=None):
    self.timeout = timeout_seconds
    self.describe, self.before_exit = describe, before_exit
    # After a stop request a loop is waited for half the bound at most: it
    # has then shown no progress for that long after being asked to stop.
    self.stop_grace = min(STOP_GRACE_SECONDS, (timeout_seconds or 2 * STOP_GRACE_SECONDS) / 2)
    self.poll = poll_seconds or min(1.0, self.stop_grace / 10)
    self._lock = threading.Lock()
    self._since = time.monotonic()
    self._doing = "starting"
    self._stop_at = None
    self._stop_reason = None
    self._closed = threading.Event()
    self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

  def progress(self, doing):
    """The loop made progress and now starts `doing` ("training steps 10 to 20")."""
    with self._lock:
      self._since, self._doing = time.monotonic(), doing

  def stop_requested(self, reason):
    with self._lock:
      if self._stop_at is None:
        self._stop_at, self._stop_reason = time.monotonic(), reason

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._closed.set()
    self._thread.join()

  def _run(self):
    while not self._closed.wait(self.poll):
      with self._lock:
        now, since, doing = time.monotonic(), self._since, self._doing
        stop_at, reason = self._stop_at, self._stop_reason
      if stop_at is not None and since < stop_at and now - stop_at > self.stop_grace:
        self._end(PREEMPTED, f"{reason}, but the run did not reach the end of a step within "
                  f"{self.stop_grace:.0f} s ({doing}{self._waiting_on()}); exiting without a "
                  f"new checkpoint: run again to resume from the last one")
      if self.timeout and now - since > self.timeout:
        self._end(STALLED, f"no progress for {self.timeout:.0f} s ({doing}{self._waiting_on()}); "
                  f"ending this task (status {STALLED}): start every task again to resume "
                  f"from the last checkpoint")

  def _waiting_on(self):
    try:
      what = self.describe()
    except Exception as e:  # pylint: disable=broad-except  # the line matters more
      what = f"cannot tell what it waits on: {e}"
    return f"; {what}" if what else ""

  def _end(self, status, message):
    if not self._closed.is_set():  # the loop ended meanwhile: nothing is stuck
      end_process(status, message, self.before_exit)


def end_process(status, message, before_exit):
  """Ends this process from a thread of its own, with its one line: the way
  out where the main thread waits inside TensorFlow, which no exception
  reaches. before_exit(): what must not outlive the process (its run lock)."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  before_exit()
  os._exit(status)  # pylint: disable=protected-access
