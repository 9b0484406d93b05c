"""How the entrypoints end: exit statuses, the one-line error, a prompt exit.

Import it before TensorFlow: prompt() registers its exit handler first, so it
runs last, after every other one (autograph's temp-file cleanup among them).
"""

import atexit
import functools
import os
import sys

OK = 0
USAGE = 2         # bad flags, data or checkpoints: one line on stderr, nothing lost
NONFINITE = 3     # a non-finite loss or weights; the last good checkpoint is kept
WORKER_LOST = 69  # EX_UNAVAILABLE: another worker of a multi-worker run died
PREEMPTED = 75    # EX_TEMPFAIL: stopped by SIGTERM or SIGINT after saving; run again
INTERRUPTED = 130  # the shell's status for SIGINT: interrupted outside training steps

_finished = []  # the status main() returned, once it has


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
