"""The run lock: one run trains in a model_dir at a time, and a restart of
that run takes it back from anywhere.

The lock is a lease, model_dir/training.lock, held by the chief. It names
the run (cluster.run_name: the SLURM job, the Kubernetes Job, the TF_CONFIG
cluster, the named TPU), the host, the PID namespace and the pid, and when
it was last renewed; a thread renews it every LEASE_SECONDS / 4 while the
run lives. A process that finds a lock takes it over when:

- it is the same run (a requeued SLURM job on other nodes, a replaced pod
  as PID 1 of a fresh container, the same TF_CONFIG on another host): a
  run's tasks are restarted together, so its old chief is gone;
- its holder was a process of this host and PID namespace that is gone
  (killed, crashed);
- its lease ran out: nothing renewed it for LEASE_SECONDS, so its holder
  is gone or cut off, whatever host it was on.

Otherwise it is another run, alive: one line, and nothing is written.
Renewal times are the holder's clock against the reader's, so hosts' clocks
must agree to well within LEASE_SECONDS (NTP keeps them within
milliseconds).
"""

import contextlib
import json
import os
import socket
import threading
import time

import tensorflow as tf

from resnet_dist.errors import ConfigError
from resnet_dist import monitor, processes

LOCK_FILE = "training.lock"
LEASE_SECONDS = 120.0


def _read(path):
  """The holder a lock file names, as a dict; {} for one that cannot be read
  (damaged, or half-written by a holder killed while writing)."""
  try:
    with tf.io.gfile.GFile(path) as f:
      text = f.read()
  except tf.errors.NotFoundError:
    return None
  try:
    holder = json.loads(text)
  except ValueError:
    holder = None
  return holder if isinstance(holder, dict) else {}


def _describe(holder):
  run = f"run {holder['run']}, " if holder.get("run") else ""
  return f"{run}host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"


def takeover_reason(holder, me, now, lease_seconds):
  """Why a process `me` may take the lock `holder` holds, or None where
  another run holds it. Both are lock records (Lease.record)."""
  if not holder:
    return "an unreadable lock"
  if me["run"] and holder.get("run") == me["run"]:
    return f"an earlier start of the same run ({_describe(holder)})"
  if (holder.get("host") == me["host"] and holder.get("pid_namespace") == me["pid_namespace"]
      and not processes.alive(int(holder.get("pid", 0)))):
    return f"a run that is gone ({_describe(holder)})"
  over = now - holder.get("renewed", 0.0) - holder.get("lease_seconds", lease_seconds)
  if over > 0:
    return f"a run whose lease ran out {over:.0f} s ago ({_describe(holder)})"
  return None


class Lease:
  """The chief's hold on model_dir: take() it, a thread renews it, release()
  it (run_lock does both; release_locks too, before an os._exit)."""

  def __init__(self, model_dir, run, lease_seconds=LEASE_SECONDS):
    self.path = os.path.join(model_dir, LOCK_FILE)
    self.run = run
    self.lease_seconds = lease_seconds
    self._stop = threading.Event()
    self._thread = None

  def record(self, now=None):
    return {"run": self.run, "host": socket.gethostname(),
            "pid_namespace": processes.pid_namespace(), "pid": os.getpid(),
            "renewed": time.time() if now is None else now, "lease_seconds": self.lease_seconds}

  def _ours(self, holder):
    me = self.record()
    return all(holder.get(key) == me[key] for key in ("host", "pid_namespace", "pid"))

  def _write(self):
    # Written aside and renamed: a holder killed mid-write leaves no half a lock.
    temporary = f"{self.path}.{socket.gethostname()}-{os.getpid()}"
    with tf.io.gfile.GFile(temporary, "w") as f:
      json.dump(self.record(), f)
    tf.io.gfile.rename(temporary, self.path, overwrite=True)

  def take(self):
    holder = _read(self.path)
    if holder is not None:
      now = time.time()
      reason = takeover_reason(holder, self.record(now), now, self.lease_seconds)
      if reason is None:
        ago = max(now - holder.get("renewed", now), 0.0)
        left = max(holder.get("lease_seconds", self.lease_seconds) - ago, 0.0)
        raise ConfigError(
            f"--model_dir={os.path.dirname(self.path)} is in use by another run "
            f"({_describe(holder)}, renewed {ago:.0f} s ago); if it is gone, its lease "
            f"runs out in {left:.0f} s, or delete {self.path}")
      monitor.warn(f"taking over the lock of {reason}")
    self._write()
    _held.add(self)
    self._thread = threading.Thread(target=self._renew, name="run-lock", daemon=True)
    self._thread.start()

  def _renew(self):
    while not self._stop.wait(self.lease_seconds / 4):
      try:
        holder = _read(self.path)
        if holder and not self._ours(holder):
          monitor.warn(f"another run took over {self.path} ({_describe(holder)}) while this "
                       f"one could not renew it; this run no longer holds its model_dir")
          return
        self._write()
      except (tf.errors.OpError, OSError) as e:  # tried again at the next renewal
        monitor.warn(f"cannot renew {self.path} ({e}); trying again")

  def release(self):
    self._stop.set()
    _held.discard(self)
    try:
      holder = _read(self.path)
      if holder and self._ours(holder):
        tf.io.gfile.remove(self.path)
    except tf.errors.OpError:
      pass  # a store that does not answer: the lease runs out by itself


_held = set()  # the leases this process holds


@contextlib.contextmanager
def run_lock(model_dir, chief, run=""):
  """Holds model_dir for this run (see the module's docstring): a second,
  different run on it fails with one line. Only the chief holds it: the
  workers of one run share the model_dir."""
  if not chief:
    yield
    return
  lease = Lease(model_dir, run)
  lease.take()
  try:
    yield
  finally:
    lease.release()


def release_locks():
  """Releases the leases this process holds: run_lock's own way out, and the
  one a thread that ends the process at once (os._exit) calls first."""
  for lease in list(_held):
    lease.release()
