"""A run's settings: a Config of typed parts, one per concern, each frozen and
checking itself. The library never reads absl flags.

  model       which network, its numerics          (ModelConfig)       training.py
  data        what it reads, at which image sizes  (DataConfig)        inputs.py
  augment     what training does to each image     (AugmentConfig)     inputs.py
  optim       loss, optimizer, learning rate, EMA  (OptimConfig)       training.py
  schedule    batch, length, loops, evaluations    (ScheduleConfig)    training.py
  execution   XLA, seed, determinism, stalls       (ExecutionConfig)   training.py
  distribute  where it runs                        (DistributeConfig)  system.py
  checkpoint  model_dir and what is saved there    (CheckpointConfig)  system.py
  monitor     console, TensorBoard, profiling      (MonitorConfig)     system.py

Each field is one setting, defined once: its default, help, bounds and
choices (settings.setting), from which flags/definitions.py defines its flag
and validate() checks it. A field is named as its flag (--weight_decay is
optim.weight_decay), but where its Setting names another (--model is
model.name, --augment augment.policy); no two parts share a name, so
Config.from_flat() builds a Config from flag-named values, as flags/ does and
as tests and notebooks may. Code takes the part it needs (a Trainer's
optimizer reads config.optim). validate() checks each part, then what spans
parts, before any TensorFlow work.
"""

import dataclasses

from resnet_dist.config import settings
from resnet_dist.config.inputs import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, AugmentConfig, DataConfig
from resnet_dist.config.settings import require
from resnet_dist.config.system import (ALL_REDUCE, ALL_REDUCE_DTYPES, GPU_THREAD_MODES,
                                       STRATEGIES, CheckpointConfig, DistributeConfig,
                                       MonitorConfig)
from resnet_dist.config.training import (DTYPES, ExecutionConfig, ModelConfig, OptimConfig,
                                         ScheduleConfig)

__all__ = ["ALL_REDUCE", "ALL_REDUCE_DTYPES", "AugmentConfig", "CheckpointConfig", "Config",
           "DTYPES", "DataConfig", "DistributeConfig", "ExecutionConfig", "GPU_THREAD_MODES",
           "MAX_IMAGE_SIZE", "MIN_IMAGE_SIZE", "ModelConfig", "MonitorConfig", "OptimConfig",
           "STRATEGIES", "ScheduleConfig", "flag_field", "flag_names"]

# run.json records the execution part's settings inside "schedule", the
# layout every run.json has, so that one reader reads them all.
_RECORDED_UNDER = {"execution": "schedule"}


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  augment: AugmentConfig = AugmentConfig()
  optim: OptimConfig = OptimConfig()
  schedule: ScheduleConfig = ScheduleConfig()
  execution: ExecutionConfig = ExecutionConfig()
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
    record = {}
    for part in dataclasses.fields(self):
      record.setdefault(_RECORDED_UNDER.get(part.name, part.name), {}).update(
          dataclasses.asdict(getattr(self, part.name)))
    return record

  def flag_values(self):
    """{flag name: value} of every setting, as the command line names them."""
    return {name: getattr(getattr(self, part), field) for name, (part, field) in _FLAGS.items()}

  def validate(self):
    """Raises ConfigError naming the first setting that cannot work."""
    for part in dataclasses.fields(self):
      getattr(self, part.name).validate()
    require(not (self.data.data_service and self.execution.deterministic),
            "--data_service and --deterministic do not go together: the service's workers "
            "make batches in an order that differs from run to run")
    return self


def _flag_index():
  """{flag name: (part, field)} over every part, in order; a flag named twice
  would leave one of its fields unreachable, so it stops the import."""
  index = {}
  for part in dataclasses.fields(Config):
    for field in dataclasses.fields(part.type):
      name = settings.flag_name(field)
      if name in index:
        raise ValueError(f"--{name} names {'.'.join(index[name])} and {part.name}.{field.name}")
      index[name] = part.name, field.name
  return index


_FLAGS = _flag_index()


def flag_field(name):
  """(part, field) of the flag --name; a TypeError for a name no part has."""
  if name not in _FLAGS:
    raise TypeError(f"no part of Config has a setting {name!r}")
  return _FLAGS[name]


def flag_names():
  """Every flag a Config takes, part by part."""
  return list(_FLAGS)
