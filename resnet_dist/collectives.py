"""How a step's gradients cross the replicas: --all_reduce and its companions.

choose_all_reduce() reads --all_reduce* for a strategy kind into an
AllReduce; the strategy is built with its communication options and the
replica step sums the gradients through it. This module knows strategy
kinds by name only, so strategy.py, which builds the strategies, can use it.
"""

import dataclasses

import tensorflow as tf

from resnet_dist import config as config_lib
from resnet_dist.config import ALL_REDUCE
from resnet_dist.errors import ConfigError

# The names --all_reduce_dtype takes (the config's plain table) as TensorFlow's dtypes.
ALL_REDUCE_DTYPES = {name: tf.as_dtype(dtype)
                     for name, dtype in config_lib.ALL_REDUCE_DTYPES.items()}
_IMPLEMENTATIONS = {
    "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
    "ring": tf.distribute.experimental.CommunicationImplementation.RING,
}


@dataclasses.dataclass(frozen=True)
class AllReduce:
  """How a step's gradients cross the replicas.

  implementation: "nccl" or "ring" (TensorFlow's collectives, within a host
  and between hosts), "tpu" (XLA's cross-replica sum over the TPU
  interconnect) or "none" (one replica). TensorFlow groups the gradients,
  last layer first, into packs of at least pack_bytes (0: one pack), one
  collective each: a pack of the last layers can cross while the backward
  pass computes the first layers' gradients. dtype: what crosses; the
  update always reads float32.
  """
  implementation: str
  pack_bytes: int = 0
  dtype: str = "fp32"

  @property
  def by_collectives(self):
    """Whether TensorFlow's collectives carry it (nccl, ring), not XLA or nothing."""
    return self.implementation in _IMPLEMENTATIONS

  def communication(self):
    """TensorFlow's CommunicationImplementation of it; AUTO where no collective runs."""
    return _IMPLEMENTATIONS.get(
        self.implementation, tf.distribute.experimental.CommunicationImplementation.AUTO)

  def options(self):
    return tf.distribute.experimental.CommunicationOptions(
        bytes_per_pack=self.pack_bytes, implementation=self.communication())

  def sum(self, values):
    """The sum over the replicas of each of values (float32 tensors), in replica context."""
    context = tf.distribute.get_replica_context()
    if self.implementation == "none" or context.num_replicas_in_sync == 1:
      return list(values)
    wire = ALL_REDUCE_DTYPES[self.dtype]
    sums = context.all_reduce(tf.distribute.ReduceOp.SUM,
                              [tf.cast(v, wire) for v in values], options=self.options())
    return [tf.cast(total, v.dtype) for total, v in zip(sums, values)]

  def num_packs(self, values):
    """The collectives sum(values) launches: TensorFlow's grouping
    (cross_device_utils.group_by_size), last value first, each pack at
    least pack_bytes where the values last."""
    if self.implementation in ("none", "tpu"):
      return 0 if self.implementation == "none" else 1
    if not self.pack_bytes:
      return 1
    size = ALL_REDUCE_DTYPES[self.dtype].size
    packs, filled = 0, 0
    for v in reversed(values):
      if not packs or filled > self.pack_bytes:
        packs, filled = packs + 1, 0
      filled += v.shape.num_elements() * size
    return packs

  def describe(self, values):
    """"nccl, 48.8 MB a step in 2 packs (--all_reduce_pack_mb=32), in bf16"."""
    if self.implementation == "none":
      return "none (one replica)"
    if self.implementation == "tpu":
      return f"the TPU interconnect (XLA's cross-replica sum), in {self.dtype}"
    total = sum(v.shape.num_elements() for v in values) * ALL_REDUCE_DTYPES[self.dtype].size
    packs = self.num_packs(values)
    return (f"{self.implementation}, {total / 2**20:.1f} MB a step in {packs} "
            f"pack{'s' if packs > 1 else ''} (--all_reduce_pack_mb="
            f"{self.pack_bytes / 2**20:g}), in {self.dtype}")


def choose_all_reduce(distribute, kind, on_gpus):
  """The AllReduce of --all_reduce* for a strategy kind; a ConfigError where
  the implementation asked for cannot run on these devices.

  auto: NCCL between GPUs, within a host and between hosts; ring between CPUs.
  """
  requested = distribute.all_reduce
  if requested not in ALL_REDUCE:
    raise ConfigError(f"unknown --all_reduce={requested}; choose from {', '.join(ALL_REDUCE)}")
  if kind in ("one_device", "tpu"):
    if requested != "auto":
      raise ConfigError(f"--all_reduce={requested} is for mirrored and multi_worker_mirrored; "
                        f"--strategy={kind} " + ("all-reduces over the TPU interconnect"
                                                 if kind == "tpu" else "has one replica"))
    return AllReduce("tpu" if kind == "tpu" else "none", dtype=distribute.all_reduce_dtype)
  if requested == "nccl" and not on_gpus:
    raise ConfigError("--all_reduce=nccl needs GPUs; this run's replicas are CPU devices "
                      "(--all_reduce=auto or ring)")
  if on_gpus and distribute.all_reduce_dtype == "bf16":
    # NCCL has no bfloat16 in TensorFlow's NcclManager, and TensorFlow's GPU
    # collectives fail at the first step: "Collective all-reduce does not
    # support datatype DT_BFLOAT16 on DEVICE_GPU".
    raise ConfigError("--all_reduce_dtype=bf16: TensorFlow's GPU collectives (NCCL and ring) "
                      "cannot sum bfloat16; use fp16 (half the bytes too, with fp16's range) "
                      "or fp32")
  implementation = "nccl" if requested == "nccl" or (requested == "auto" and on_gpus) else "ring"
  return AllReduce(implementation, int(distribute.all_reduce_pack_mb * 2**20),
                   distribute.all_reduce_dtype)
