"""Every tf.distribute difference lives here; the step and the loop never branch on it.

create_strategy() turns --strategy and its companions into a tf.distribute
strategy; the helpers answer the questions the loop has (who writes files,
which devices) without looking at the strategy's type; check_tasks_agree()
stops a multi-worker run whose tasks were started with different settings.

What create_strategy() draws on lives beside it: tpu.py (is a TPU there),
collectives.py (how the gradients cross), tf_patches.py (TensorFlow's
private code changed, once a strategy is created); the input through a
strategy is distributed_input.py's.
"""

import hashlib
import os

import tensorflow as tf

from resnet_dist import cluster as cluster_lib
from resnet_dist import collectives, tf_patches, tpu as tpu_lib
from resnet_dist.config import STRATEGIES
from resnet_dist.errors import ConfigError


# --- Choosing and building -----------------------------------------------------

def split_cpu(num_devices):
  """Splits the host CPU into logical devices; must run before any op.

  Each replica then gets its share of the cores for its own ops: with the
  default pools every replica's ops fan out over all cores and the replicas
  contend, and a step is slower than with the cores split between them.
  """
  cpus = tf.config.list_physical_devices("CPU")
  current = tf.config.get_logical_device_configuration(cpus[0])
  if current and len(current) == num_devices:
    return
  try:
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices)
  except RuntimeError:  # this process has used its devices already
    raise ConfigError(f"--num_cpu_devices={num_devices}: this process set up its CPU devices "
                      f"already, as {len(tf.config.list_logical_devices('CPU'))}") from None
  if num_devices > 1:
    tf.config.threading.set_intra_op_parallelism_threads(
        max(1, (os.cpu_count() or 1) // num_devices))
    tf.config.threading.set_inter_op_parallelism_threads(num_devices)


def choose_kind(kind, cluster, tpu=""):
  """The strategy --strategy=kind means in this process's cluster (None: none).

  auto: multi_worker_mirrored when the cluster has several tasks, else a TPU
  if one is named or attached, else mirrored. A strategy of one host in a
  cluster of several tasks would train a separate model on every host (and
  all of them into one model_dir), so it is refused.
  """
  if kind not in STRATEGIES:
    raise ConfigError(f"unknown strategy {kind!r}; choose from {', '.join(STRATEGIES)}")
  if cluster_lib.is_multi_task(cluster):
    if kind == "auto" and not tpu:
      return "multi_worker_mirrored"
    if kind != "multi_worker_mirrored":
      chosen = f"--tpu={tpu}" if kind == "auto" else f"--strategy={kind}"
      raise ConfigError(
          f"{chosen} would train a separate model on each of the {cluster.num_tasks} tasks "
          f"{cluster.source} names; give --strategy=auto or multi_worker_mirrored (after "
          f"any --flagfile)" + (", or unset TF_CONFIG" if cluster.source == "TF_CONFIG" else ""))
    return kind
  if kind == "multi_worker_mirrored" and cluster is None:
    raise ConfigError("--strategy=multi_worker_mirrored needs a cluster: set TF_CONFIG "
                      "(`python -m launch.multi_worker --print_tf_config` prints it), or "
                      "start the tasks with srun or as a Kubernetes Indexed Job")
  if kind == "auto":
    return "tpu" if tpu or cluster_lib.tpu_attached() else "mirrored"
  return kind


# TensorFlow's GPU thread modes: gpu_private gives each GPU threads of its own
# that launch its kernels, so the input pipeline's threads never delay a
# step's launches (TensorFlow's GPU performance guide; Model Garden's ResNet
# sets it); global is TensorFlow's default, one pool for everything
# (config.GPU_THREAD_MODES).
GPU_THREADS_PER_GPU = 2


def gpu_thread_environment(mode):
  """The variables TensorFlow reads as it creates its GPU devices, for a mode."""
  if mode == "global":
    return {}
  return {"TF_GPU_THREAD_MODE": mode, "TF_GPU_THREAD_COUNT": str(GPU_THREADS_PER_GPU)}


def describe_gpu_threads():
  """The GPU thread setting TensorFlow will read, for the start block."""
  mode = os.environ.get("TF_GPU_THREAD_MODE", "global")
  if mode == "global":
    return "global (TensorFlow's shared pool)"
  return f"{mode}, {os.environ.get('TF_GPU_THREAD_COUNT', '2')} per GPU"


def create_strategy(distribute):
  """Returns the tf.distribute strategy of a config.DistributeConfig: its
  --strategy as choose_kind() reads it in this process's cluster, with its
  collectives as collectives.choose_all_reduce() reads --all_reduce.

  tpu defaults to $TPU_NAME.
  """
  tf_patches.apply()  # here, never at import (tf_patches.py says why)
  cluster = cluster_lib.from_environment(distribute.cluster, port=distribute.cluster_port)
  kind = choose_kind(distribute.strategy, cluster, distribute.tpu)
  if cluster is not None:
    cluster_lib.claim_local_gpus(cluster)  # before TensorFlow lists its GPUs
  if kind == "tpu":
    return _tpu_strategy(distribute)
  for name, value in gpu_thread_environment(distribute.gpu_thread_mode).items():
    os.environ.setdefault(name, value)  # before TensorFlow creates its GPU devices; yours win
  gpus = tf.config.list_physical_devices("GPU")
  if kind == "multi_worker_mirrored":
    return _multi_worker_strategy(distribute, cluster, gpus)
  strategy = _one_host_strategy(kind, distribute.num_gpus, distribute.num_cpu_devices, gpus)
  all_reduce = collectives.choose_all_reduce(distribute, kind, not all_on_cpu(strategy))
  if all_reduce.by_collectives:
    # MirroredStrategy takes no communication options, and left to itself
    # hints nothing, which TensorFlow's collectives read as ring, on GPUs
    # too; every collective of the run (sync BN's too) should use the one
    # chosen. It is the default its batch_reduce_to and reduce_to merge in.
    strategy.extended._communication_options = all_reduce.options()  # pylint: disable=protected-access
  return strategy


def _wanted_gpus(num_gpus, gpus):
  """The GPUs a task trains on: --num_gpus of them, default every one it sees."""
  if num_gpus is not None and num_gpus > len(gpus):
    raise ConfigError(f"--num_gpus={num_gpus} but {len(gpus)} GPU(s) are visible")
  return len(gpus) if num_gpus is None else num_gpus


def task_devices(resolver):
  """The replica devices MultiWorkerMirroredStrategy gives this task for a
  cluster resolver, by TensorFlow's own rule (its _initialize_local_devices:
  a TFConfigClusterResolver's task holds every GPU the process sees, any
  other resolver's the GPUs its num_accelerators() names, else one CPU)."""
  from tensorflow.python.distribute import collective_all_reduce_strategy  # pylint: disable=g-import-not-at-top
  extended = collective_all_reduce_strategy.CollectiveAllReduceExtended
  devices, _ = extended._initialize_local_devices(None, resolver, "")  # pylint: disable=protected-access
  return devices


def _multi_worker_strategy(distribute, cluster, gpus):
  """MultiWorkerMirroredStrategy over the cluster, each task on its GPUs: a
  task that would hold fewer replicas than the GPUs it should train on is a
  ConfigError, before the strategy (which waits for every task) is built."""
  share = cluster_lib.gpu_share(cluster)
  if share is not None and len(gpus) > share:
    raise ConfigError(
        f"this task sees {len(gpus)} GPUs, not its share of {share} ({cluster.local_tasks} "
        f"tasks on a node of {cluster.gpus_on_host}): TensorFlow listed them before the task "
        f"claimed its share; start it as `python -m launch.train`, or give each task its own "
        f"GPUs (srun --gpus-per-task)")
  wanted = _wanted_gpus(distribute.num_gpus, gpus)
  resolver = cluster.resolver(wanted)
  held = [d for d in task_devices(resolver) if "GPU" in d.upper()]
  if len(held) < wanted:
    raise ConfigError(
        f"this task sees {len(gpus)} GPU(s) but multi_worker_mirrored would train on "
        f"{len(held)} of them ({cluster.source} cluster): refusing to leave them idle")
  all_reduce = collectives.choose_all_reduce(distribute, "multi_worker_mirrored", bool(wanted))
  # A collective timeout starts a watchdog thread per collective that lives
  # as long as the timeout, so it stays off unless asked for (debugging); a
  # dead peer is detected by the coordination service's heartbeats, a stuck
  # one by the run's progress watchdog (resnet_dist/watchdog.py).
  options = tf.distribute.experimental.CommunicationOptions(
      implementation=all_reduce.communication(),
      timeout_seconds=distribute.collective_timeout_seconds or None)
  return tf.distribute.MultiWorkerMirroredStrategy(
      cluster_resolver=resolver, communication_options=options)


def _tpu_strategy(distribute):
  tpu = distribute.tpu or os.environ.get("TPU_NAME", "")
  tpu_lib.check_reachable(tpu)
  collectives.choose_all_reduce(distribute, "tpu", False)
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
      tpu=tpu or "local", zone=distribute.tpu_zone, project=distribute.gcp_project)
  if tpu not in ("", "local"):
    tf.config.experimental_connect_to_cluster(resolver)
  tf.tpu.experimental.initialize_tpu_system(resolver)
  return tf.distribute.TPUStrategy(resolver)


def _one_host_strategy(kind, num_gpus, num_cpu_devices, gpus):
  """one_device or mirrored: over this host's GPUs, else its logical CPU devices."""
  wanted = _wanted_gpus(num_gpus, gpus)
  if kind == "one_device":
    return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
  if wanted:
    return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(wanted)])
  if num_cpu_devices < 1:
    raise ConfigError("--num_cpu_devices must be at least 1")
  split_cpu(num_cpu_devices)
  return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(num_cpu_devices)])


# --- The questions the step and the loop ask of a built strategy --------------

def task_info(strategy):
  """(task_type, task_id) of this process; ("chief", 0) outside a cluster."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.task_type:
    return "chief", 0
  return resolver.task_type, resolver.task_id or 0


def is_chief(strategy):
  """Only the chief prints progress and writes summaries and real checkpoints."""
  task_type, task_id = task_info(strategy)
  if task_type in ("chief", None):
    return True
  # A cluster without a "chief" job makes worker 0 the chief.
  cluster = strategy.cluster_resolver.cluster_spec().as_dict()
  return task_type == "worker" and task_id == 0 and "chief" not in cluster


def describe_tasks(strategy):
  """", worker 0 of 2 tasks, 8 GPU replicas each" for a multi-worker
  strategy, "" for the others."""
  if kind_of(strategy) != "multi_worker_mirrored":
    return ""
  task_type, task_id = task_info(strategy)
  devices = replica_devices(strategy)
  device_type = "GPU" if "GPU" in devices[0].upper() else "CPU"
  return (f", {task_type} {task_id} of {num_input_pipelines(strategy)} tasks, "
          f"{len(devices)} {device_type} replica{'s' if len(devices) > 1 else ''} each")


def kind_of(strategy):
  """The --strategy name of a strategy object, for logs and summary.json."""
  return {
      "OneDeviceStrategy": "one_device",
      "MirroredStrategy": "mirrored",
      "MultiWorkerMirroredStrategy": "multi_worker_mirrored",
      "CollectiveAllReduceStrategy": "multi_worker_mirrored",
      "TPUStrategy": "tpu",
      "TPUStrategyV2": "tpu",
  }.get(type(strategy).__name__, type(strategy).__name__)


def stops_alone(strategy):
  """Whether a process can end an evaluation by itself when it is asked to
  stop: the workers of a multi-worker run learn of a stop only inside a
  training step's all-reduce, so each finishes the evaluation and all stop
  at that step."""
  return kind_of(strategy) != "multi_worker_mirrored"


def num_input_pipelines(strategy):
  """Input pipelines the strategy builds: one per worker (TPU: per host)."""
  kind = kind_of(strategy)
  if kind == "tpu":
    return strategy.extended.num_hosts
  if kind == "multi_worker_mirrored":
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return max(1, sum(len(cluster.get(job, ())) for job in ("chief", "worker")))
  return 1


def replica_devices(strategy):
  try:
    return list(strategy.extended.worker_devices)
  except RuntimeError:  # the default strategy: whatever device TensorFlow picks
    return [tf.config.list_logical_devices()[0].name]


def all_on_cpu(strategy):
  """Whether every replica is a CPU device (logical or not)."""
  return all("CPU" in d.upper() for d in replica_devices(strategy))


def xla_scope(strategy, sync_bn=False):
  """What --enable_xla compiles on this strategy: "step", the whole replica
  step, or "gradients", its forward and backward only; a ConfigError where
  XLA cannot run.

  The whole step on one device (nothing to all-reduce) and on TPUs, where
  XLA is the only compiler and its cross-replica sum the TPU's own. Over
  several GPUs only the forward and backward: an all-reduce compiled into
  the step would be an XLA collective, which TensorFlow 2.21 cannot run
  well (each launch arms a thread that sleeps out the collective timeout,
  exhausting threads: tensorflow#56423) and cannot run across processes at
  all (no clique id is shared between hosts: tensorflow#58787, #58961), so
  the gradients are all-reduced and applied by TensorFlow's own collectives,
  as without XLA. --sync_bn puts an all-reduce in the forward pass; with
  XLA over several replicas it is refused for the same reason.

  Over several logical CPU devices XLA fails ("tf.Variable on a different
  device", a known XLA limitation), so that is refused up front rather than
  at the first step.
  """
  if kind_of(strategy) == "tpu":
    return "step"
  if strategy.num_replicas_in_sync == 1:
    return "step"
  if all_on_cpu(strategy):
    raise ConfigError("--enable_xla needs one device, GPUs or a TPU; it does not "
                      "work across several logical CPU devices")
  if sync_bn:
    raise ConfigError("--enable_xla with --sync_bn over several GPUs would compile BN's "
                      "all-reduce into XLA, whose collectives TensorFlow cannot run across "
                      "hosts or for long on one: drop one of the two")
  return "gradients"


def gradient_all_reduce(distribute, strategy):
  """The collectives.AllReduce a built strategy's gradients use (see
  collectives.choose_all_reduce)."""
  if strategy.num_replicas_in_sync == 1 and kind_of(strategy) != "tpu":
    return collectives.AllReduce("none", dtype=distribute.all_reduce_dtype)
  return collectives.choose_all_reduce(distribute, kind_of(strategy), not all_on_cpu(strategy))


# --- Whether the tasks of a run were given the same settings ------------------

# Settings that say where a task finds things, not what the run does: they
# may differ between the tasks of one run (a dataset copied to each host's
# own disk, say).
PER_TASK_SETTINGS = ("data_dir", "download", "cluster", "cluster_port")


def _setting_hashes(settings):
  """Each setting's value as a number below 2**24, exact in float32."""
  return [int(hashlib.sha256(repr(value).encode()).hexdigest()[:6], 16)
          for value in settings.values()]


def check_tasks_agree(strategy, settings):
  """Stops every task of a multi-worker run, with one line and a
  ConfigError, where the tasks were given different settings ({flag name:
  value}, but PER_TASK_SETTINGS): they would fail in a collective whose
  shapes differ, deadlock, or train something else than asked. Two small
  all-reduces over the cluster itself: the chief's fingerprint of each
  setting, then which ones some task's differ from."""
  if kind_of(strategy) != "multi_worker_mirrored" or num_input_pipelines(strategy) < 2:
    return
  settings = {k: v for k, v in settings.items() if k not in PER_TASK_SETTINGS}
  mine = tf.constant(_setting_hashes(settings), tf.float32)

  def compare():
    context = tf.distribute.get_replica_context()
    first = context.replica_id_in_sync_group == 0  # the chief's first replica
    chiefs = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                tf.where(first, mine, tf.zeros_like(mine)))
    return context.all_reduce(tf.distribute.ReduceOp.SUM,
                              tf.cast(tf.not_equal(mine, chiefs), tf.float32))

  differing = strategy.experimental_local_results(strategy.run(tf.function(compare)))[0]
  names = [name for name, count in zip(settings, differing.numpy()) if count]
  if names:
    shown = ", ".join(f"--{name}" for name in names[:3]) + (" ..." if len(names) > 3 else "")
    here = settings[names[0]]
    raise ConfigError(
        f"the tasks of this run were given different settings ({shown}; here --{names[0]}="
        f"{here}); start every task with the same flags")
