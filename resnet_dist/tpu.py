"""Which TPU --strategy=tpu would train on, and whether it can be reached.

check_reachable() runs before TensorFlow looks for the TPU, so that a run
without one fails within seconds, naming the problem: TensorFlow resolves a
named TPU through the GCE metadata server, and hangs without it.
"""

import os
import socket
import urllib.request
from urllib.parse import urlparse

from resnet_dist import cluster as cluster_lib
from resnet_dist.errors import ConfigError

_ACCELERATOR_TYPE_URL = ("http://metadata.google.internal/computeMetadata/v1/instance/"
                         "attributes/accelerator-type")


def is_multi_host(accelerator_type):
  """Whether a TPU type (v3-8, v4-32, v5litepod-16, ...) spans several hosts.

  The number counts TensorCores (v2-v5p) or chips (v5e, v6e); one host has
  at most 8 of either, so every type ending in 8 or less is one host.
  """
  try:
    return int(accelerator_type.rsplit("-", 1)[1]) > 8
  except (IndexError, ValueError):
    return False


def accelerator_type():
  """This TPU VM's type: $TPU_ACCELERATOR_TYPE, else the VM's metadata; "" off a TPU VM."""
  if os.environ.get("TPU_ACCELERATOR_TYPE") or not cluster_lib.tpu_attached():
    return os.environ.get("TPU_ACCELERATOR_TYPE", "")
  request = urllib.request.Request(_ACCELERATOR_TYPE_URL, headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(request, timeout=3) as response:
      return response.read().decode().strip()
  except OSError:
    return ""


def check_reachable(tpu):
  """Fails within seconds, naming the problem, where no TPU can be reached.

  tpu: "" or "local" (this TPU VM's chips), grpc://HOST:PORT (a TPU node's
  address) or a Cloud TPU's name.
  """
  if tpu in ("", "local"):
    _check_local()
    return
  if tpu.startswith("grpc://"):
    address = urlparse(tpu)
    try:
      socket.create_connection((address.hostname, address.port or 8470), timeout=5).close()
    except OSError as e:
      raise ConfigError(f"--tpu={tpu}: cannot connect ({e.strerror or e})") from None
    return
  # A named Cloud TPU node is resolved through the GCE metadata server and the
  # Cloud TPU API (cloud-tpu-client); without the metadata server that hangs.
  try:
    socket.create_connection(("metadata.google.internal", 80), timeout=3).close()
  except OSError:
    raise ConfigError(f"--tpu={tpu}: cannot resolve a named TPU off Google Cloud "
                      "(metadata.google.internal is unreachable)") from None


def _check_local():
  """This machine's own chips: attached, and not one host of a larger slice,
  whose other hosts a process here would leave out of the run."""
  found = accelerator_type()
  if is_multi_host(found):
    raise ConfigError(
        f"--tpu=local on a {found}, a slice of several hosts: train from "
        f"worker 0 only, with --tpu=NAME and TPU_LOAD_LIBRARY=0 (launch/tpu_vm.sh does)")
  if not cluster_lib.tpu_attached():
    raise ConfigError("--strategy=tpu: no TPU is attached to this machine "
                      "(no /dev/accel* or /dev/vfio device); pass --tpu=NAME or "
                      "--tpu=grpc://HOST:PORT for a remote TPU")
