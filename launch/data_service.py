"""A tf.data service for training input: preprocessing on other CPU machines.

  python -m launch.data_service --role=dispatcher --port=5050 [--work_dir=DIR]
  python -m launch.data_service --role=worker --dispatcher=HOST:5050 [--port=5051]
  python -m launch.data_service --role=local --num_workers=2 --port=5050

Trainers then take `--data_service=HOST:5050`. A dispatcher hands the input
pipeline's splits to the workers; the workers read, decode, augment and batch,
and the trainers receive finished batches from them. `--role=local` starts a
dispatcher and N workers as processes of this machine on 127.0.0.1, prints the
address to give trainers, and ends them all on Ctrl-C or SIGTERM.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from launch import exits  # first: its exit handler runs last
from absl import app
from absl import flags

_ROLE = flags.DEFINE_enum("role", None, ["dispatcher", "worker", "local"],
                          "What this process runs.")
_PORT = flags.DEFINE_integer(
    "port", 0, "Port to serve on; 0: any free one (a dispatcher's is printed).", lower_bound=0)
_WORK_DIR = flags.DEFINE_string(
    "work_dir", "", "Dispatcher: a directory (local or gs://) for its journal of datasets and "
    "jobs, so that a restarted dispatcher recovers them and running trainers go on.")
_DISPATCHER = flags.DEFINE_string("dispatcher", "", "Worker: the dispatcher's HOST:PORT.")
_HOST = flags.DEFINE_string(
    "host", "", "Worker: the name trainers reach this machine by; default its host name "
    "(127.0.0.1 under --role=local).")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 2, "Local: worker processes.", lower_bound=1)
_WORKER_TIMEOUT = flags.DEFINE_integer(
    "worker_timeout_seconds", 10, "Dispatcher: a worker that has not reported for this long "
    "is taken as missing (TensorFlow's worker_timeout_ms).", lower_bound=1)

# A worker reports to the dispatcher this often: it learns of new jobs and
# the dispatcher of lost workers within a few of these.
_HEARTBEAT_MS = 1000
# A server ends within a fraction of a second of SIGTERM; one that has not
# after this long is killed, so that --role=local never outlives its stop.
_STOP_SECONDS = 10


def _service():
  with exits.quiet_start():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.data.experimental.service


def _end(signum, frame):
  del signum, frame
  sys.stdout.flush()
  os._exit(exits.OK)  # pylint: disable=protected-access


def _serve(server, what):
  # SIGINT or SIGTERM end the process at once: a server keeps no state but
  # the dispatcher's journal, which it writes before each answer.
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, _end)
  port = server._address.rsplit(":", 1)[1]  # pylint: disable=protected-access
  print(f"{what} serving on port {port}", flush=True)
  # Not server.join() nor signal.pause(): Python runs a handler in the main
  # thread between bytecodes, and the kernel may deliver the signal to one of
  # the server's threads, which would leave the main thread asleep for good.
  while True:
    time.sleep(0.2)


def dispatcher(port, work_dir, worker_timeout_seconds):
  service = _service()
  config = service.DispatcherConfig(
      port=port, work_dir=work_dir or None, fault_tolerant_mode=bool(work_dir),
      worker_timeout_ms=worker_timeout_seconds * 1000)
  _serve(service.DispatchServer(config), "dispatcher")


def worker(dispatcher_address, port, host):
  service = _service()
  host = host or socket.gethostname()
  config = service.WorkerConfig(
      dispatcher_address=dispatcher_address, port=port, worker_address=f"{host}:%port%",
      data_transfer_address=f"{host}:%dts_port%", heartbeat_interval_ms=_HEARTBEAT_MS)
  _serve(service.WorkerServer(config), f"worker of {dispatcher_address}")


def _start(role, *args):
  return subprocess.Popen([sys.executable, "-m", "launch.data_service", f"--role={role}", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)


def _first_line(process, what):
  """The process's "... serving on port P" line; its port."""
  for line in process.stdout:
    if "serving on port" in line:
      threading.Thread(target=process.stdout.read, daemon=True).start()  # drain the rest
      return int(line.rsplit(" ", 1)[1])
    sys.stdout.write(f"[{what}] {line}")
  raise RuntimeError(f"the {what} ended before serving (status {process.wait()})")


def run_local(num_workers, port, work_dir, worker_timeout_seconds):
  """A dispatcher and num_workers workers on 127.0.0.1 until SIGINT/SIGTERM
  or until the dispatcher ends; a worker that ends is reported, and the
  others go on."""
  processes = [_start("dispatcher", f"--port={port}", f"--work_dir={work_dir}",
                      f"--worker_timeout_seconds={worker_timeout_seconds}")]
  stopping = []

  def stop(*_):
    stopping.append(True)
    for process in processes:
      if process.poll() is None:
        process.terminate()

  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, stop)
  try:
    address = f"127.0.0.1:{_first_line(processes[0], 'dispatcher')}"
    processes += [_start("worker", f"--dispatcher={address}", "--host=127.0.0.1")
                  for _ in range(num_workers)]
    for index, process in enumerate(processes[1:]):
      _first_line(process, f"worker {index}")
  except RuntimeError as e:
    stop()
    exits.error(e)
    return 1
  print(f"tf.data service with {num_workers} workers: --data_service={address}", flush=True)
  print(f"pids: dispatcher {processes[0].pid}, workers "
        f"{' '.join(str(p.pid) for p in processes[1:])}; Ctrl-C ends them", flush=True)
  return _supervise(processes, stopping, stop)


def _supervise(processes, stopping, stop):
  """Waits for a stop (a signal) or the dispatcher's end; reports workers
  that end, as the others go on (the dispatcher gives them its share)."""
  reported = set()
  while not stopping:
    if processes[0].poll() is not None:
      print(f"the dispatcher ended with status {processes[0].returncode}; ending the workers",
            file=sys.stderr, flush=True)
      stop()
      return 1
    for index, process in enumerate(processes[1:]):
      if process.poll() is not None and index not in reported:
        reported.add(index)
        print(f"worker {index} (pid {process.pid}) ended with status {process.returncode}",
              file=sys.stderr, flush=True)
    time.sleep(0.5)
  for process in processes:
    try:
      process.wait(timeout=_STOP_SECONDS)
    except subprocess.TimeoutExpired:  # a server that did not end on SIGTERM
      process.kill()
      process.wait()
  return exits.OK


def main(argv):
  if len(argv) > 1:
    exits.error(f"unexpected arguments: {' '.join(argv[1:])}")
    return exits.USAGE
  role = _ROLE.value
  if role is None:
    exits.error("--role is required: dispatcher, worker or local")
    return exits.USAGE
  if role == "worker" and not _DISPATCHER.value:
    exits.error("--role=worker needs --dispatcher=HOST:PORT")
    return exits.USAGE
  if role == "dispatcher":
    dispatcher(_PORT.value, _WORK_DIR.value, _WORKER_TIMEOUT.value)
  elif role == "worker":
    worker(_DISPATCHER.value, _PORT.value, _HOST.value)
  else:
    return run_local(_NUM_WORKERS.value, _PORT.value, _WORK_DIR.value, _WORKER_TIMEOUT.value)
  return exits.OK


if __name__ == "__main__":
  app.run(main, flags_parser=exits.parse_flags)
