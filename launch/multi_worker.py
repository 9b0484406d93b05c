"""Run a multi-worker training on this machine, or print TF_CONFIG for a cluster.

  python -m launch.multi_worker --num_workers=2 -- --flagfile=launch/configs/digits.cfg
  python -m launch.multi_worker --print_tf_config --hosts=10.0.0.1:2222,10.0.0.2:2222

Local mode starts one `launch.train --strategy=multi_worker_mirrored` process
per worker on free ports of 127.0.0.1, prefixes each output line with the
worker's index, and when any worker fails ends the others and exits with that
worker's status, or 128 + N for a worker killed by signal N (137: SIGKILL).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading

from absl import app
from absl import flags

from launch import exits

_NUM_WORKERS = flags.DEFINE_integer("num_workers", 2, "Local worker processes.", lower_bound=1)
_PRINT_TF_CONFIG = flags.DEFINE_bool(
    "print_tf_config", False, "Print the TF_CONFIG of every host of --hosts and exit.")
_HOSTS = flags.DEFINE_list("hosts", [], "HOST:PORT of every worker, the chief first.")


def tf_config(hosts, index):
  return {"cluster": {"worker": list(hosts)}, "task": {"type": "worker", "index": index}}


def free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


_KILL_GRACE_SECONDS = 30


def _kill_all(processes):
  for process in processes:
    if process.returncode is None:
      try:
        os.killpg(process.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass


def _relay(stream, prefix, out):
  for line in iter(stream.readline, ""):
    out.write(f"{prefix}{line}")
    out.flush()


def _ending(returncode):
  """(the launcher's status, words) for the first worker that ended badly:
  its own status, or for a worker killed by signal N (returncode -N) the
  shell's 128 + N."""
  if returncode < 0:
    name = signal.Signals(-returncode).name
    return 128 - returncode, f"was killed by {name} (status {128 - returncode})"
  if returncode == exits.PREEMPTED:
    return returncode, "stopped by a signal after saving a checkpoint"
  return returncode, f"failed with status {returncode}"


def run_local(num_workers, train_args, python=sys.executable):
  """Runs the workers to the end; returns 0, or the first failing worker's status."""
  hosts = [f"127.0.0.1:{port}" for port in free_ports(num_workers)]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workers, relays = [], []
  for index in range(num_workers):
    env = {**os.environ, "TF_CONFIG": json.dumps(tf_config(hosts, index)),
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        # Last, so that no --strategy in train_args or a flagfile overrides it.
        [python, "-m", "launch.train", *train_args, "--strategy=multi_worker_mirrored"],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    workers.append(process)
    print(f"[launcher] worker {index}: pid {process.pid}, {hosts[index]}", flush=True)
    relay = threading.Thread(target=_relay, args=(process.stdout, f"[worker {index}] ", sys.stdout))
    relay.start()
    relays.append(relay)

  def forward(signum, frame):
    """Ctrl-C or a SIGTERM to the launcher reaches every worker (each in its own
    session, so the terminal's SIGINT does not): they save together and exit."""
    del frame
    for worker in workers:
      if worker.returncode is None:
        try:
          os.killpg(worker.pid, signum)
        except ProcessLookupError:  # ended, not yet reaped
          pass

  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, forward)
  status = 0
  remaining = set(range(num_workers))
  while remaining:
    pid, code = os.wait()
    index = next((i for i in remaining if workers[i].pid == pid), None)
    if index is None:
      continue
    remaining.discard(index)
    workers[index].returncode = os.waitstatus_to_exitcode(code)
    if workers[index].returncode != 0 and status == 0:
      status, what = _ending(workers[index].returncode)
      print(f"[launcher] worker {index} {what}; ending the others", file=sys.stderr, flush=True)
      for other in remaining:
        os.killpg(workers[other].pid, signal.SIGTERM)
      # A worker blocked in a collective on its dead peer only honours SIGTERM
      # at its next step boundary; after a grace period it is killed.
      killer = threading.Timer(_KILL_GRACE_SECONDS, _kill_all,
                               args=([workers[i] for i in remaining],))
      killer.daemon = True
      killer.start()
  for relay in relays:
    relay.join()
  return status


def main(argv):
  if _PRINT_TF_CONFIG.value:
    if not _HOSTS.value:
      exits.error("--print_tf_config needs --hosts=HOST:PORT,...")
      return exits.USAGE
    for index, host in enumerate(_HOSTS.value):
      print(f"{host}: TF_CONFIG='{json.dumps(tf_config(_HOSTS.value, index))}'")
    return 0
  return run_local(_NUM_WORKERS.value, argv[1:])


if __name__ == "__main__":
  app.run(main, flags_parser=exits.parse_flags)
