"""The Kubernetes manifest of a multi-worker training: an Indexed Job and its
headless Service, printed for `kubectl apply -f -`.

  python -m launch.kubernetes --name=r50 --image=REGISTRY/resnet_dist:TAG \\
      --num_workers=4 --gpus_per_worker=8 -- \\
      --flagfile=launch/configs/resnet50_imagenet_8gpu.cfg \\
      --data_dir=gs://BUCKET/imagenet --model_dir=gs://BUCKET/runs/r50 | kubectl apply -f -

Pod i of the Job is worker i. Kubernetes names it NAME-i and, under the
Service NAME, gives it the DNS name NAME-i.NAME; the pod reads its index
from JOB_COMPLETION_INDEX and every worker's address from the two variables
the manifest sets (resnet_dist/cluster.py), so every pod runs the same
command. The manifest is JSON, which kubectl reads as it reads YAML.

What happens when a pod ends (docs/distributed.md has the Kubernetes
version each field needs):
- A bad flag or bad data (status 2) or a non-finite loss (3) fails the Job:
  running it again would fail again.
- A pod that was preempted or evicted, or whose node was lost, does not count
  against the Job's retries; its replacement gets the same name, and every
  worker resumes from the last checkpoint. Kubernetes sends SIGTERM first and
  waits --grace_seconds, in which the trainer saves (status 75). A lost node's
  pods are evicted after --node_lost_seconds (Kubernetes' default: 300).
- What the other workers do when one fails or stops, status 69 (a peer lost)
  and 75 (saved at a peer's stop), counts neither: an incident costs one
  retry, not one per worker.
- Any other failure, the stuck run's 70 (the progress watchdog) among them,
  counts against --max_restarts retries of that worker's index, and against
  --max_restarts x --num_workers in all where a cluster has no per-index
  limits. A replacement starts only once the pod it replaces has ended, so
  two pods of one index never run at once.
"""

import dataclasses
import json
import os
import re
import sys
from typing import Sequence

from launch import exits  # first: its exit handler runs last
from absl import app
from absl import flags

from resnet_dist.cluster import K8S_NUM_WORKERS, K8S_WORKER_ADDRESS

CONTAINER = "train"
# Statuses (launch/exits.py) that fail the Job at once: the next try would fail alike.
_FINAL_STATUSES = (exits.USAGE, exits.NONFINITE)
# What a worker does because another one failed or stopped: not an incident of its own.
_ECHO_STATUSES = (exits.WORKER_LOST, exits.PREEMPTED)
_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


class ManifestError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Job:
  """What the manifest is made from; its defaults are the flags'."""
  name: str
  image: str
  train_args: Sequence[str]
  num_workers: int = 2
  gpus_per_worker: int = 0
  port: int = 2222
  namespace: str = ""
  max_restarts: int = 3
  grace_seconds: int = 120
  node_lost_seconds: int = 30
  workdir: str = "/workspace/resnet_dist"
  python: str = "python"
  volume: str = ""

  def check(self):
    # Pod names are NAME-INDEX and must stay DNS labels (63 characters).
    longest = f"{self.name}-{self.num_workers - 1}"
    if not _DNS_LABEL.fullmatch(self.name or "") or len(longest) > 63:
      raise ManifestError(f"--name={self.name!r} must be a DNS label (a-z, 0-9 and '-', "
                          f"starting with a letter) short enough for '{longest}'")
    claim, _, path = self.volume.partition(":")
    if self.volume and not (claim and path.startswith("/")):
      raise ManifestError(f"--volume={self.volume} must be CLAIM:/absolute/path")
    self.check_model_dir(path if self.volume else "")

  def check_model_dir(self, mount):
    """Every pod must write to one model_dir that outlives the pods: remote
    storage, or a path under the shared volume. Without one each pod writes
    into its own container, and a replaced pod starts over from step 0."""
    model_dir = _flag_value(self.train_args, "model_dir")
    mount = mount.rstrip("/")
    shared = model_dir and ("://" in model_dir or (mount and (
        os.path.normpath(model_dir) + "/").startswith(mount + "/")))
    if not shared:
      where = f"a path under --volume's {mount}" if mount else "a path under --volume's mount"
      raise ManifestError(
          f"the training flags need a --model_dir every pod reaches (gs://BUCKET/..., or {where})"
          + (f", not {model_dir}" if model_dir else "") + ": each pod would write into its own "
          f"container, and a replaced one would start over")


_NAME = flags.DEFINE_string(
    "name", None, "The Job's and the Service's name (a DNS label: a-z, 0-9, '-').")
_IMAGE = flags.DEFINE_string(
    "image", None, "A container image with this project at --workdir and its dependencies.")
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", Job.num_workers, "Pods, one worker each.", lower_bound=1)
_GPUS = flags.DEFINE_integer(
    "gpus_per_worker", Job.gpus_per_worker, "nvidia.com/gpu each pod asks for.", lower_bound=0)
_PORT = flags.DEFINE_integer(
    "port", Job.port, "The workers' gRPC port.", lower_bound=1, upper_bound=65535)
_NAMESPACE = flags.DEFINE_string("namespace", Job.namespace, "Namespace; default kubectl's.")
_MAX_RESTARTS = flags.DEFINE_integer(
    "max_restarts", Job.max_restarts,
    "Failures of each worker the Job retries (preemptions not counted).", lower_bound=0)
_GRACE = flags.DEFINE_integer(
    "grace_seconds", Job.grace_seconds,
    "Between SIGTERM and SIGKILL: time for the checkpoint.", lower_bound=1)
_NODE_LOST = flags.DEFINE_integer(
    "node_lost_seconds", Job.node_lost_seconds,
    "How long a pod waits on a node that is unreachable or not ready before it is "
    "evicted and replaced (Kubernetes' default: 300).", lower_bound=0)
_WORKDIR = flags.DEFINE_string("workdir", Job.workdir, "Where the image holds this project.")
_PYTHON = flags.DEFINE_string("python", Job.python, "The image's Python with the dependencies.")
_VOLUME = flags.DEFINE_string(
    "volume", Job.volume, "CLAIM:PATH: a PersistentVolumeClaim mounted at PATH in every pod "
    "(for a --model_dir or --data_dir on a shared file system).")


def _flag_value(args, name, root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
  """The value absl would give --name from args, flag files (relative to this
  repository, as in the image's workdir) included: the last one wins; "" if
  none sets it."""
  value = ""
  for arg in args:
    key, _, text = arg.lstrip("-").partition("=")
    if key == name:
      value = text
    elif key == "flagfile":
      path = text if os.path.isabs(text) else os.path.join(root, text)
      if os.path.isfile(path):
        with open(path) as f:
          found = _flag_value([line.strip() for line in f if line.strip().startswith("--")],
                              name, root)
        value = found or value
  return value


def worker_address(name, port):
  """RESNET_DIST_WORKER_ADDRESS: pod {index}'s name under the Service."""
  return f"{name}-{{index}}.{name}:{port}"


def _volumes(job):
  """(the pod's volumes, the container's mounts)."""
  # NCCL's buffers and tf.data's threads outgrow the runtime's 64 MB /dev/shm.
  volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
  mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
  if job.volume:
    claim, path = job.volume.split(":", 1)
    volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": claim}})
    mounts.append({"name": "shared", "mountPath": path})
  return volumes, mounts


def _pod(job, labels):
  volumes, mounts = _volumes(job)
  container = {
      "name": CONTAINER,
      "image": job.image,
      "workingDir": job.workdir,
      "command": [job.python, "-m", "launch.train"],
      # --cluster last, so that no flagfile in train_args overrides it.
      "args": [*job.train_args, "--cluster=kubernetes"],
      "env": [{"name": K8S_NUM_WORKERS, "value": str(job.num_workers)},
              {"name": K8S_WORKER_ADDRESS, "value": worker_address(job.name, job.port)},
              {"name": "PYTHONUNBUFFERED", "value": "1"}],
      "ports": [{"name": "grpc", "containerPort": job.port}],
      "resources": {"limits": {"nvidia.com/gpu": job.gpus_per_worker}}
                   if job.gpus_per_worker else {},
      "volumeMounts": mounts,
  }
  return {
      "metadata": {"labels": labels},
      "spec": {
          "subdomain": job.name,  # the Service's name: NAME-i.NAME resolves
          "restartPolicy": "Never",  # what podFailurePolicy requires
          "terminationGracePeriodSeconds": job.grace_seconds,
          "tolerations": [{"key": f"node.kubernetes.io/{taint}", "operator": "Exists",
                           "effect": "NoExecute", "tolerationSeconds": job.node_lost_seconds}
                          for taint in ("unreachable", "not-ready")],
          "containers": [container],
          "volumes": volumes,
      },
  }


def manifest(job):
  """The kubectl List of the headless Service and the Indexed Job."""
  job.check()
  labels = {"app.kubernetes.io/name": "resnet-dist", "resnet-dist/job": job.name}
  metadata = {"name": job.name, **({"namespace": job.namespace} if job.namespace else {}),
              "labels": labels}
  service = {
      "apiVersion": "v1", "kind": "Service", "metadata": metadata,
      "spec": {
          "clusterIP": "None",  # headless: a DNS name per pod, no proxy
          # The workers look each other up while starting, before any is ready.
          "publishNotReadyAddresses": True,
          "selector": labels,
          "ports": [{"name": "grpc", "port": job.port}],
      },
  }
  indexed_job = {
      "apiVersion": "batch/v1", "kind": "Job", "metadata": metadata,
      "spec": {
          "completionMode": "Indexed",
          "completions": job.num_workers,
          "parallelism": job.num_workers,
          "backoffLimitPerIndex": job.max_restarts,
          "maxFailedIndexes": 0,  # a worker out of retries ends the run
          "backoffLimit": job.max_restarts * job.num_workers,
          "podReplacementPolicy": "Failed",
          "podFailurePolicy": {"rules": [
              {"action": "FailJob", "onExitCodes": {
                  "containerName": CONTAINER, "operator": "In",
                  "values": list(_FINAL_STATUSES)}},
              {"action": "Ignore", "onExitCodes": {
                  "containerName": CONTAINER, "operator": "In",
                  "values": list(_ECHO_STATUSES)}},
              {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
          ]},
          "template": _pod(job, labels),
      },
  }
  return {"apiVersion": "v1", "kind": "List", "items": [service, indexed_job]}


def main(argv):
  for flag in (_NAME, _IMAGE):
    if not flag.value:
      exits.error(f"--{flag.name} is required")
      return exits.USAGE
  job = Job(_NAME.value, _IMAGE.value, argv[1:], num_workers=_NUM_WORKERS.value,
            gpus_per_worker=_GPUS.value, port=_PORT.value, namespace=_NAMESPACE.value,
            max_restarts=_MAX_RESTARTS.value, grace_seconds=_GRACE.value,
            node_lost_seconds=_NODE_LOST.value,
            workdir=_WORKDIR.value, python=_PYTHON.value, volume=_VOLUME.value)
  try:
    text = manifest(job)
  except ManifestError as e:
    exits.error(e)
    return exits.USAGE
  json.dump(text, sys.stdout, indent=2)
  print()
  return exits.OK


if __name__ == "__main__":
  app.run(main, flags_parser=exits.parse_flags)
