"""A run's settings, as one typed object that checks itself: the library never
reads absl flags.

flags/ defines one flag per field and converts the flags into a Config once;
tests and notebooks build one directly. Config.validate() is the one place
where settings are checked against each other and against the choices the
library offers, before any TensorFlow work.
"""

import dataclasses
import math
from typing import Optional, Tuple

from resnet_dist import losses, models, optim
from resnet_dist import strategy as strategy_lib
from resnet_dist.errors import ConfigError

DTYPES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}

# The choices of each enumerated field, checked by validate().
CHOICES = {
    "model": models.list_models(),
    "resnet_variant": models.VARIANTS,
    "strategy": strategy_lib.STRATEGIES,
    "dtype": tuple(DTYPES),
    "optimizer": optim.OPTIMIZERS,
    "lr_schedule": optim.SCHEDULES,
    "loss": tuple(losses.LOSSES),
}


@dataclasses.dataclass(frozen=True)
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
  num_gpus: Optional[int] = None    # None: every visible GPU
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
  optimizer: str = "sgd"           # sgd (momentum), lars, lamb
  loss: str = "softmax"            # softmax cross-entropy, or bce (one sigmoid per class)
  base_learning_rate: float = 0.1   # per 256 examples
  lr_schedule: str = "cosine"
  # piecewise: x0.1 at each (Goyal et al. 2017, for 90 ImageNet epochs)
  lr_boundary_epochs: Tuple[float, ...] = (30.0, 60.0, 80.0)
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
  profile_steps: Optional[Tuple[int, int]] = None  # (START, END): trace START..END-1
  peak_tflops: float = 0.0          # the hardware's peak, for FLOP utilisation; 0: measure

  @property
  def policy(self):
    return DTYPES[self.dtype]

  def validate(self):
    """Raises ConfigError naming the first setting that cannot work."""
    for name, choices in CHOICES.items():
      if getattr(self, name) not in choices:
        raise ConfigError(f"unknown --{name}={getattr(self, name)}; choose from "
                          f"{', '.join(choices)}")
    _check(self.image_size >= 32, f"--image_size={self.image_size} is below the minimum of 32")
    _check(self.global_batch_size >= 1, "--global_batch_size must be positive")
    _check(self.train_steps > 0 or self.train_epochs > 0,
           "set --train_steps or --train_epochs to a positive value")
    _check(self.steps_per_loop >= 1, "--steps_per_loop must be at least 1")
    _check(math.isfinite(self.base_learning_rate) and self.base_learning_rate > 0,
           f"--base_learning_rate={self.base_learning_rate} must be a positive number")
    _check(not self.tpu or self.strategy in ("tpu", "auto"),
           f"--tpu={self.tpu} is for --strategy=tpu, not --strategy={self.strategy}")
    epochs = self.lr_boundary_epochs
    _check(epochs and list(epochs) == sorted(set(epochs)) and epochs[0] > 0,
           f"--lr_boundary_epochs={','.join(map(str, epochs))} must be increasing positive "
           f"epochs")
    if self.profile_steps is not None:
      start, end = self.profile_steps
      _check(0 <= start < end,
             f"--profile_steps={start},{end} must be START,END with 0 <= START < END")
    return self


def _check(condition, message):
  if not condition:
    raise ConfigError(message)
