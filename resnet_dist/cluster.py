"""Which cluster this process is one task of, read from its environment.

Every host of a multi-worker run starts the same command; what tells them
apart is the environment the launcher gives each (TF_CONFIG, set by hand or
by `launch.multi_worker`). from_environment() reads it into a Cluster, from
which strategy.choose_kind() decides, so that a host that was handed a
cluster of several tasks never trains a model of its own.
"""

import dataclasses
import json
import os
from typing import Optional, Tuple

from resnet_dist.errors import ConfigError

# The jobs whose tasks each hold replicas under MultiWorkerMirroredStrategy.
_TRAINING_JOBS = ("chief", "worker")


@dataclasses.dataclass(frozen=True)
class Cluster:
  source: str               # where it was read: "TF_CONFIG"
  tasks: Tuple[str, ...]    # HOST:PORT of every training task, the chief first
  task_type: str
  task_index: int

  @property
  def num_tasks(self):
    return len(self.tasks)


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
  tasks = tuple(address for job in _TRAINING_JOBS for address in jobs.get(job, ()))
  task = spec.get("task") or {}
  task_type, task_index = task.get("type"), task.get("index", 0)
  if task_type not in _TRAINING_JOBS or not isinstance(task_index, int) or not (
      0 <= task_index < len(jobs.get(task_type, ()))):
    raise ConfigError(f'TF_CONFIG\'s "task" ({json.dumps(task)}) is not one of its cluster\'s '
                      f'chief or worker tasks')
  return Cluster("TF_CONFIG", tasks, task_type, task_index)


def from_environment(environ=None):
  """This process's Cluster, or None where nothing in its environment names one."""
  environ = os.environ if environ is None else environ
  text = environ.get("TF_CONFIG", "").strip()
  return from_tf_config(text) if text else None


def is_multi_task(cluster: Optional[Cluster]):
  return cluster is not None and cluster.num_tasks > 1
