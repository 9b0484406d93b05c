"""The parts of a Config that say what is trained and how: the model, the
optimisation, the schedule of the run, and how its steps execute."""

import dataclasses
import math
from typing import Tuple

from resnet_dist import losses, models, optim
from resnet_dist.config import settings
from resnet_dist.config.settings import require, setting

DTYPES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  name: str = setting("resnet20", "The ResNet to train.", flag="model", choices=models.MODELS)
  resnet_variant: str = setting(
      "v1.5", "ImageNet ResNets: v1.5 (stride on the 3x3 conv), v1 (stride on the first "
      "1x1), d (ResNet-D). CIFAR ResNets ignore it.", choices=models.VARIANTS)
  zero_init_residual: bool = setting(
      False, "Start the last BN gamma of each residual block at zero.")
  drop_path_rate: float = setting(
      0.0, "Stochastic depth: in training, drop each example's residual branch of the last "
      "block with this probability, of earlier blocks less, in proportion to their place "
      "(timm's rule; RSB A1/A2: 0.05); 0: off.", at_least=0, below=1)
  sync_bn: bool = setting(False, "BatchNorm statistics over the global batch (all replicas).")
  dtype: str = setting(
      "fp32", "fp32; bf16 (mixed_bfloat16); fp16 (mixed_float16, dynamic loss scaling).",
      choices=DTYPES)

  @property
  def dtype_policy(self):
    """The Keras dtype policy of --dtype."""
    return DTYPES[self.dtype]

  def validate(self):
    settings.check(self)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """The loss, the optimizer with the settings of each (lars_eta: LARS's
  own), the learning rate and its schedule, and the EMA of the weights."""
  optimizer: str = setting("sgd", f"The optimizer. {settings.describe(optim.OPTIMIZERS)}",
                           choices=optim.OPTIMIZERS)
  loss: str = setting(
      "softmax", "softmax cross-entropy, or bce: a sigmoid per class, averaged over the "
      "classes (timm's, as in ResNet strikes back). Evaluation reports softmax cross-entropy "
      "either way.", choices=losses.LOSSES)
  base_learning_rate: float = setting(
      0.1, "Learning rate per 256 examples; scaled by global_batch_size / 256.", above=0,
      invalid="--{flag}={value} must be a positive number")
  lr_schedule: str = setting(
      "cosine", "The learning-rate schedule, its warmup included. "
      f"{settings.describe(optim.SCHEDULES)}", choices=optim.SCHEDULES)
  # The default: Goyal et al. 2017's, for 90 ImageNet epochs.
  lr_boundary_epochs: Tuple[float, ...] = setting(
      (30.0, 60.0, 80.0), "piecewise: epochs at which the learning rate drops x0.1.")
  warmup_epochs: float = setting(0.0, "Linear warmup length.", at_least=0)
  warmup_learning_rate: float = setting(
      1e-5, "timm_cosine, torchvision_cosine: the learning rate of the first epoch, absolute "
      "(timm's --warmup-lr; torchvision's --lr-warmup-decay times the peak).", at_least=0)
  momentum: float = setting(0.9, "Momentum.", at_least=0)
  nesterov: bool = setting(False, "Nesterov momentum.")
  lars_eta: float = setting(
      0.001, "--optimizer=lars: the trust coefficient eta of each layer's learning rate, "
      "eta * |w| / |g|.", above=0)
  weight_decay: float = setting(1e-4, "L2 decay of conv and dense kernels.", at_least=0)
  label_smoothing: float = setting(0.0, "Label smoothing.", at_least=0, at_most=1)
  bce_target_threshold: float = setting(
      0.0, "--loss=bce: each class's target (smoothed, mixed) becomes 1 above this and 0 "
      "elsewhere, as timm's --bce-target-thresh (RSB: 0.2); 0: off.", at_least=0, below=1)
  ema_decay: float = setting(
      0.0, "Keep an exponential moving average of the weights and BN statistics, with this "
      "decay per step (0: none); evaluated beside the weights.", at_least=0, below=1)
  ema_every_steps: int = setting(
      1, "Update the EMA every this many steps, by ema_decay**K.", at_least=1)

  def validate(self):
    settings.check(self)
    epochs = self.lr_boundary_epochs
    require(epochs and list(epochs) == sorted(set(epochs)) and epochs[0] > 0,
            f"--lr_boundary_epochs={','.join(map(str, epochs))} must be increasing positive "
            f"epochs")
    require(not self.bce_target_threshold or self.loss == "bce",
            f"--bce_target_threshold is for --loss=bce, not --loss={self.loss}")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """The run's schedule: its batch, its length, its loops and evaluations."""
  global_batch_size: int = setting(
      128, "Examples per step over all replicas.", at_least=1,
      invalid="--{flag} must be positive")
  grad_accum_steps: int = setting(
      1, "Micro-batches per update: each step's batch is split into this many forward and "
      "backward passes.", at_least=1)
  train_epochs: float = setting(30.0, "Epochs to train.", at_least=0)
  train_steps: int = setting(0, "Steps to train; > 0 overrides --train_epochs.", at_least=0)
  steps_per_loop: int = setting(10, "Steps run inside one tf.function call.", at_least=1)
  stop_check_steps: int = setting(
      10, "Steps run back to back, no step waiting for the one before to reach the host; a "
      "stop (a signal to any worker) takes effect within this many.", at_least=1)
  epochs_between_evals: float = setting(
      0.0, "Evaluate every this many epochs; 0: at the end only.", at_least=0)
  skip_eval: bool = setting(False, "Never evaluate.")

  @property
  def micro_batch_size(self):
    """Examples per forward and backward pass, over all replicas."""
    return self.global_batch_size // self.grad_accum_steps

  def total_steps(self, steps_per_epoch):
    return self.train_steps or math.ceil(self.train_epochs * steps_per_epoch)

  def validate(self):
    settings.check(self)
    require(self.train_steps > 0 or self.train_epochs > 0,
            "set --train_steps or --train_epochs to a positive value")
    require(self.global_batch_size % self.grad_accum_steps == 0,
            f"--global_batch_size={self.global_batch_size} does not divide into "
            f"--grad_accum_steps={self.grad_accum_steps} micro-batches")


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
  """How the steps execute: compiled or not, from which seed, whether
  deterministically, and how long a run may make no progress."""
  enable_xla: bool = setting(
      False, "Compile with XLA: the whole replica step on one device and on TPUs; forward and "
      "backward over several GPUs, the all-reduce and update outside (docs/distributed.md).")
  seed: int = setting(0, "Seed of initialisation, data order and augmentation.")
  deterministic: bool = setting(
      False, "Deterministic kernels and training input in order: bit-identical reruns and "
      "resumes, the same batches on any strategy; slower. Without it a slow image holds up "
      "nothing and each example keeps its augmentation.")
  progress_timeout_seconds: int = setting(
      1800, "A run whose steps, saves or evaluations make no progress for this long (a stuck "
      "peer, a read that never returns) ends with one line and status 70, for its launcher to "
      "restart it; longer than your slowest evaluation or save. 0: never.", at_least=0,
      invalid="--{flag} must be 0 (off) or more")

  def validate(self):
    settings.check(self)
