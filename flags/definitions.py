"""Every flag of a run's settings, each defined from its field of
resnet_dist.config.Config: its name, default, help, choices (an enum) and
inclusive bounds come from the field's Setting (config/settings.py), so a
flag cannot disagree with the check of its field.

The command line is flat; each flag sets the field it names in one part of
the Config (config.flag_field says which), and config_from_flags() builds
the Config from all of them, so no flag goes unread. Entrypoints define
their own flags, those that are no setting of a run, beside their main().
"""

import dataclasses

from absl import flags

from resnet_dist import data
from resnet_dist import config as config_lib
from resnet_dist.config import Config, settings


def _epochs(values):
  """["30", "60"] -> (30.0, 60.0)."""
  return tuple(float(v) for v in values)


def _step_range(value):
  """"START,END" -> (START, END); "" -> None."""
  if not value:
    return None
  start, end = (int(v) for v in value.split(","))
  return start, end


def _ramp(value):
  """"START:END:FROM:TO" -> (START, END, FROM, TO); "" -> None."""
  if not value:
    return None
  start, end, first, last = value.split(":")
  return int(start), int(end), float(first), float(last)


# The settings whose value is a tuple, which the command line gives as text:
# flag -> (parse, raising ValueError when malformed; the syntax, for the error).
_TEXT = {
    "lr_boundary_epochs": (_epochs, "numbers, as 30,60,80"),
    "profile_steps": (_step_range, "START,END, as 10,15"),
    "progressive_resize": (_ramp, "START:END:FROM_EPOCH:TO_EPOCH, as 160:192:0:70"),
}
_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}


def _parses(parse, value):
  try:
    parse(value)
  except ValueError:
    return False
  return True


def _define_text(name, default, text):
  """A tuple setting's flag: a list where it has a default, else a string ("": None)."""
  parse, syntax = _TEXT[name]
  if default is None:
    flags.DEFINE_string(name, "", text)
  else:
    flags.DEFINE_list(name, [f"{v:g}" for v in default], text)
  flags.register_validator(name, lambda value: _parses(parse, value),
                           message=f"--{name} must be {syntax}")


def _define(field, default):
  """The flag of one field of a Config part, whose default is `default`."""
  setting, name = settings.of(field), settings.flag_name(field)
  if name in _TEXT:
    _define_text(name, default, setting.flag_help())
  elif setting.choices is not None:
    flags.DEFINE_enum(name, default, [""] * setting.blank + list(setting.choices),
                      setting.flag_help())
  else:
    bounds = {key: bound for key, bound in (("lower_bound", setting.at_least),
                                            ("upper_bound", setting.at_most))
              if bound is not None}
    _DEFINE[settings.value_type(field)](name, default, setting.flag_help(), **bounds)


for _part in dataclasses.fields(Config):
  for _field in dataclasses.fields(_part.type):
    _define(_field, getattr(getattr(Config(), _part.name), _field.name))

flags.register_validator("dataset", data.is_dataset_name,
                         message="--dataset must be " + data.DATASETS_HELP)

FLAGS = flags.FLAGS


def config_from_flags(**overrides):
  """The Config the parsed flags describe (the flags' values converted once),
  with `overrides` for fields whose flag the user did not give."""
  values = {name: FLAGS[name].value for name in config_lib.flag_names()}
  for name, (parse, _) in _TEXT.items():
    values[name] = parse(values[name])
  values.update({k: v for k, v in overrides.items() if not FLAGS[k].present})
  return Config.from_flat(**values)
