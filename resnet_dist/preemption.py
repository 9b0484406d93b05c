"""Stopping on request: SIGTERM (a preempted VM, a scheduler), SIGINT
(Ctrl-C), SIGHUP (a dropped ssh session), or a GCE preemption or
maintenance notice (Notices).

A Python signal handler runs only when the main thread is back in the
interpreter, which during training is at the end of a host loop: up to
--steps_per_loop steps later, far beyond a preemption notice of 30 s. So
StopRequest also has the signal's number written to a pipe at once (Python's
wakeup fd, written by the C-level handler) and a watcher thread sets a
tf.Variable, which the train loop reads before every step. The replica step
shares the request with every worker inside the gradients' all-reduce, so all
of them stop after the same step, save together and exit.
"""

import os
import signal
import socket
import threading
import urllib.error
import urllib.request

import tensorflow as tf

# SIGHUP: the ssh session or terminal a run was started from went away; it
# would kill the run with nothing saved. A run under nohup ignores it still.
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Preempted(Exception):
  """A stop was requested; a checkpoint was saved at the step the run stopped at."""

  def __init__(self, step, reason):
    super().__init__(f"{reason}: saved a checkpoint at step {step}; run again to resume")
    self.step = step


# A GCE VM, each host of a TPU VM slice too, hears of its coming preemption
# (about 30 s ahead on Spot and preemptible VMs) or maintenance from its own
# metadata server. The keys and answers of GCE's documented metadata API.
METADATA_URL = "http://metadata.google.internal/computeMetadata/v1"
_PREEMPTED, _MAINTENANCE = "instance/preempted", "instance/maintenance-event"


def metadata_notice(url, timeout=2.0):
  """The notice this host's metadata server gives ("a preemption notice", "a
  maintenance notice (TERMINATE_ON_HOST_MAINTENANCE)"), or None: none, or no
  answer (a poll that fails is tried again at the next)."""
  for key in (_PREEMPTED, _MAINTENANCE):
    request = urllib.request.Request(f"{url}/{key}", headers={"Metadata-Flavor": "Google"})
    try:
      with urllib.request.urlopen(request, timeout=timeout) as answer:
        value = answer.read().decode(errors="replace").strip()
    except (OSError, urllib.error.URLError, ValueError):
      continue
    if key == _PREEMPTED and value == "TRUE":
      return "a preemption notice"
    if key == _MAINTENANCE and value not in ("", "NONE"):
      return f"a maintenance notice ({value})"
  return None


class Notices:
  """Where a run hears of a coming preemption or maintenance: this host's
  metadata server (metadata_url; "" not asked) and, in notices_dir, the
  notices that other hosts' relays (launch/notices.py) leave there, one file
  a host, so that any host's notice stops the whole run."""

  def __init__(self, metadata_url, notices_dir, interval=5.0):
    self.metadata_url, self.notices_dir, self.interval = metadata_url, notices_dir, interval

  def host_notice(self):
    """This host's notice, naming the host, or None."""
    notice = metadata_notice(self.metadata_url) if self.metadata_url else None
    return notice and f"{notice} for {socket.gethostname()}"

  def poll(self):
    """The first notice found, as a reason to stop, or None."""
    own = self.host_notice()
    if own:
      return own
    try:
      left = sorted(tf.io.gfile.glob(os.path.join(self.notices_dir, "*")))
      if left:
        with tf.io.gfile.GFile(left[0]) as f:
          return f.read().strip() or f"a notice from {os.path.basename(left[0])}"
    except tf.errors.OpError:
      pass  # a store that does not answer now: asked again at the next poll
    return None

  def clear(self):
    """Removes the notices of an earlier run, which a resumed one must not obey."""
    if tf.io.gfile.isdir(self.notices_dir):
      tf.io.gfile.rmtree(self.notices_dir)

  def leave(self, reason):
    """A relay's notice for the run to find."""
    tf.io.gfile.makedirs(self.notices_dir)
    with tf.io.gfile.GFile(os.path.join(self.notices_dir, socket.gethostname()), "w") as f:
      f.write(reason)


class StopRequest:
  """Sets `variable` to True as soon as SIGTERM or SIGINT arrives, or
  `notices` (a Notices) has one.

  Use as a context manager around the host loop; outside the main thread
  (where Python cannot install handlers) it does nothing.
  """

  def __init__(self, variable, notices=None, on_stop=lambda reason: None):
    self.variable = variable
    self.notices = notices
    self.on_stop = on_stop  # told the reason at once (the watchdog's grace starts)
    self.reason = None  # the first signal this process received, or a notice
    self._previous_handlers = {}
    self._previous_fd = None
    self._pipe = None
    self._watcher = None
    self._closed = threading.Event()

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    if self.notices is not None:
      threading.Thread(target=self._listen, name="notices", daemon=True).start()
    self._pipe = os.pipe()
    os.set_blocking(self._pipe[1], False)
    self._previous_fd = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
    self._previous_handlers = {s: signal.signal(s, self._note) for s in SIGNALS
                               if signal.getsignal(s) != signal.SIG_IGN}
    self._watcher = threading.Thread(target=self._watch, name="stop-request", daemon=True)
    self._watcher.start()
    return self

  def _note(self, signum, frame):
    """The Python-level handler: it only has to keep the default one away."""
    del signum, frame

  def _watch(self):
    while True:
      received = os.read(self._pipe[0], 64)
      if not received:  # __exit__ closed the pipe
        return
      ours = [n for n in received if n in {int(s) for s in SIGNALS}]
      if ours:
        self._stop(signal.Signals(ours[0]).name)

  def _listen(self):
    """Polls the notices until one comes or the loop is over; not joined at
    the end (a poll may wait on a server), so the process exits at once."""
    while not self._closed.wait(self.notices.interval):
      reason = self.notices.poll()
      if reason:
        self._stop(reason)
        return

  def _stop(self, reason):
    if self.reason is None:
      self.reason = reason
    self.on_stop(reason)
    self.variable.assign(True)

  @property
  def requested_here(self):
    return self.reason is not None

  def __exit__(self, *exc):
    self._closed.set()
    if self._pipe is None:
      return
    for number, handler in self._previous_handlers.items():
      signal.signal(number, handler)
    signal.set_wakeup_fd(self._previous_fd)
    os.close(self._pipe[1])
    self._watcher.join()
    os.close(self._pipe[0])
    self._pipe = None
