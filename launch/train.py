"""Train a ResNet: `python -m launch.train --flagfile=launch/configs/digits.cfg`.

Exit status: 0 done; 2 bad flags or input (one line on stderr, before any
training); 3 a non-finite loss (the last good checkpoint is kept).
"""

import sys

from absl import app
from absl import flags

from flags import definitions
from resnet_dist import train
from resnet_dist.errors import ConfigError

flags.adopt_module_key_flags(definitions)  # --helpshort lists them

EXIT_USAGE = 2
EXIT_NONFINITE = 3


def main(argv):
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
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=definitions.parse_flags)
