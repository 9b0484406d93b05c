"""Which cluster this process is one task of, read from its environment.

Every host of a multi-worker run starts the same command; what tells them
apart is the environment its launcher gives each process:

- TF_CONFIG, set by hand or printed by `launch.multi_worker --print_tf_config`;
- SLURM: the variables `srun` sets in each task of a job step;
- Kubernetes: JOB_COMPLETION_INDEX of an Indexed Job's pod, with the worker
  count and address pattern its manifest sets (docs/distributed.md).

from_environment() reads one of them into a Cluster, from which
strategy.choose_kind() decides, so that a process that was handed a cluster
of several tasks never trains a model of its own.
"""

import dataclasses
import glob
import hashlib
import json
import os
import re
from typing import Optional, Tuple

from resnet_dist.errors import ConfigError

SOURCES = ("auto", "tf_config", "slurm", "kubernetes")
# The jobs whose tasks each hold replicas under MultiWorkerMirroredStrategy.
_TRAINING_JOBS = ("chief", "worker")
# Set by the Job's manifest (Kubernetes itself sets JOB_COMPLETION_INDEX).
K8S_NUM_WORKERS = "RESNET_DIST_NUM_WORKERS"
K8S_WORKER_ADDRESS = "RESNET_DIST_WORKER_ADDRESS"   # HOST:PORT with {index} in it


@dataclasses.dataclass(frozen=True)
class Cluster:
  source: str               # where it was read: "TF_CONFIG", "SLURM", "Kubernetes"
  tasks: Tuple[str, ...]    # HOST:PORT of every training task, the chief first
  task_type: str
  task_index: int
  local_tasks: int = 1      # tasks on this host (SLURM: one per GPU, or one per node)
  local_index: int = 0
  gpus_on_host: int = 0     # as the scheduler says (SLURM_GPUS_ON_NODE); 0: not said
  run: str = ""             # the job all these tasks are one run of (see run_name)
  has_chief: bool = False   # tasks[0] is TF_CONFIG's "chief" job, the rest "worker"

  @property
  def num_tasks(self):
    return len(self.tasks)

  def resolver(self, num_gpus):
    """A cluster resolver for MultiWorkerMirroredStrategy whose task holds
    num_gpus GPUs (the ones it sees, after claim_local_gpus).

    MultiWorkerMirroredStrategy counts a task's GPUs itself only for a
    TFConfigClusterResolver (all it sees, whatever --num_gpus says, and by
    starting TensorFlow's runtime, which must not start before the
    strategy); any other resolver is asked num_accelerators(), which a
    SimpleClusterResolver answers with what it was given, {} by default: one
    CPU replica per task, its GPUs idle. So every source, TF_CONFIG's too,
    gets a SimpleClusterResolver told its GPUs.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel  # this module is light
    jobs = ({"chief": list(self.tasks[:1]), "worker": list(self.tasks[1:])} if self.has_chief
            else {"worker": list(self.tasks)})
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({job: tasks for job, tasks in jobs.items() if tasks}),
        task_type=self.task_type, task_id=self.task_index, rpc_layer="grpc",
        num_accelerators={"GPU": num_gpus} if num_gpus else None)


def from_tf_config(text):
  """The Cluster a TF_CONFIG value describes; a ConfigError naming what is wrong."""
  try:
    spec = json.loads(text)
  except ValueError:
    raise ConfigError("TF_CONFIG is not valid JSON") from None
  if not isinstance(spec, dict) or not isinstance(spec.get("cluster"), dict):
    raise ConfigError('TF_CONFIG has no "cluster": expected {"cluster": {"worker": '
                      '["HOST:PORT", ...]}, "task": {"type": "worker", "index": I}}')
  jobs = spec["cluster"]
  if len(jobs.get("chief", ())) > 1:
    raise ConfigError(f'TF_CONFIG\'s "chief" job has {len(jobs["chief"])} tasks; it takes one '
                      f'(the others belong in "worker")')
  tasks = tuple(address for job in _TRAINING_JOBS for address in jobs.get(job, ()))
  task = spec.get("task") or {}
  task_type, task_index = task.get("type"), task.get("index", 0)
  if task_type not in _TRAINING_JOBS or not isinstance(task_index, int) or not (
      0 <= task_index < len(jobs.get(task_type, ()))):
    raise ConfigError(f'TF_CONFIG\'s "task" ({json.dumps(task)}) is not one of its cluster\'s '
                      f'chief or worker tasks')
  # The cluster itself names the run: the same TF_CONFIG restarted anywhere is
  # the same run (a pod's DNS names, a fixed host list).
  digest = hashlib.sha256(json.dumps(jobs, sort_keys=True).encode()).hexdigest()[:12]
  return Cluster("TF_CONFIG", tasks, task_type, task_index, run=f"TF_CONFIG cluster {digest}",
                 has_chief=bool(jobs.get("chief")))


# --- SLURM ----------------------------------------------------------------------

def expand_hostlist(text):
  """SLURM's compressed host list as names: "gpu[01-02,7],login" ->
  gpu01, gpu02, gpu7, login (zero padding kept, several brackets too)."""
  hosts = []
  for part in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", text):
    match = re.match(r"([^\[]*)\[([^\]]*)\](.*)$", part)
    if not match:
      hosts.append(part)
      continue
    prefix, ranges, rest = match.groups()
    for item in ranges.split(","):
      first, _, last = item.partition("-")
      numbers = range(int(first), int(last or first) + 1)
      hosts.extend(f"{prefix}{n:0{len(first)}d}{tail}"
                   for n in numbers for tail in (expand_hostlist(rest) if rest else [""]))
  return hosts


def expand_tasks_per_node(text):
  """SLURM's tasks per node, "2(x3),1" -> [2, 2, 2, 1]."""
  counts = []
  for item in text.split(","):
    match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
    if not match:
      raise ConfigError(f"SLURM_STEP_TASKS_PER_NODE={text!r} is not SLURM's N(xM),... form")
    counts += [int(match.group(1))] * int(match.group(2) or 1)
  return counts


# Ports derived from the job ID stay below Linux's ephemeral range (32768 and
# up by default), where the kernel hands out the ports of outgoing
# connections and a derived port could already be taken.
_SLURM_PORTS = (12000, 32768)
_SLURM_PORTS_PER_JOB = 16


def slurm_port(environ, port):
  """The first port of a job's tasks on each node: --cluster_port; else the
  first of the ports SLURM reserved for the step (srun --resv-ports, where a
  site's MpiParams sets a range); else one of the job's own from its ID, so
  that jobs sharing a node do not collide."""
  if port:
    return port
  reserved = environ.get("SLURM_STEP_RESV_PORTS", "")
  match = re.match(r"(\d+)", reserved)
  if match:
    return int(match.group(1))
  first, end = _SLURM_PORTS
  slots = (end - first) // _SLURM_PORTS_PER_JOB
  return first + _SLURM_PORTS_PER_JOB * (int(environ.get("SLURM_JOB_ID", "0")) % slots)


def from_slurm(environ, port=0):
  """The Cluster of an `srun` job step: one task per process srun started,
  ranked in SLURM's block order (node by node), each at PORT + its local ID."""
  missing = [name for name in ("SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE",
                               "SLURM_PROCID", "SLURM_LOCALID") if name not in environ]
  if missing:
    raise ConfigError(f"--cluster=slurm outside an srun job step ({', '.join(missing)} "
                      f"unset): start every task with srun (launch/slurm/train.sbatch does)")
  hosts = expand_hostlist(environ["SLURM_STEP_NODELIST"])
  counts = expand_tasks_per_node(environ["SLURM_STEP_TASKS_PER_NODE"])
  if len(counts) != len(hosts):
    raise ConfigError(f"SLURM_STEP_NODELIST names {len(hosts)} node(s) but "
                      f"SLURM_STEP_TASKS_PER_NODE {len(counts)}")
  base = slurm_port(environ, port)
  places = [(host, local) for host, count in zip(hosts, counts) for local in range(count)]
  tasks = tuple(f"{host}:{base + local}" for host, local in places)
  index, local = int(environ["SLURM_PROCID"]), int(environ["SLURM_LOCALID"])
  node = environ.get("SLURMD_NODENAME")
  if not 0 <= index < len(places) or places[index][1] != local or (
      node and places[index][0] != node):
    where = f"local task {local} on {node}" if node else f"local task {local}"
    raise ConfigError(f"SLURM task {index} ({where}) is not where block distribution puts "
                      f"it: run srun with --distribution=block")
  # A requeued job keeps its ID (an array task has one of its own).
  return Cluster("SLURM", tasks, "worker", index,
                 local_tasks=counts[hosts.index(places[index][0])], local_index=local,
                 gpus_on_host=int(environ.get("SLURM_GPUS_ON_NODE") or 0),
                 run=f"SLURM job {environ.get('SLURM_JOB_ID', '?')}")


def _in_slurm_step(environ):
  return "SLURM_STEP_NODELIST" in environ and "SLURM_PROCID" in environ


# --- Kubernetes -----------------------------------------------------------------

def from_kubernetes(environ):
  """The Cluster of an Indexed Job's pod: worker JOB_COMPLETION_INDEX of
  RESNET_DIST_NUM_WORKERS, at the addresses RESNET_DIST_WORKER_ADDRESS
  gives for each index (the pods' DNS names under the headless Service)."""
  missing = [name for name in ("JOB_COMPLETION_INDEX", K8S_NUM_WORKERS, K8S_WORKER_ADDRESS)
             if not environ.get(name)]
  if missing:
    raise ConfigError(f"--cluster=kubernetes needs {', '.join(missing)}: run it in a pod "
                      f"of an Indexed Job that sets them (docs/distributed.md)")
  try:
    num_workers, index = int(environ[K8S_NUM_WORKERS]), int(environ["JOB_COMPLETION_INDEX"])
  except ValueError:
    raise ConfigError(f"{K8S_NUM_WORKERS} and JOB_COMPLETION_INDEX must be integers") from None
  pattern = environ[K8S_WORKER_ADDRESS]
  if "{index}" not in pattern:
    raise ConfigError(f"{K8S_WORKER_ADDRESS}={pattern!r} has no {{index}} for the worker's index")
  if not 0 <= index < num_workers:
    raise ConfigError(f"JOB_COMPLETION_INDEX={index} is outside {num_workers} workers")
  tasks = tuple(pattern.replace("{index}", str(i)) for i in range(num_workers))
  # The pods' addresses hold the Job's name: a replaced pod, or the Job
  # applied again, is the same run.
  return Cluster("Kubernetes", tasks, "worker", index, run=f"Kubernetes Job {pattern}")


def _in_kubernetes_job(environ):
  return "JOB_COMPLETION_INDEX" in environ and K8S_NUM_WORKERS in environ


# --- Choosing -------------------------------------------------------------------

def from_environment(source="auto", environ=None, port=0):
  """This process's Cluster, or None where nothing in its environment names one.

  auto: TF_CONFIG where it is set (a launcher's or a user's explicit word),
  else an srun job step, else a pod of an Indexed Job (docs/distributed.md).
  """
  environ = os.environ if environ is None else environ
  if source not in SOURCES:
    raise ConfigError(f"unknown --cluster={source}; choose from {', '.join(SOURCES)}")
  text = environ.get("TF_CONFIG", "").strip()
  if source == "tf_config" or (source == "auto" and text):
    if not text:
      raise ConfigError("--cluster=tf_config but TF_CONFIG is unset")
    return from_tf_config(text)
  if source == "slurm" or (source == "auto" and _in_slurm_step(environ)):
    return from_slurm(environ, port)
  if source == "kubernetes" or (source == "auto" and _in_kubernetes_job(environ)):
    return from_kubernetes(environ)
  return None


def is_multi_task(cluster: Optional[Cluster]):
  return cluster is not None and cluster.num_tasks > 1


def gpu_share(cluster):
  """How many GPUs each task of this host trains on where several tasks
  share a host whose GPUs the scheduler names (SLURM_GPUS_ON_NODE); None
  where the scheduler says nothing to share."""
  if cluster.local_tasks <= 1 or not cluster.gpus_on_host:
    return None
  return cluster.gpus_on_host // cluster.local_tasks


def local_gpus(cluster, environ):
  """CUDA_VISIBLE_DEVICES for this task where the scheduler shows every task
  of a host all of its GPUs (SLURM's --gres without --gpus-per-task): the
  task's equal share. None where nothing needs changing."""
  if gpu_share(cluster) is None:
    return None
  visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  visible = visible or [str(i) for i in range(cluster.gpus_on_host)]
  if len(visible) != cluster.gpus_on_host:  # bound per task already
    return None
  if len(visible) % cluster.local_tasks:
    raise ConfigError(f"{len(visible)} GPUs on this node do not divide among its "
                      f"{cluster.local_tasks} tasks")
  share = len(visible) // cluster.local_tasks
  return ",".join(visible[cluster.local_index * share:(cluster.local_index + 1) * share])


def claim_local_gpus(cluster, environ=None):
  """Sets this task's CUDA_VISIBLE_DEVICES (see local_gpus); must run before
  TensorFlow first lists the GPUs."""
  environ = os.environ if environ is None else environ
  devices = local_gpus(cluster, environ)
  if devices is not None:
    environ["CUDA_VISIBLE_DEVICES"] = devices


def tpu_attached(environ=None):
  """Whether this machine has TPU chips, or names a TPU: a TPU VM exposes its
  chips as /dev/accel* (v2-v4) or through vfio (v5+)."""
  environ = os.environ if environ is None else environ
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
              or environ.get("TPU_NAME"))


def run_name(cluster: Optional[Cluster], tpu=""):
  """The run these processes are, as a restart of it anywhere names it too:
  the cluster's job (a SLURM job, a Kubernetes Job, a TF_CONFIG cluster),
  else a named TPU; "" for a run of one process that no scheduler names."""
  if cluster is not None and cluster.run:
    return cluster.run
  if tpu and tpu != "local":
    return f"TPU {tpu}"
  return ""
