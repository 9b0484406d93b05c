"""A run's settings: a Config of typed parts, one per concern, each frozen and
checking itself. The library never reads absl flags.

  model       which network, its numerics          (ModelConfig)
  data        what it reads, at which image sizes  (DataConfig)
  augment     what training does to each image     (AugmentConfig)
  optim       loss, optimizer, learning rate, EMA  (OptimConfig)
  schedule    batch, length, loops, evaluations,   (ScheduleConfig)
              seed and determinism
  distribute  where it runs                        (DistributeConfig)
  checkpoint  model_dir and what is saved there    (CheckpointConfig)
  monitor     console, TensorBoard, profiling      (MonitorConfig)

Code takes the part it needs (a Trainer's optimizer reads config.optim). A
field is named as its flag (--weight_decay is optim.weight_decay), but for
--model (model.name) and --augment (augment.policy): FLAG_FIELDS says where
each flag goes, and Config.from_flat() builds a Config from flag-named
values, as flags/ does and as tests and notebooks may. validate() checks each
part, then what spans parts, before any TensorFlow work.
"""

import dataclasses
import math
from typing import Optional, Tuple

from resnet_dist import losses, models, optim
from resnet_dist.data import augment as augment_lib
from resnet_dist.data import mixing, preprocess, service
from resnet_dist import cluster as cluster_lib
from resnet_dist import strategy as strategy_lib
from resnet_dist import collectives
from resnet_dist.errors import ConfigError

DTYPES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}

# Image sides above this are refused before any work: a ResNet's activations
# grow with the square of the side (at 1024, 21 times those at 224), so a
# larger size would run out of memory only after the data and the model had
# been prepared.
MAX_IMAGE_SIZE = 1024
_TOO_LARGE = "the activations grow with the square of the side"


def _check(condition, message):
  if not condition:
    raise ConfigError(message)


def _check_choice(flag, value, choices):
  _check(value in choices, f"unknown --{flag}={value}; choose from {', '.join(choices)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  name: str = "resnet20"            # --model
  resnet_variant: str = "v1.5"
  zero_init_residual: bool = False
  drop_path_rate: float = 0.0       # stochastic depth at the last block (timm's rule)
  sync_bn: bool = False
  dtype: str = "fp32"

  @property
  def dtype_policy(self):
    """The Keras dtype policy of --dtype."""
    return DTYPES[self.dtype]

  def validate(self):
    _check_choice("model", self.name, models.list_models())
    _check_choice("resnet_variant", self.resnet_variant, models.VARIANTS)
    _check_choice("dtype", self.dtype, tuple(DTYPES))
    _check(0 <= self.drop_path_rate < 1, f"--drop_path_rate={self.drop_path_rate} must be "
           f"in [0, 1)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str = "digits"
  data_dir: str = ""
  download: bool = False
  num_classes: int = 1000           # synthetic and imagenet; others know theirs
  shuffle_buffer: int = 10000       # records; TFRecord datasets
  crop: str = ""                    # a preprocess.CROPS entry; "": the dataset's own
  interpolation: str = "bilinear"   # a preprocess.INTERPOLATIONS entry: resizes, augment geometry
  antialias: bool = False           # shrink as PIL and torchvision (the recipes' choice)
  repeated_augmentations: int = 1   # copies of each training example an epoch (RASampler)
  cache_data: bool = False
  strict_data: bool = False
  data_service: str = ""            # HOST:PORT of a tf.data service dispatcher; "": local input
  data_service_timeout_seconds: int = 60
  image_size: int = 32              # training's, and the model's where it is fixed
  eval_image_size: int = 0          # 0: image_size
  eval_resize_size: int = 0         # 0: eval_image_size / 0.875 (the central 87.5%)
  # (START, END, FROM_EPOCH, TO_EPOCH): training size ramps START -> END
  progressive_resize: Optional[Tuple[int, int, float, float]] = None

  @property
  def eval_size(self):
    return self.eval_image_size or self.image_size

  @property
  def eval_crop_fraction(self):
    """The share of the shorter side the evaluation crop keeps (inception style)."""
    if not self.eval_resize_size:
      return preprocess.EVAL_CROP_FRACTION
    return self.eval_size / self.eval_resize_size

  @property
  def fixed_size(self):
    """Whether every image the model sees, in training and evaluation, is image_size."""
    return self.progressive_resize is None and self.eval_size == self.image_size

  def train_image_size(self, epoch):
    """The training images' size at `epoch` (steps done / steps per epoch):
    --image_size, or --progressive_resize's ramp (FFCV's, on a continuous
    epoch): START until FROM_EPOCH, then linearly in steps of 32 pixels to
    END, reached at TO_EPOCH."""
    if self.progressive_resize is None:
      return self.image_size
    start, end, first, last = self.progressive_resize
    progress = min(max((epoch - first) / (last - first), 0.0), 1.0)
    return end if progress == 1 else start + round(progress * (end - start) / 32) * 32

  def validate(self):
    if self.crop:
      _check_choice("crop", self.crop, preprocess.CROPS)
    _check_choice("interpolation", self.interpolation, preprocess.INTERPOLATIONS)
    for flag, size in (("image_size", self.image_size), ("eval_image_size", self.eval_size)):
      _check(size >= 32, f"--{flag}={size} is below the minimum of 32")
      _check(size <= MAX_IMAGE_SIZE, f"--{flag}={size} is above the maximum of "
             f"{MAX_IMAGE_SIZE}: {_TOO_LARGE}")
    _check(not self.eval_resize_size or self.eval_resize_size >= self.eval_size,
           f"--eval_resize_size={self.eval_resize_size} is smaller than the evaluation crop "
           f"({self.eval_size})")
    if self.progressive_resize is not None:
      start, end, first, last = self.progressive_resize
      _check(max(start, end) <= MAX_IMAGE_SIZE,
             f"--progressive_resize sizes must be at most {MAX_IMAGE_SIZE}: {_TOO_LARGE}")
      _check(32 <= start and 32 <= end and 0 <= first < last,
             f"--progressive_resize={':'.join(f'{v:g}' for v in self.progressive_resize)} must "
             f"be START:END:FROM_EPOCH:TO_EPOCH with sizes >= 32 and FROM_EPOCH < TO_EPOCH")
    _check(self.repeated_augmentations >= 1,
           f"--repeated_augmentations={self.repeated_augmentations} must be >= 1")
    _check(self.repeated_augmentations == 1 or not self.data_service,
           "--repeated_augmentations does not go with --data_service: the service's workers "
           "take the epoch's examples in any order, so the copies cannot be dealt to replicas")
    if self.data_service:
      self._validate_service()

  def _validate_service(self):
    service.check_address(self.data_service)
    _check(self.data_service_timeout_seconds >= 1, "--data_service_timeout_seconds must be >= 1")
    _check(self.dataset != "synthetic",
           "--data_service has nothing to do for --dataset=synthetic (no input work)")
    _check(not self.cache_data,
           "--data_service and --cache_data do not go together: the cached records would "
           "travel to the service inside the dataset's definition; its workers read the files")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  policy: str = "none"              # --augment: an augment.POLICIES entry or timm's spec
  # A policy's own settings (augment.RandAugment reads and checks these):
  randaugment_num_ops: int = 2
  randaugment_magnitude: int = 9    # of 31 bins, as torchvision's RandAugment
  random_erasing: float = 0.0       # probability per image
  random_erasing_fill: str = "noise"  # a mixing.ERASING_FILLS entry
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0

  @property
  def mixes(self):
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0

  def validate(self):
    try:
      augment_lib.policy(self.policy)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    _check(self.mixup_alpha >= 0 and self.cutmix_alpha >= 0,
           "--mixup_alpha and --cutmix_alpha must be >= 0")
    _check(0 <= self.random_erasing <= 1,
           f"--random_erasing={self.random_erasing} must be a probability")
    _check_choice("random_erasing_fill", self.random_erasing_fill, mixing.ERASING_FILLS)
    try:  # each policy checks its own settings
      augment_lib.check_settings(self)
    except ValueError as e:
      raise ConfigError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  optimizer: str = "sgd"            # an optim.OPTIMIZERS entry
  loss: str = "softmax"             # softmax cross-entropy, or bce (one sigmoid per class)
  base_learning_rate: float = 0.1   # per 256 examples
  lr_schedule: str = "cosine"       # an optim.SCHEDULES entry
  # piecewise: x0.1 at each (Goyal et al. 2017, for 90 ImageNet epochs)
  lr_boundary_epochs: Tuple[float, ...] = (30.0, 60.0, 80.0)
  warmup_epochs: float = 0.0
  warmup_learning_rate: float = 1e-5  # the per-epoch schedules: the first epoch's (absolute) rate
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 1e-4
  label_smoothing: float = 0.0
  bce_target_threshold: float = 0.0  # bce: targets above it 1, the rest 0 (timm's); 0: off
  ema_decay: float = 0.0            # per step; 0: no EMA of the weights
  ema_every_steps: int = 1          # update the EMA every K steps, by ema_decay**K

  def validate(self):
    _check_choice("optimizer", self.optimizer, optim.OPTIMIZERS)
    _check_choice("lr_schedule", self.lr_schedule, optim.SCHEDULES)
    _check_choice("loss", self.loss, losses.LOSSES)
    _check(math.isfinite(self.base_learning_rate) and self.base_learning_rate > 0,
           f"--base_learning_rate={self.base_learning_rate} must be a positive number")
    epochs = self.lr_boundary_epochs
    _check(epochs and list(epochs) == sorted(set(epochs)) and epochs[0] > 0,
           f"--lr_boundary_epochs={','.join(map(str, epochs))} must be increasing positive "
           f"epochs")
    _check(0 <= self.bce_target_threshold < 1,
           f"--bce_target_threshold={self.bce_target_threshold} must be in [0, 1)")
    _check(not self.bce_target_threshold or self.loss == "bce",
           f"--bce_target_threshold is for --loss=bce, not --loss={self.loss}")
    _check(0 <= self.ema_decay < 1, f"--ema_decay={self.ema_decay} must be in [0, 1)")
    _check(self.ema_every_steps >= 1, "--ema_every_steps must be at least 1")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  global_batch_size: int = 128
  grad_accum_steps: int = 1         # micro-batches per update
  train_epochs: float = 30.0
  train_steps: int = 0              # > 0 overrides train_epochs
  steps_per_loop: int = 10
  stop_check_steps: int = 10         # steps run back to back between looks at a stop request
  epochs_between_evals: float = 0.0  # 0: evaluate at the end only
  skip_eval: bool = False
  enable_xla: bool = False
  seed: int = 0
  deterministic: bool = False
  # No progress between host loops, saves and evaluations for this long ends
  # the run (watchdog.STALLED) so that it is restarted; 0: never.
  progress_timeout_seconds: int = 1800

  @property
  def micro_batch_size(self):
    """Examples per forward and backward pass, over all replicas."""
    return self.global_batch_size // self.grad_accum_steps

  def total_steps(self, steps_per_epoch):
    return self.train_steps or math.ceil(self.train_epochs * steps_per_epoch)

  def validate(self):
    _check(self.global_batch_size >= 1, "--global_batch_size must be positive")
    _check(self.train_steps > 0 or self.train_epochs > 0,
           "set --train_steps or --train_epochs to a positive value")
    _check(self.steps_per_loop >= 1, "--steps_per_loop must be at least 1")
    _check(self.stop_check_steps >= 1, "--stop_check_steps must be at least 1")
    _check(self.grad_accum_steps >= 1, "--grad_accum_steps must be at least 1")
    _check(self.progress_timeout_seconds >= 0,
           "--progress_timeout_seconds must be 0 (off) or more")
    _check(self.global_batch_size % self.grad_accum_steps == 0,
           f"--global_batch_size={self.global_batch_size} does not divide into "
           f"--grad_accum_steps={self.grad_accum_steps} micro-batches")


@dataclasses.dataclass(frozen=True)
class DistributeConfig:
  strategy: str = "auto"
  num_gpus: Optional[int] = None    # None: every visible GPU
  num_cpu_devices: int = 2
  tpu: str = ""
  tpu_zone: Optional[str] = None
  gcp_project: Optional[str] = None
  collective_timeout_seconds: int = 0   # 0: no timeout (a debugging aid)
  cluster: str = "auto"             # where the cluster is read from (cluster.SOURCES)
  cluster_port: int = 0             # SLURM: the tasks' first port; 0: from the job ID
  all_reduce: str = "auto"          # the gradients' collective (collectives.ALL_REDUCE)
  all_reduce_pack_mb: float = 32.0  # 0: one pack
  all_reduce_dtype: str = "fp32"    # what crosses the wire
  gpu_thread_mode: str = "gpu_private"  # strategy.GPU_THREAD_MODES

  def validate(self):
    _check_choice("strategy", self.strategy, strategy_lib.STRATEGIES)
    _check_choice("gpu_thread_mode", self.gpu_thread_mode, strategy_lib.GPU_THREAD_MODES)
    _check_choice("cluster", self.cluster, cluster_lib.SOURCES)
    _check_choice("all_reduce", self.all_reduce, collectives.ALL_REDUCE)
    _check_choice("all_reduce_dtype", self.all_reduce_dtype, tuple(collectives.ALL_REDUCE_DTYPES))
    _check(self.all_reduce_pack_mb >= 0, "--all_reduce_pack_mb must be 0 (one pack) or more")
    _check(not self.tpu or self.strategy in ("tpu", "auto"),
           f"--tpu={self.tpu} is for --strategy=tpu, not --strategy={self.strategy}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  model_dir: str = ""
  init_checkpoint: str = ""         # fine-tune from another run's weights
  checkpoint_every_steps: int = 0   # 0: every epoch (and at evaluations and the end)
  start_over: bool = False          # train from step 0, replacing model_dir's checkpoints
  keep_checkpoints: int = 3
  # This host's GCE metadata server (computeMetadata/v1), watched for
  # preemption and maintenance notices with model_dir/notices; "": neither.
  gce_metadata: str = ""

  def validate(self):
    _check(self.keep_checkpoints >= 1, "--keep_checkpoints must be at least 1")
    _check(not self.gce_metadata or self.gce_metadata.startswith(("http://", "https://")),
           f"--gce_metadata={self.gce_metadata} is not an http:// URL")


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
  log_every_steps: int = 10
  profile_steps: Optional[Tuple[int, int]] = None  # (START, END): trace START..END-1
  peak_tflops: float = 0.0          # the hardware's peak, for FLOP utilisation; 0: measure

  def validate(self):
    _check(self.log_every_steps >= 1, "--log_every_steps must be at least 1")
    if self.profile_steps is not None:
      start, end = self.profile_steps
      _check(0 <= start < end,
             f"--profile_steps={start},{end} must be START,END with 0 <= START < END")


# Where a flag's value goes when it is not the field of the same name.
FLAG_FIELDS = {"model": ("model", "name"), "augment": ("augment", "policy")}


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  augment: AugmentConfig = AugmentConfig()
  optim: OptimConfig = OptimConfig()
  schedule: ScheduleConfig = ScheduleConfig()
  distribute: DistributeConfig = DistributeConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  monitor: MonitorConfig = MonitorConfig()

  @classmethod
  def from_flat(cls, **values):
    """A Config from flag-named values (model="resnet50", weight_decay=5e-5, ...);
    a name no part has is a TypeError, as for any keyword."""
    return cls().replace(**values)

  def replace(self, **values):
    """A copy with flag-named values changed, each in its part."""
    changes = {}
    for name, value in values.items():
      part, field = flag_field(name)
      changes.setdefault(part, {})[field] = value
    return dataclasses.replace(self, **{part: dataclasses.replace(getattr(self, part), **fields)
                                        for part, fields in changes.items()})

  def to_dict(self):
    """{part: {field: value}}, as run.json records it."""
    return dataclasses.asdict(self)

  def flag_values(self):
    """{flag name: value} of every setting, as the command line names them."""
    values = {}
    for name in flag_names():
      part, field = flag_field(name)
      values[name] = getattr(getattr(self, part), field)
    return values

  def validate(self):
    """Raises ConfigError naming the first setting that cannot work."""
    for name, value in self.flag_values().items():
      numbers = value if isinstance(value, tuple) else (value,)
      _check(all(math.isfinite(v) for v in numbers if isinstance(v, float)),
             f"--{name}={value} is not a finite number")
    for part in dataclasses.fields(self):
      getattr(self, part.name).validate()
    _check(not (self.data.data_service and self.schedule.deterministic),
           "--data_service and --deterministic do not go together: the service's workers "
           "make batches in an order that differs from run to run")
    return self


def flag_field(name):
  """(part, field) of the flag --name; a TypeError for a name no part has."""
  if name in FLAG_FIELDS:
    return FLAG_FIELDS[name]
  for part in dataclasses.fields(Config):
    if name in {f.name for f in dataclasses.fields(part.type)}:
      return part.name, name
  raise TypeError(f"no part of Config has a setting {name!r}")


def flag_names():
  """Every flag a Config takes, part by part."""
  fields = {value: key for key, value in FLAG_FIELDS.items()}
  return [fields.get((part.name, f.name), f.name)
          for part in dataclasses.fields(Config) for f in dataclasses.fields(part.type)]
