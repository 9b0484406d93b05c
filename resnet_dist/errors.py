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


def missing(named, path):
  """'<named> does not exist', and for a remote path (gs://, s3://), where
  TensorFlow cannot tell a missing path from one it may not read, what else
  it may be."""
  if "://" in path:
    return f"{named} does not exist or cannot be read from here (credentials, network)"
  return f"{named} does not exist"
