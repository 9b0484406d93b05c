"""How the entrypoints end: exit statuses, the one-line error, a prompt exit.

Import it before TensorFlow: prompt() registers its exit handler first, so it
runs last, after every other one (autograph's temp-file cleanup among them).
"""

import atexit
import contextlib
import functools
import os
import sys

OK = 0
USAGE = 2         # bad flags, data or checkpoints: one line on stderr, nothing lost
NONFINITE = 3     # a non-finite loss or weights; the last good checkpoint is kept
WORKER_LOST = 69  # EX_UNAVAILABLE: another worker of a multi-worker run died
STORAGE = 74      # EX_IOERR: a file could not be written (full disk, read-only dir)
PREEMPTED = 75    # EX_TEMPFAIL: stopped by SIGTERM or SIGINT after saving; run again
INTERRUPTED = 130  # the shell's status for SIGINT: interrupted outside training steps

_finished = []  # the status main() returned, once it has


@contextlib.contextmanager
def quiet_start():
  """Keeps TensorFlow's native log lines off a healthy run's console.

  Loading TensorFlow writes lines straight to stderr (CUDA probing, oneDNN,
  "All log messages before absl::InitializeLog()") before any setting is read,
  so stderr is closed while it loads; TF_CPP_MIN_LOG_LEVEL=3 then keeps the
  later ones (a failed cuInit on a machine without GPUs) quiet. Errors still
  reach the user as exceptions. Setting TF_CPP_MIN_LOG_LEVEL yourself (0
  shows everything) brings all of them back.
  """
  if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
    yield
    return
  os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def error(message):
  """The one line a user reads on stderr when an entrypoint fails."""
  print(f"error: {message}", file=sys.stderr, flush=True)


def prompt(main):
  """Wraps an absl main() so the process ends as soon as main() has returned.

  After main() every file is written and closed; what remains is Python's
  final garbage collection, in which TensorFlow 2.21's tf.data iterators (the
  per-device ones tf.distribute builds) can wait up to a minute for their
  autotuning threads. So, once the other exit handlers have run, the process
  ends without that collection. A main() that raised takes Python's usual
  way out, traceback included.
  """
  @functools.wraps(main)
  def wrapped(argv):
    status = main(argv)
    _finished.append(status)
    return status

  return wrapped


@atexit.register
def _end_without_final_collection():
  if _finished:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_finished[0] or 0)  # pylint: disable=protected-access
