"""A trainer's side of the tf.data service (--data_service=HOST:PORT).

The training dataset service_reader.py builds is sent to the service's dispatcher,
which hands its splits (a chunk of examples, or a file) to the workers, each
split once (ShardingPolicy.DYNAMIC); the workers decode, augment and batch,
and the trainer receives the batches. This module checks the service before
a run starts, names its jobs, and watches it while the run trains: the
client TensorFlow gives the trainer waits for a dead dispatcher forever.
"""

import hashlib
import os
import re
import socket
import threading
import time

import grpc

from resnet_dist import watchdog
from resnet_dist.errors import ConfigError

# A run whose dispatcher stays unreachable ends with EX_UNAVAILABLE, as one
# whose peer worker died: the data it needs cannot be had.
DISPATCHER_LOST = 69
POLL_SECONDS = 2.0
_GET_WORKERS = "/tensorflow.data.DispatcherService/GetWorkers"


def check_address(address):
  if not re.fullmatch(r"[\w.\-]+:\d+", address or ""):
    raise ConfigError(f"--data_service={address} must be HOST:PORT (a tf.data service "
                      f"dispatcher, as launch.data_service prints)")


def _fields(message):
  """(field number, bytes) of a protobuf message's length-delimited fields;
  its varint fields are skipped (the only other kind in these messages)."""
  at = 0
  while at < len(message):
    key, at = _varint(message, at)
    value, at = _varint(message, at)
    if key & 7 == 2:
      yield key >> 3, message[at:at + value]
      at += value
    elif key & 7:
      raise ValueError(f"unexpected protobuf wire type {key & 7} from the dispatcher")


def _varint(message, at):
  value, shift = 0, 0
  while True:
    value |= (message[at] & 0x7F) << shift
    shift, at = shift + 7, at + 1
    if message[at - 1] < 0x80:
      return value, at


def _registered(channel, timeout):
  """The addresses of the workers the dispatcher knows: GetWorkers, whose
  answer is `repeated WorkerInfo workers = 1` with `string address = 1`
  (the request is an empty message). It keeps a worker that has died."""
  answer = channel.unary_unary(_GET_WORKERS, request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)(b"", timeout=timeout)
  return [value.decode() for _, info in _fields(answer)
          for number, value in _fields(info) if number == 1]


def _answers(address, timeout=1.0):
  host, port = address.rsplit(":", 1)
  try:
    socket.create_connection((host, int(port)), timeout=timeout).close()
    return True
  except OSError:
    return False


def _workers(channel, timeout):
  """How many of the dispatcher's workers answer."""
  return sum(_answers(address) for address in _registered(channel, timeout))


def wait_for_workers(address, timeout_seconds):
  """The service's number of workers once its dispatcher answers with at
  least one; a ConfigError after timeout_seconds without."""
  deadline = time.monotonic() + timeout_seconds
  with grpc.insecure_channel(address) as channel:
    answered = False
    while True:
      try:
        count = _workers(channel, max(deadline - time.monotonic(), 0.1))
        answered = True
        if count:
          return count
      except grpc.RpcError:
        pass
      if time.monotonic() >= deadline:
        break
      time.sleep(0.5)
  if answered:
    raise ConfigError(f"the tf.data service at {address} has no workers after "
                      f"{timeout_seconds} s; start some with `python -m launch.data_service "
                      f"--role=worker --dispatcher={address}`")
  raise ConfigError(f"cannot reach a tf.data service dispatcher at --data_service={address} "
                    f"within {timeout_seconds} s (--data_service_timeout_seconds)")


def job_prefix(model_dir):
  """Unique to this run and this process: two runs sharing a service, or a
  run and its own restart, never read from one job."""
  run = hashlib.sha1(os.path.abspath(model_dir).encode()).hexdigest()[:12]
  return f"resnet_dist-{run}-{os.getpid()}-{time.time_ns()}"


class Watch:
  """A thread that asks the dispatcher for its workers every POLL_SECONDS
  while a run trains: a lost worker is a warning (the others take its share);
  a dispatcher unreachable, or one without workers, for timeout_seconds ends
  the process with DISPATCHER_LOST, since its input would never come.

  Ending the process from this thread is the only way out: the main thread
  is blocked inside TensorFlow, waiting for a batch. The checkpoints already
  written are complete (they are written to temporary names and renamed).
  """

  def __init__(self, address, timeout_seconds, workers, log, before_exit=lambda: None):
    self.address, self.timeout, self.log = address, timeout_seconds, log
    self.before_exit = before_exit  # what must not outlive the process (its run lock)
    self.most = self.workers = workers
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True, name="data_service_watch")

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    try:  # a last look, so that a worker lost in the last seconds is told and counted
      with grpc.insecure_channel(self.address) as channel:
        self._count(_workers(channel, POLL_SECONDS))
    except grpc.RpcError:
      pass

  def _run(self):
    healthy = time.monotonic()
    with grpc.insecure_channel(self.address) as channel:
      while not self._stop.wait(POLL_SECONDS):
        try:
          count = _workers(channel, POLL_SECONDS)
        except grpc.RpcError:
          count = None
        if count:
          healthy = time.monotonic()
          self._count(count)
        elif time.monotonic() - healthy > self.timeout:
          self._give_up("has not answered" if count is None else "has had no workers")

  def _count(self, count):
    if count < self.workers:
      self.log(f"warning: the tf.data service has {count} of its {self.most} workers; "
               f"training goes on, fed by the rest (the examples in the lost worker's hands "
               f"are skipped this epoch)")
    elif count > self.workers:
      self.log(f"the tf.data service has {count} workers")
    self.workers, self.most = count, max(self.most, count)

  def _give_up(self, what):
    watchdog.end_process(
        DISPATCHER_LOST, f"the tf.data service dispatcher at {self.address} {what} for "
        f"{self.timeout} s; restart it (with its --work_dir to keep the jobs) and run again "
        f"to resume from the last checkpoint", self.before_exit)
