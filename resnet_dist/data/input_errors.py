"""The input's checks as one-line DataErrors.

The checks inside the datasets stop a run with tf.debugging.Assert, whose
data starts with a marker (BAD_IMAGE, BAD_LABEL, MISSING_FEATURE and
records.py's BAD_RECORD and NOT_AN_EXAMPLE) and names the example. The
errors TensorFlow raises itself (a decoder's, a parser's, a file gone) say
what went wrong in their own words. data_errors() reads both out of
TensorFlow's error text and raises what a user can act on, in one line.
"""

import contextlib
import re

import tensorflow as tf

from resnet_dist.data import records as records_lib
from resnet_dist.errors import DataError

BAD_IMAGE = "resnet_dist: undecodable image"
BAD_LABEL = "resnet_dist: label out of range"
MISSING_FEATURE = "resnet_dist: a record has no"

_SKIPPED = "--strict_data stops here; without it they are skipped and counted"


def _where(fields):
  return " ".join(fields[1:])


def _check_messages(num_classes):
  """The one line each of the input's checks stops a run with, by its marker,
  from the Assert data: [marker-with-details] [label] [record 7 of PATH | name]."""
  return {
      BAD_IMAGE: lambda f: f"undecodable image: {_where(f)} ({_SKIPPED})",
      records_lib.BAD_RECORD: lambda f: (f"corrupt TFRecord: {_where(f)} and the rest of that "
                                         f"file cannot be read ({_SKIPPED})"),
      records_lib.NOT_AN_EXAMPLE: lambda f: f"not a tf.train.Example: {_where(f)} ({_SKIPPED})",
      MISSING_FEATURE: lambda f: (f"{f[0][len('resnet_dist: '):]}: {_where(f)}; every record "
                                  "needs image/encoded and image/class/label"),
      BAD_LABEL: lambda f: f"label {f[1]} is outside 0..{num_classes - 1}: {' '.join(f[2:])}",
  }


def _invalid_argument(message, num_classes):
  """The DataError an InvalidArgumentError's message stands for, or None."""
  # tf.debugging.Assert prints its data as "[marker] [label] [record] [7] [of] [path]".
  for marker, line in _check_messages(num_classes).items():
    if marker in message:
      fields = re.findall(r"\[(.*?)\]", message[message.index(marker) - 1:].splitlines()[0])
      return DataError(line(fields))
  decoder = re.search(r"Invalid (JPEG|PNG) data[^\n\[]*", message)
  if decoder:  # complete-looking but corrupt inside: the decoder does not name the file
    return DataError(f"undecodable image ({decoder.group(0).strip()}); --strict_data stops "
                     "at such images, without it they are skipped and counted")
  missing = re.search(r"Feature: (\S+) \(data type: \w+\) is required but could not be found",
                      message)
  if missing:
    return DataError(f"a record has no {missing.group(1)}; every record needs image/encoded "
                     f"and image/class/label")
  return None


@contextlib.contextmanager
def data_errors(num_classes):
  """The input pipeline's checks (BAD_IMAGE, BAD_LABEL, ...) as one-line DataErrors."""
  try:
    yield
  except tf.errors.InvalidArgumentError as e:
    error = _invalid_argument(e.message, num_classes)
    if error is None:
      raise
    raise error from None
  except (tf.errors.NotFoundError, tf.errors.PermissionDeniedError) as e:
    # A file listed at start that is gone or unreadable now (a dangling link).
    gone = re.search(r"(\S+); (No such file or directory|Permission denied)", e.message)
    if not gone:
      raise
    raise DataError(f"cannot read {gone.group(1)} ({gone.group(2).lower()}); --strict_data stops "
                    "at such files, without it they are skipped and counted") from None
