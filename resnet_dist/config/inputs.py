"""The parts of a Config that say what the model reads: the data, at which
sizes, and what training does to each image."""

import dataclasses
from typing import Optional, Tuple

from resnet_dist import data
from resnet_dist.config import settings
from resnet_dist.config.settings import require, setting
from resnet_dist.data import augment as augment_lib
from resnet_dist.data import mixing, preprocess, service
from resnet_dist.errors import ConfigError

# Image sides outside these are refused before any work: a ResNet's
# activations grow with the square of the side (at 1024, 21 times those at
# 224), so a larger size would run out of memory only after the data and the
# model had been prepared.
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 1024
_TOO_SMALL = f"--{{flag}}={{value}} is below the minimum of {MIN_IMAGE_SIZE}"
_TOO_LARGE = "the activations grow with the square of the side"
# One error for the two settings of a policy, and for the two mixings.
_RANDAUGMENT = (f"--randaugment_num_ops must be >= 1 and --randaugment_magnitude in "
                f"0..{augment_lib.BINS - 1}")
_MIXING = "--mixup_alpha and --cutmix_alpha must be >= 0"


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What a run reads, how it makes images of it, and at which sizes."""
  dataset: str = setting("digits", data.DATASETS_HELP + ".")
  data_dir: str = setting(
      "", "Where datasets live (local or gs://): ImageNet's TFRecords, or TFDS's directory "
      "(empty: $TFDS_DATA_DIR or ~/tensorflow_datasets).")
  download: bool = setting(False, "Allow TFDS to download and prepare a missing dataset.")
  num_classes: int = setting(
      1000, "Classes of --dataset=synthetic or imagenet (the others know theirs).", at_least=2)
  shuffle_buffer: int = setting(
      10000, "Records in each input pipeline's shuffle buffer (TFRecord datasets).", at_least=1)
  crop: str = setting(
      "", "Training's crop; empty: the dataset's (inception above 64 pixels, pad_crop_flip at "
      "64 or less). inception: MLPerf's and Model Garden's sampler (at least 10% of the image "
      "covered); random_resized: torchvision's RandomResizedCrop, which timm uses too.",
      choices=preprocess.CROPS, blank=True)
  interpolation: str = setting(
      "bilinear", "How every resize samples, in training and evaluation, and the geometric ops "
      "of --augment (nearest, or else bilinear). random: each training crop bilinear or bicubic "
      "at even odds, every other resize bicubic (timm's).", choices=preprocess.INTERPOLATIONS)
  antialias: bool = setting(
      False, "Antialias every shrink, as PIL and torchvision do (their recipes and weights "
      "expect it); it costs about as much input CPU as decoding.")
  repeated_augmentations: int = setting(
      1, "Repeated augmentation, as torchvision's RASampler: each epoch takes a random N-th of "
      "the training examples, each N times, augmented apart, on N replicas; the epoch keeps "
      "its length; 1: off.", at_least=1, invalid="--{flag}={value} must be >= 1")
  cache_data: bool = setting(
      False, "Read a TFRecord dataset into memory once at start (each worker holds all of it): "
      "a fresh permutation every epoch and the same global batches on any number of replicas.")
  strict_data: bool = setting(
      False, "Stop at the first undecodable image, naming its file, instead of skipping and "
      "counting it.")
  data_service: str = setting(
      "", "HOST:PORT of a tf.data service dispatcher (python -m launch.data_service): its "
      "workers read, decode, augment and batch the training input. Evaluation stays local.")
  data_service_timeout_seconds: int = setting(
      60, "How long a run waits for the service's dispatcher at start, and how long one that "
      "stops answering (or loses every worker) mid-run, before it stops.", at_least=1,
      invalid="--{flag} must be >= 1")
  image_size: int = setting(
      32, "Training's image height and width, and the model's where it is fixed; at most "
      f"{MAX_IMAGE_SIZE}.", at_least=MIN_IMAGE_SIZE, invalid=_TOO_SMALL)
  eval_image_size: int = setting(0, "Evaluation image size; 0: --image_size.", at_least=0)
  eval_resize_size: int = setting(
      0, "ImageNet-style evaluation as torchvision and timm: the shorter side resized to this, "
      "then the central eval_image_size (232 with 224: torchvision's); 0: the central 87.5%, "
      "then resized (MLPerf's).", at_least=0)
  progressive_resize: Optional[Tuple[int, int, float, float]] = setting(
      None, "START:END:FROM_EPOCH:TO_EPOCH: training images grow from START to END pixels, in "
      "steps of 32, between the two epochs (FFCV's ramp).")

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
    settings.check(self)
    self._validate_sizes()
    require(self.repeated_augmentations == 1 or not self.data_service,
            "--repeated_augmentations does not go with --data_service: the service's workers "
            "take the epoch's examples in any order, so the copies cannot be dealt to replicas")
    if self.data_service:
      self._validate_service()

  def _validate_sizes(self):
    """The sizes that follow from others: evaluation's (0: image_size), the ramp's."""
    require(self.eval_size >= MIN_IMAGE_SIZE,
            _TOO_SMALL.format(flag="eval_image_size", value=self.eval_size))
    for flag, size in (("image_size", self.image_size), ("eval_image_size", self.eval_size)):
      require(size <= MAX_IMAGE_SIZE, f"--{flag}={size} is above the maximum of "
              f"{MAX_IMAGE_SIZE}: {_TOO_LARGE}")
    require(not self.eval_resize_size or self.eval_resize_size >= self.eval_size,
            f"--eval_resize_size={self.eval_resize_size} is smaller than the evaluation crop "
            f"({self.eval_size})")
    if self.progressive_resize is not None:
      start, end, first, last = self.progressive_resize
      require(max(start, end) <= MAX_IMAGE_SIZE,
              f"--progressive_resize sizes must be at most {MAX_IMAGE_SIZE}: {_TOO_LARGE}")
      require(MIN_IMAGE_SIZE <= min(start, end) and 0 <= first < last,
              f"--progressive_resize={':'.join(f'{v:g}' for v in self.progressive_resize)} must "
              f"be START:END:FROM_EPOCH:TO_EPOCH with sizes >= {MIN_IMAGE_SIZE} and "
              f"FROM_EPOCH < TO_EPOCH")

  def _validate_service(self):
    service.check_address(self.data_service)
    require(self.dataset != "synthetic",
            "--data_service has nothing to do for --dataset=synthetic (no input work)")
    require(not self.cache_data,
            "--data_service and --cache_data do not go together: the cached records would "
            "travel to the service inside the dataset's definition; its workers read the files")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """What training does to each image: a policy, with its parameters; erasing; mixing."""
  policy: str = setting(
      "none", "Automatic augmentation after the crop and flip: "
      f"{', '.join(augment_lib.POLICIES)} (torchvision's), or timm's RandAugment by its spec "
      "string, such as rand-m6-mstd0.5-inc1 (docs/recipes.md).", flag="augment")
  randaugment_num_ops: int = setting(
      2, "randaugment: ops applied to each image.", at_least=1,
      invalid=_RANDAUGMENT)
  randaugment_magnitude: int = setting(  # of 31 bins, as torchvision's RandAugment
      9, f"randaugment: the magnitude bin of every op, 0..{augment_lib.BINS - 1}.", at_least=0,
      at_most=augment_lib.BINS - 1,
      invalid=_RANDAUGMENT)
  random_erasing: float = setting(
      0.0, "Probability of erasing a random box of each image (after normalising), filled as "
      "--random_erasing_fill says.", at_least=0, at_most=1,
      invalid="--{flag}={value} must be a probability")
  random_erasing_fill: str = setting(
      "noise", "What an erased box holds: noise, N(0, 1) per pixel (timm's); zero, the mean "
      "colour (torchvision's presets).", choices=mixing.ERASING_FILLS)
  mixup_alpha: float = setting(
      0.0, "Mixup: blend each image with another, lambda ~ Beta(A, A); 0: off.", at_least=0,
      invalid=_MIXING)
  cutmix_alpha: float = setting(
      0.0, "CutMix: paste a box of another image, area ~ Beta(B, B); 0: off. With mixup too, "
      "each batch gets one of the two.", at_least=0,
      invalid=_MIXING)

  @property
  def mixes(self):
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0

  def validate(self):
    try:
      augment_lib.policy(self.policy)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    settings.check(self)
    try:  # a policy's own settings beyond their bounds (augment.Policy.check)
      augment_lib.check_settings(self)
    except ValueError as e:
      raise ConfigError(str(e)) from None
