"""Train a ResNet: `python -m launch.train --flagfile=launch/configs/digits.cfg`.

Exit status (launch/exits.py): 0 done; 2 bad flags, data or checkpoints (one
line on stderr, before any training); 3 a non-finite loss (the last good
checkpoint is kept); 69 another worker of a multi-worker run died (start them
all again to resume from the last checkpoint); 74 a checkpoint could not be
written (a full disk; the earlier ones stay); 75 stopped by SIGTERM or SIGINT,
to this or another worker, after saving a checkpoint (run the same command
again to resume); 130 SIGINT outside the training steps (start-up or an
evaluation), nothing new saved.
"""

import re

from launch import exits  # first: its exit handler runs last
from absl import app
from absl import flags
from absl import logging

with exits.quiet_start():
  from flags import definitions
  from resnet_dist import preemption, train  # before TensorFlow: its CPU kernel setting
  from resnet_dist.errors import ConfigError, StorageError
  import tensorflow as tf  # pylint: disable=g-bad-import-order

flags.adopt_module_key_flags(definitions)  # --helpshort lists them


def lost_workers(error):
  """The tasks an UnavailableError says stopped answering: TensorFlow's
  coordination service aborts every collective when a task misses its heartbeats."""
  unhealthy = error.message.split("unhealthy", 1)[-1]
  return [f"{job} {task}" for job, task in re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)",
                                                      unhealthy)]


@exits.prompt
def main(argv):
  logging.set_verbosity(logging.ERROR)  # TensorFlow's and TFDS's advice stays off the console
  if len(argv) > 1:
    exits.error(f"unexpected arguments: {' '.join(argv[1:])}")
    return exits.USAGE
  try:
    train.run(definitions.config_from_flags())
  except ConfigError as e:
    exits.error(e)
    return exits.USAGE
  except FloatingPointError as e:
    exits.error(e)
    return exits.NONFINITE
  except StorageError as e:
    exits.error(e)
    return exits.STORAGE
  except preemption.Preempted:
    return exits.PREEMPTED
  except KeyboardInterrupt:
    # SIGINT outside the host loop; inside it the loop stops, saves and exits 75.
    exits.error("interrupted (SIGINT) outside training steps; nothing new was saved")
    return exits.INTERRUPTED
  except tf.errors.UnavailableError as e:
    exits.error(f"{', '.join(lost_workers(e)) or 'another worker'} stopped responding; "
                f"start every worker again to resume from the last checkpoint")
    return exits.WORKER_LOST
  return exits.OK


if __name__ == "__main__":
  app.run(main, flags_parser=definitions.parse_flags)
