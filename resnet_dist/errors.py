"""The errors users see as one line: bad flags, data or checkpoints, and storage."""


class ConfigError(ValueError):
  """A problem with the user's input, found before expensive work starts.

  Entrypoints print it as one line and exit with status 2.
  """


class DataError(ConfigError):
  """Bad data met during the run: an undecodable image under --strict_data, or
  a label outside the model's classes."""


class StorageError(RuntimeError):
  """Writing a run's files failed (a full disk, a read-only directory).

  Entrypoints print it as one line and exit with status 74; what was saved
  before it stays.
  """
