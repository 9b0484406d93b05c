"""The errors users see as one line: bad flags, data or checkpoints, and storage."""

import os
import stat


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


def not_a_directory(named, path):
  """'<named> is a FIFO, not a directory' for a local path that exists but is
  no directory (a file, a FIFO, a socket, a device); else missing()."""
  if "://" not in path:
    try:
      mode = os.stat(path).st_mode
    except OSError:
      return missing(named, path)
    kinds = ((stat.S_ISREG, "a file"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
    kind = next((name for test, name in kinds if test(mode)), "no directory")
    return f"{named} is {kind}, not a directory"
  return missing(named, path)
