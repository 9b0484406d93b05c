"""The error users see as one line: bad flags, data or checkpoints."""


class ConfigError(ValueError):
  """A problem with the user's input, found before expensive work starts.

  Entrypoints print it as one line and exit with status 2.
  """
