"""How the entrypoints start and end: exit statuses, the one-line error, a
quiet start, a private temp dir, a prompt exit.

Import it first, before TensorFlow: its exit handler is then registered first
and runs last, after every other one (autograph's temp-file cleanup among
them), and a Ctrl-C while TensorFlow loads is already one line.
"""

import atexit
import contextlib
import functools
import glob
import os
import re
import shutil
import signal
import sys
import tempfile

from resnet_dist import processes, watchdog

OK = 0
USAGE = 2         # bad flags, data or checkpoints: one line on stderr, nothing lost
NONFINITE = 3     # a non-finite loss or weights; the last good checkpoint is kept
WORKER_LOST = 69  # EX_UNAVAILABLE: another worker of a multi-worker run died
STALLED = watchdog.STALLED  # 70: no progress for --progress_timeout_seconds; run again
STORAGE = 74      # EX_IOERR: a file could not be written (full disk, read-only dir)
PREEMPTED = 75    # EX_TEMPFAIL: stopped by SIGTERM, SIGINT or SIGHUP after saving; run again
INTERRUPTED = 130  # the shell's status for SIGINT: interrupted outside training steps

_finished = []  # the status main() returned, once it has
_console = [2]  # the fd of the user's stderr, also while quiet_start() hides fd 2


@contextlib.contextmanager
def quiet_start():
  """Starts an entrypoint: this task's GPUs claimed before TensorFlow loads,
  and TensorFlow's native log lines kept off a healthy run's console.

  TensorFlow's GPUs are fixed the first time it lists them, and it lists
  them before main() runs (its tf.distribute test helpers, which `import
  tensorflow` loads, do so as absl's app.run starts): a task of several on
  a node whose GPUs it shares takes its share (cluster.claim_local_gpus)
  before that, here.

  Loading TensorFlow writes lines straight to stderr (CUDA probing, oneDNN,
  "All log messages before absl::InitializeLog()") before any setting is
  read, so stderr is closed while it loads and while it first lists the GPUs
  (on a host without any, CUDA's failed start is logged as an error). After
  that TF_CPP_MIN_LOG_LEVEL=3 keeps a lone process quiet: its errors reach
  the user as exceptions. A task of several, or a TPU's client, gets 2
  instead: the errors that explain why a task died (the coordination
  service's lost heartbeats, aborted collectives, NCCL's and the TPU
  runtime's) are logged by threads of TensorFlow's own, never raised where
  we could print them; a healthy run logs no error. Setting
  TF_CPP_MIN_LOG_LEVEL yourself (0 shows everything) brings all of them back.
  """
  cluster = _cluster_of_environment()
  if cluster is not None:
    from resnet_dist import cluster as cluster_lib  # pylint: disable=g-import-not-at-top
    cluster_lib.claim_local_gpus(cluster)
  if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
    yield
    return
  os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2" if _shows_runtime_errors(cluster) else "3"
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  _console[0] = saved
  try:
    yield
    if "tensorflow" in sys.modules:
      sys.modules["tensorflow"].config.list_physical_devices("GPU")
  finally:
    _console[0] = 2
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def _cluster_of_environment():
  """The cluster this process's environment names (cluster.from_environment),
  or None; one that is malformed is said in one line once the flags are read."""
  from resnet_dist import cluster  # pylint: disable=g-import-not-at-top  # light: no TensorFlow
  from resnet_dist.errors import ConfigError  # pylint: disable=g-import-not-at-top
  try:
    return cluster.from_environment()
  except ConfigError:
    return None


def _shows_runtime_errors(cluster):
  """Whether this process is one task of several or may drive a TPU, whose
  runtimes log the errors that end a run (quiet_start)."""
  from resnet_dist import cluster as cluster_lib  # pylint: disable=g-import-not-at-top
  return cluster_lib.is_multi_task(cluster) or cluster_lib.tpu_attached()


def error(message):
  """The one line a user reads on stderr when an entrypoint fails."""
  print(f"error: {message}", file=sys.stderr, flush=True)


_HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")


def parse_flags(argv):
  """absl's flag parser (app.run's flags_parser), with any flag error as the
  one line on stderr and exit status 2.

  absl exits with status 1 after printing help; asking for help is no error
  (`bazel run` would report it as one), so that exit becomes 0.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # absl words some of its errors "ERROR:: ..." (a flag file it cannot open).
    error(re.sub(r"^ERROR::\s*", "", str(e)))
    sys.exit(USAGE)
  except SystemExit:
    if any(arg.lstrip("-").split("=")[0] in _HELP_FLAGS for arg in argv[1:]):
      sys.exit(OK)
    raise


def lost_workers(message, own=None):
  """The tasks an UnavailableError's message says stopped answering:
  TensorFlow's coordination service aborts every collective when a task
  misses its heartbeats, and a collective whose peer's socket closed names
  that peer. own: this task ("worker 1"), which the message may name too
  (the caller of a remote call) and which is never the one lost."""
  unhealthy = message.split("unhealthy", 1)[-1]
  named = [f"{job} {task}" for job, task in re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)",
                                                       unhealthy)]
  return [task for task in dict.fromkeys(named) if task != own]


def _own_task():
  """This process's task, "worker 1", as its environment names it; None alone."""
  cluster = _cluster_of_environment()
  return f"{cluster.task_type} {cluster.task_index}" if cluster else None


def fail(exception):
  """Prints the one line for an exception that ends an entrypoint and returns
  its exit status. An exception that is no user's problem (a bug) propagates,
  traceback and all."""
  # Imported here: exits itself is imported before TensorFlow.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from resnet_dist import preemption  # pylint: disable=g-import-not-at-top
  from resnet_dist.errors import ConfigError, StorageError  # pylint: disable=g-import-not-at-top
  if isinstance(exception, preemption.Preempted):
    return PREEMPTED  # the host loop has said what it saved
  if isinstance(exception, KeyboardInterrupt):
    # Outside the training steps; inside them a SIGINT saves and stops (75).
    error("interrupted (SIGINT) outside training steps; nothing new was saved")
    return INTERRUPTED
  if isinstance(exception, tf.errors.UnavailableError):
    lost = lost_workers(exception.message, _own_task())
    error(f"{', '.join(lost) or 'another worker'} stopped responding; start every worker "
          f"again to resume from the last checkpoint")
    return WORKER_LOST
  for kind, status in ((ConfigError, USAGE), (FloatingPointError, NONFINITE),
                       (StorageError, STORAGE)):
    if isinstance(exception, kind):
      error(exception)
      return status
  raise exception


def _interrupted_while_starting(signum, frame):
  """SIGINT before main() runs (most of it is TensorFlow loading): nothing is
  written yet, so the process ends at once, with one line and no traceback."""
  del signum, frame
  os.write(_console[0], b"error: interrupted (SIGINT) while starting; nothing was written\n")
  _remove_own_tempdir()
  os._exit(INTERRUPTED)  # pylint: disable=protected-access


signal.signal(signal.SIGINT, _interrupted_while_starting)


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
    # From here a SIGINT is a KeyboardInterrupt that main() turns into its
    # status, or, in the training steps, a request to save and stop.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    status = main(argv)
    distributed_input = sys.modules.get("resnet_dist.distributed_input")
    if distributed_input is not None:  # the exit handler below skips finalization
      distributed_input.ends_without_finalization()
    _finished.append(status)
    return status

  return wrapped


@atexit.register
def _end_without_final_collection():
  if _finished:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_finished[0] or 0)  # pylint: disable=protected-access


# A temp dir of this process's own, for what TensorFlow writes there
# (autograph's generated sources, deleted at a normal exit): what a killed
# process leaves behind is removed by the next entrypoint that starts. Its
# name holds the PID namespace with the pid: processes of several namespaces
# (containers, Bazel's sandboxes) may share one /tmp and the same pids, and a
# pid is alive or dead only within its own namespace.
_TEMP_PREFIX = "resnet_dist-"


def tempdir_of(parent, pid):
  """The temp dir that process `pid` of this PID namespace makes in parent."""
  return os.path.join(parent, f"{_TEMP_PREFIX}{processes.pid_namespace()}-{pid}")


def _remove_dead_tempdirs(parent):
  prefix = f"{_TEMP_PREFIX}{processes.pid_namespace()}-"
  for path in glob.glob(os.path.join(parent, prefix + "*")):
    pid = os.path.basename(path)[len(prefix):]
    if pid.isdigit() and not processes.alive(int(pid)):
      shutil.rmtree(path, ignore_errors=True)


def _remove_own_tempdir():
  if tempfile.tempdir == tempdir_of(os.path.dirname(tempfile.tempdir or ""), os.getpid()):
    shutil.rmtree(tempfile.tempdir, ignore_errors=True)


def _own_tempdir():
  parent = tempfile.gettempdir()
  _remove_dead_tempdirs(parent)
  own = tempdir_of(parent, os.getpid())
  os.makedirs(own, exist_ok=True)
  tempfile.tempdir = own
  atexit.register(_remove_own_tempdir)  # after the handler above, so it runs before it


_own_tempdir()
