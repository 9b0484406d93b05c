"""Train a ResNet: `python -m launch.train --flagfile=launch/configs/digits.cfg`.

Exit status: 0 done; 2 bad flags or input (one line on stderr, before any
training); 3 a non-finite loss (the last good checkpoint is kept); 69 another
worker of a multi-worker run died (run them all again to resume from the last
checkpoint); 75 stopped by SIGTERM or SIGINT, to this or another worker, after
saving a checkpoint (run the same command again to resume).
"""

import os
import re
import sys

# TensorFlow's C++ start-up chatter would bury the progress lines; set before it loads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging

from flags import definitions
from resnet_dist import preemption, train  # before TensorFlow: its CPU kernel setting
from resnet_dist.errors import ConfigError
import tensorflow as tf  # pylint: disable=g-bad-import-order

flags.adopt_module_key_flags(definitions)  # --helpshort lists them

EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_WORKER_LOST = 69  # EX_UNAVAILABLE
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again


def lost_workers(error):
  """The tasks an UnavailableError says stopped answering: TensorFlow's
  coordination service aborts every collective when a task misses its heartbeats."""
  unhealthy = error.message.split("unhealthy", 1)[-1]
  return [f"{job} {task}" for job, task in re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)",
                                                      unhealthy)]


def main(argv):
  logging.set_verbosity(logging.WARNING)  # TFDS and the checkpoint saver log at INFO
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
    return EXIT_USAGE
  try:
    train.run(definitions.config_from_flags())
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except FloatingPointError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_NONFINITE
  except preemption.Preempted:
    return EXIT_PREEMPTED
  except tf.errors.UnavailableError as e:
    lost = ", ".join(lost_workers(e)) or "another worker"
    print(f"error: {lost} stopped responding; start every worker again to resume from the "
          f"last checkpoint", file=sys.stderr)
    return EXIT_WORKER_LOST
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=definitions.parse_flags)
