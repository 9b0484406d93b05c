"""A run's settings, as one plain object: the library never reads absl flags.

flags/ defines one flag per field and builds a Config; tests and notebooks
build one directly.
"""

import dataclasses
from typing import Optional

DTYPES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


@dataclasses.dataclass
class Config:
  # Model
  model: str = "resnet20"
  resnet_variant: str = "v1.5"
  image_size: int = 32
  zero_init_residual: bool = False
  sync_bn: bool = False
  # Data
  dataset: str = "digits"
  data_dir: str = ""
  download: bool = False
  num_classes: int = 1000           # synthetic and imagenet; others know theirs
  shuffle_buffer: int = 10000       # records; TFRecord datasets
  cache_data: bool = False
  strict_data: bool = False
  # Distribution
  strategy: str = "auto"
  num_gpus: Optional[int] = None
  num_cpu_devices: int = 2
  tpu: str = ""
  tpu_zone: Optional[str] = None
  gcp_project: Optional[str] = None
  collective_timeout_seconds: int = 0   # 0: no timeout (a debugging aid)
  # Training
  global_batch_size: int = 128
  train_epochs: float = 30.0
  train_steps: int = 0              # > 0 overrides train_epochs
  steps_per_loop: int = 10
  epochs_between_evals: float = 0.0  # 0: evaluate at the end only
  skip_eval: bool = False
  dtype: str = "fp32"
  enable_xla: bool = False
  optimizer: str = "sgd"
  base_learning_rate: float = 0.1   # per 256 examples
  lr_schedule: str = "cosine"
  lr_boundary_epochs: str = "30,60,80"  # piecewise: x0.1 at each
  warmup_epochs: float = 0.0
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 1e-4
  label_smoothing: float = 0.0
  seed: int = 0
  deterministic: bool = False
  # Checkpointing
  model_dir: str = ""
  init_checkpoint: str = ""         # fine-tune from another run's weights
  checkpoint_every_steps: int = 0   # 0: every epoch (and at evaluations and the end)
  start_over: bool = False          # train from step 0, replacing model_dir's checkpoints
  keep_checkpoints: int = 3
  # Monitoring
  log_every_steps: int = 10
  profile_steps: str = ""           # "START,END": trace steps START..END-1
  peak_tflops: float = 0.0          # the hardware's peak, for FLOP utilisation; 0: measure

  @property
  def policy(self):
    return DTYPES[self.dtype]
