"""Train a ResNet: `python -m launch.train --flagfile=launch/configs/digits.cfg`.

Exit status: 0 done; 2 bad flags or input (one line on stderr, before any
training); 3 a non-finite loss (the last good checkpoint is kept); 75 stopped
by SIGTERM after saving a checkpoint (run the same command again to resume).
"""

import os
import sys

# TensorFlow's C++ start-up chatter would bury the progress lines; set before it loads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging

from flags import definitions
from resnet_dist import checkpoints, train
from resnet_dist.errors import ConfigError

flags.adopt_module_key_flags(definitions)  # --helpshort lists them

EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again


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
  except checkpoints.Preempted:
    return EXIT_PREEMPTED
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=definitions.parse_flags)
