"""Which processes exist, as this one can tell: light (no TensorFlow), so the
entrypoints' start (launch/exits.py) and the run lock share it.

A pid is alive or dead only within its own PID namespace: containers and
Bazel's sandboxes share hosts, /tmp and pids, so a pid is named with its
namespace wherever another process may read it.
"""

import os


def pid_namespace():
  """This process's PID namespace, as an inode number; 0 without /proc."""
  try:
    return os.stat("/proc/self/ns/pid").st_ino
  except OSError:  # no /proc: one namespace as far as this process can tell
    return 0


def alive(pid):
  """Whether process `pid` of this PID namespace exists."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, another user's
    return True
  return True
