"""Train a ResNet: `python -m launch.train --flagfile=launch/configs/digits.cfg`.

Exit status (launch/exits.py): 0 done; 2 bad flags, data or checkpoints (one
line on stderr, before any training); 3 a non-finite loss (the last good
checkpoint is kept); 69 another worker of a multi-worker run died (start them
all again to resume from the last checkpoint); 70 no progress for
--progress_timeout_seconds (a stuck peer or read; start every task again);
74 a checkpoint could not be written (a full disk; the earlier ones stay); 75
stopped by SIGTERM, SIGINT or SIGHUP, to this or another worker, after saving
a checkpoint (run the same command again to resume; an evaluation stops at
once, the same way; a run stuck on a read exits at once with its last
checkpoint); 130 SIGINT while starting, nothing new saved.
"""

from launch import exits  # first: its exit handler runs last
from absl import app
from absl import flags
from absl import logging

with exits.quiet_start():
  from flags import definitions
  from resnet_dist import train  # before TensorFlow: its CPU kernel setting

flags.adopt_module_key_flags(definitions)  # --helpshort lists them


@exits.prompt
def main(argv):
  logging.set_verbosity(logging.ERROR)  # TensorFlow's and TFDS's advice stays off the console
  if len(argv) > 1:
    exits.error(f"unexpected arguments: {' '.join(argv[1:])}")
    return exits.USAGE
  try:
    train.run(definitions.config_from_flags())
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    return exits.fail(e)
  return exits.OK


if __name__ == "__main__":
  app.run(main, flags_parser=exits.parse_flags)
