"""Stopping on request: SIGTERM (a preempted VM, a scheduler) or SIGINT (Ctrl-C).

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
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """A stop was requested; a checkpoint was saved at the step the run stopped at."""

  def __init__(self, step, reason):
    super().__init__(f"{reason}: saved a checkpoint at step {step}; run again to resume")
    self.step = step


class StopRequest:
  """Sets `variable` to True as soon as SIGTERM or SIGINT arrives.

  Use as a context manager around the host loop; outside the main thread
  (where Python cannot install handlers) it does nothing.
  """

  def __init__(self, variable):
    self.variable = variable
    self.signal_name = None  # of the first signal this process received
    self._previous_handlers = {}
    self._previous_fd = None
    self._pipe = None
    self._watcher = None

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    self._pipe = os.pipe()
    os.set_blocking(self._pipe[1], False)
    self._previous_fd = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
    self._previous_handlers = {s: signal.signal(s, self._note) for s in SIGNALS}
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
        if self.signal_name is None:
          self.signal_name = signal.Signals(ours[0]).name
        self.variable.assign(True)

  @property
  def requested_here(self):
    return self.signal_name is not None

  def __exit__(self, *exc):
    if self._pipe is None:
      return
    for number, handler in self._previous_handlers.items():
      signal.signal(number, handler)
    signal.set_wakeup_fd(self._previous_fd)
    os.close(self._pipe[1])
    self._watcher.join()
    os.close(self._pipe[0])
    self._pipe = None
