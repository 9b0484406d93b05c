"""Preparing a run: every check that can fail cheaply (flags, data,
model_dir) before any model is built or anything written, and what the run
then trains on and where (RunSetup)."""

import dataclasses
import os

import tensorflow as tf

from resnet_dist import checkpoints, data, monitor
from resnet_dist import cluster as cluster_lib
from resnet_dist import strategy as strategy_lib
from resnet_dist.config import Config
from resnet_dist.data import service
from resnet_dist.errors import ConfigError
from resnet_dist.models import weights


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """What a run trains on and where, settled before any model is built."""
  config: Config
  strategy: tf.distribute.Strategy
  source: data.Source
  input_spec: data.InputSpec
  model_dir: str
  init_path: str          # --init_checkpoint's checkpoint, or ""
  train_size: int
  eval_size: int
  steps_per_epoch: int
  total_steps: int
  service_workers: int = 0  # the tf.data service's workers at start; 0: local input
  run_name: str = ""        # the job this process is one task of (cluster.run_name)

  @property
  def chief(self):
    return strategy_lib.is_chief(self.strategy)


def create_strategy(config):
  return strategy_lib.create_strategy(config.distribute)


def open_source(config, strategy):
  """The dataset, once the (micro-)batch is known to divide among the replicas."""
  data.check_batch_divides(config.schedule.micro_batch_size, strategy.num_replicas_in_sync)
  d = config.data
  return data.get_source(d.dataset, d.data_dir, download=d.download, num_classes=d.num_classes,
                         image_size=d.image_size, cache=d.cache_data)


def input_spec(config):
  """What the training input makes; evaluation's is eval_input(...) of it."""
  d = config.data
  return data.InputSpec(
      global_batch_size=config.schedule.micro_batch_size, image_size=d.image_size,
      seed=config.execution.seed, shuffle_buffer=d.shuffle_buffer, strict=d.strict_data,
      augment=config.augment if config.augment.policy != "none" else None,
      crop_fraction=d.eval_crop_fraction, data_service=d.data_service,
      deterministic=config.execution.deterministic, crop=d.crop, interpolation=d.interpolation,
      antialias=d.antialias, repeats=d.repeated_augmentations,
      resize_first=d.eval_resize_size > 0)


def train_input_spec(config, strategy):
  """The InputSpec a run on `strategy` trains on (prepare's, and
  launch.benchmark's): input_spec(config), with slack on accelerators."""
  # Slack: the last prefetch leaves the host's cores to an accelerator's
  # step launches at the start of each step (TensorFlow's advice for TPUs).
  return dataclasses.replace(input_spec(config), slack=not strategy_lib.all_on_cpu(strategy))


def prepare(config, strategy):
  """Seeds, opens and probes the data (and the tf.data service), checks
  model_dir: a RunSetup, or a ConfigError before anything is built or written."""
  d, schedule = config.data, config.schedule
  strategy_lib.check_tasks_agree(strategy, config.flag_values())
  service_workers = (service.wait_for_workers(d.data_service, d.data_service_timeout_seconds)
                     if d.data_service else 0)
  if config.execution.deterministic:
    tf.config.experimental.enable_op_determinism()
  source = open_source(config, strategy)
  read_splits = [source.train_split] + ([] if schedule.skip_eval else [source.eval_split])
  for split_name in dict.fromkeys(read_splits):  # once each, in this order
    data.check_decodable(source.split(split_name), split_name)
  init_checkpoint = config.checkpoint.init_checkpoint
  init_path = checkpoints.find_initial_weights(init_checkpoint) if init_checkpoint else ""
  if weights.is_weights_file(init_path):
    source = _pretrained_normalization(source, strategy)
  model_dir = checkpoints.resolve_model_dir(config)
  if strategy_lib.is_chief(strategy):
    checkpoints.check_writable(model_dir)
  train_size = source.split(source.train_split).num_examples
  epoch = data.repeated_epoch(train_size, d.repeated_augmentations,
                              strategy.num_replicas_in_sync)
  if epoch < schedule.global_batch_size:
    raise ConfigError(f"--repeated_augmentations={d.repeated_augmentations}: an epoch of "
                      f"{train_size} examples holds {epoch} once rounded down to a multiple of "
                      f"256, fewer than --global_batch_size={schedule.global_batch_size}")
  steps_per_epoch = max(epoch // schedule.global_batch_size, 1)
  _check_ramp(d.progressive_resize, schedule.total_steps(steps_per_epoch) / steps_per_epoch)
  spec = train_input_spec(config, strategy)
  if d.data_service:
    spec = dataclasses.replace(spec, job_name=service.job_prefix(model_dir))
  return RunSetup(
      config=config, strategy=strategy, source=source, input_spec=spec,
      model_dir=model_dir, init_path=init_path, train_size=train_size,
      eval_size=source.split(source.eval_split).num_examples,
      steps_per_epoch=steps_per_epoch, total_steps=schedule.total_steps(steps_per_epoch),
      service_workers=service_workers, run_name=_run_name(config.distribute))


def _run_name(distribute):
  cluster = cluster_lib.from_environment(distribute.cluster, port=distribute.cluster_port)
  return cluster_lib.run_name(cluster, distribute.tpu or os.environ.get("TPU_NAME", ""))


def _check_ramp(progressive_resize, epochs):
  """A --progressive_resize ramp that ends after the run's last epoch would
  never reach its last size: a ConfigError."""
  if progressive_resize is None:
    return
  start, end, _, last = progressive_resize
  if last > epochs:
    raise ConfigError(
        f"--progressive_resize={start}:{end}:{':'.join(f'{v:g}' for v in progressive_resize[2:])}"
        f" ramps until epoch {last:g}, after the run's last ({epochs:g}): it would never train "
        f"at {end}; end the ramp by epoch {epochs:g}")


def _pretrained_normalization(source, strategy):
  """Published ImageNet weights expect RGB normalised by ImageNet's mean and
  std, whatever the dataset: their first layer never saw anything else."""
  mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD
  if (tuple(source.mean), tuple(source.std)) != (mean, std):
    monitor.log(f"normalising {source.name} by ImageNet's mean and std, as the pretrained "
                f"weights expect (not its own {tuple(source.mean)}, {tuple(source.std)})",
                strategy_lib.is_chief(strategy))
    source = dataclasses.replace(source, mean=mean, std=std)
  return source
