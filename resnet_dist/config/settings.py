"""What each field of a Config part carries beside its default: its help,
its bounds and its choices (Setting, in the field's metadata).

flags/definitions.py defines each flag from them, --help shows them, and
check() validates a part by them, so a flag and its check cannot disagree.
"""

import dataclasses
import math
import typing
from typing import Any, Optional

from resnet_dist.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Setting:
  """help: the flag's help. flag: its name where it is not the field's.
  choices: the table (dict or sequence) whose keys the value must be; with
  blank, "" too (then a default of its own, which help says). at_least,
  above, at_most, below: the bounds, inclusive or not. invalid: the error
  when out of bounds, with {flag} and {value} filled in, where the bounds
  alone would not say why."""
  help: str
  flag: Optional[str] = None
  choices: Any = None
  blank: bool = False
  at_least: Optional[float] = None
  above: Optional[float] = None
  at_most: Optional[float] = None
  below: Optional[float] = None
  invalid: Optional[str] = None

  def holds(self, value):
    """Whether value is within the bounds."""
    return ((self.at_least is None or value >= self.at_least)
            and (self.above is None or value > self.above)
            and (self.at_most is None or value <= self.at_most)
            and (self.below is None or value < self.below))

  def bounds(self):
    """The bounds in words: "at least 1", "above 0", "in [0, 1)"; "" when none."""
    lower = (("[", self.at_least) if self.at_least is not None else
             ("(", self.above) if self.above is not None else None)
    upper = ((self.at_most, "]") if self.at_most is not None else
             (self.below, ")") if self.below is not None else None)
    if lower and upper:
      return f"in {lower[0]}{lower[1]:g}, {upper[0]:g}{upper[1]}"
    if lower:
      return f"{'at least' if lower[0] == '[' else 'above'} {lower[1]:g}"
    if upper:
      return f"{'at most' if upper[1] == ']' else 'below'} {upper[0]:g}"
    return ""

  def flag_help(self):
    """The help --help shows: absl states the inclusive bounds it checks
    itself (lower_bound, upper_bound), so the text adds an exclusive one."""
    if self.above is None and self.below is None:
      return self.help
    return f"{self.help} Must be {self.bounds()}."

  def check(self, flag, value):
    """Raises ConfigError when value is not one of the choices or is out of bounds."""
    if self.choices is not None and not (self.blank and value == ""):
      require(value in self.choices,
              f"unknown --{flag}={value}; choose from {', '.join(self.choices)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not self.holds(value):
      if self.invalid:
        raise ConfigError(self.invalid.format(flag=flag, value=value))
      if self.at_least is not None and (self.above, self.at_most, self.below) == (None,) * 3:
        raise ConfigError(f"--{flag} must be {self.bounds()}")
      raise ConfigError(f"--{flag}={value} must be {self.bounds()}")


def setting(default, help_text, **options):
  """A Config part's field: its default and its Setting (help_text, options)."""
  return dataclasses.field(default=default, metadata={"setting": Setting(help_text, **options)})


def of(field):
  """The Setting of a dataclasses.Field."""
  return field.metadata["setting"]


def flag_name(field):
  """The command line's name of a dataclasses.Field."""
  return of(field).flag or field.name


def value_type(field):
  """A field's type without Optional: int for Optional[int]."""
  if typing.get_origin(field.type) is typing.Union:
    return next(t for t in typing.get_args(field.type) if t is not type(None))
  return field.type


def check(part):
  """Raises ConfigError naming the first field of a part (a Config part's
  instance) whose value is not finite, or not one of its choices, or out of bounds."""
  for field in dataclasses.fields(part):
    value = getattr(part, field.name)
    numbers = value if isinstance(value, tuple) else (value,)
    require(all(math.isfinite(v) for v in numbers if isinstance(v, float)),
            f"--{flag_name(field)}={value} is not a finite number")
    if value is not None and not isinstance(value, tuple):
      of(field).check(flag_name(field), value)


def describe(table):
  """A table's entries as help: "name: the first paragraph of its docstring" each."""
  return " ".join(f"{name}: {_summary(entry)}" for name, entry in table.items())


def _summary(entry):
  """The first paragraph of entry's docstring, on one line."""
  return " ".join((entry.__doc__ or "").split("\n\n")[0].split())


def require(condition, message):
  """Raises ConfigError(message) unless condition holds."""
  if not condition:
    raise ConfigError(message)
