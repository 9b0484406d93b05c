"""The parts of a Config that say where a run runs and what it leaves: the
distribution, the checkpoints, the console and TensorBoard.

The choices of the distribution's settings are named here, beside their
fields, and strategy.py maps each to what it builds: the settings can be
read and checked without importing strategy.py, which sets TensorFlow up as
it loads.
"""

import dataclasses
from typing import Optional, Tuple

from resnet_dist import cluster as cluster_lib
from resnet_dist import preemption
from resnet_dist.config import settings
from resnet_dist.config.settings import require, setting

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
ALL_REDUCE = ("auto", "nccl", "ring")
# --all_reduce_dtype -> the TensorFlow dtype the gradients cross in.
ALL_REDUCE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
GPU_THREAD_MODES = ("gpu_private", "gpu_shared", "global")


@dataclasses.dataclass(frozen=True)
class DistributeConfig:
  """The strategy, its devices and cluster, and how gradients cross between replicas."""
  strategy: str = setting(
      "auto", "auto: multi_worker_mirrored where TF_CONFIG names several tasks, else a TPU if "
      "--tpu names one or one is attached, else mirrored over GPUs, else over "
      "--num_cpu_devices logical CPU devices.", choices=STRATEGIES)
  num_gpus: Optional[int] = setting(None, "GPUs for mirrored; default all visible.", at_least=0)
  num_cpu_devices: int = setting(
      2, "Logical CPU devices for mirrored when there is no GPU.", at_least=1)
  tpu: str = setting(
      "", "local (a single-host TPU VM), a Cloud TPU name (a pod slice, from its worker 0; a "
      "TPU node), or grpc://HOST:PORT. Default: $TPU_NAME.")
  tpu_zone: Optional[str] = setting(None, "Zone of a named Cloud TPU.")
  gcp_project: Optional[str] = setting(None, "Project of a named Cloud TPU.")
  collective_timeout_seconds: int = setting(
      0, "multi_worker_mirrored, for debugging: a collective that waits longer fails the run. "
      "Each collective then holds a thread for this long; 0: off (a dead peer is found by "
      "heartbeats).", at_least=0)
  cluster: str = setting(
      "auto", "Where the cluster of a multi-worker run is read; auto: TF_CONFIG if set, else "
      "an srun job step (slurm), else a pod of an Indexed Job (kubernetes).",
      choices=cluster_lib.SOURCES)
  cluster_port: int = setting(
      0, "SLURM: the port of each node's first task (the next tasks take the next ports); 0: "
      "one derived from the job ID.", at_least=0)
  all_reduce: str = setting(
      "auto", "The gradients' collective between replicas; auto: NCCL between GPUs, within and "
      "across hosts, ring between CPUs.", choices=ALL_REDUCE)
  all_reduce_pack_mb: float = setting(
      32.0, "The gradients cross in packs of at least this many MB, the last layers' first, so "
      "a pack can cross while the backward pass goes on; 0: one pack.", at_least=0,
      invalid="--{flag} must be 0 (one pack) or more")
  all_reduce_dtype: str = setting(
      "fp32", "The gradients' dtype on the wire (fp16, bf16: half the bytes); the update reads "
      "them back as float32.", choices=ALL_REDUCE_DTYPES)
  gpu_thread_mode: str = setting(
      "gpu_private", "gpu_private: each GPU gets 2 threads of its own to launch its kernels "
      "(TF_GPU_THREAD_MODE, set before TensorFlow creates the GPUs; one you set wins); global: "
      "TensorFlow's one shared pool.", choices=GPU_THREAD_MODES)

  def validate(self):
    settings.check(self)
    require(not self.tpu or self.strategy in ("tpu", "auto"),
            f"--tpu={self.tpu} is for --strategy=tpu, not --strategy={self.strategy}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """model_dir, the weights a run starts from, and which checkpoints it keeps."""
  model_dir: str = setting(
      "", "Checkpoints, summaries and summary.json; an existing run resumes. Empty: "
      "runs/MODEL-DATASET-TIMESTAMP.")
  init_checkpoint: str = setting(
      "", "Start from another run's weights (its model_dir or a checkpoint); the classifier "
      "starts fresh when the number of classes differs. Ignored when model_dir has a "
      "checkpoint to resume.")
  checkpoint_every_steps: int = setting(
      0, "Save every this many steps (also at evaluations and at the end); 0: once an epoch.",
      at_least=0)
  start_over: bool = setting(
      False, "Train from step 0 even though model_dir has checkpoints, deleting them.")
  keep_checkpoints: int = setting(3, "Checkpoints kept.", at_least=1)
  gce_metadata: str = setting(
      "", "The GCE metadata server's computeMetadata/v1 URL (on GCE and TPU VMs: "
      f"{preemption.METADATA_URL}): a preemption or maintenance notice there, or a host's in "
      "model_dir/notices, stops the run after a step, saved (exit 75). Empty: not watched.")

  def validate(self):
    settings.check(self)
    require(not self.gce_metadata or self.gce_metadata.startswith(("http://", "https://")),
            f"--gce_metadata={self.gce_metadata} is not an http:// URL")


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
  """The console, TensorBoard and the profiler."""
  log_every_steps: int = setting(10, "Print a progress line every this many steps.", at_least=1)
  profile_steps: Optional[Tuple[int, int]] = setting(
      None, "START,END: trace steps START to END-1 with tf.profiler into "
      "model_dir/plugins/profile (TensorBoard's Profile tab).")
  peak_tflops: float = setting(
      0.0, "Peak TFLOP/s of all replicas together, for the FLOP utilisation summary; 0: "
      "measure a matmul on the replicas at start.", at_least=0)

  def validate(self):
    settings.check(self)
    if self.profile_steps is not None:
      start, end = self.profile_steps
      require(0 <= start < end,
              f"--profile_steps={start},{end} must be START,END with 0 <= START < END")
