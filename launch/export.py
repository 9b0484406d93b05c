"""Export a run as a SavedModel: `python -m launch.export --model_dir=runs/X`.

The SavedModel takes uint8 images of any size (or JPEG/PNG bytes, signature
"encoded") and returns class probabilities, with the run's evaluation
preprocessing inside. Exit status 2 on a bad model_dir or checkpoint, 74 when
the export cannot be written.
"""

import os

from launch import exits  # first: its exit handler runs last
from absl import app
from absl import flags
from absl import logging

with exits.quiet_start():
  from resnet_dist import export  # before TensorFlow: its CPU kernel setting
  from resnet_dist.errors import ConfigError
  import tensorflow as tf  # pylint: disable=g-bad-import-order

flags.DEFINE_string("model_dir", None, "The training run to export.", required=True)
flags.DEFINE_string("checkpoint", "", "A checkpoint of it; default its latest.")
flags.DEFINE_string("export_dir", "", "Where to write; default model_dir/export/<step>.")
FLAGS = flags.FLAGS


@exits.prompt
def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # TensorFlow's SavedModel notes stay off the console
  try:
    classifier, path = export.load_classifier(FLAGS.model_dir, FLAGS.checkpoint or None)
  except ConfigError as e:
    exits.error(e)
    return exits.USAGE
  export_dir = FLAGS.export_dir or os.path.join(
      FLAGS.model_dir, "export", path.rsplit("-", 1)[-1])
  try:
    export.save(classifier, export_dir)
  except (tf.errors.OpError, OSError) as e:
    exits.error(f"cannot write {export_dir} ({str(e).strip().splitlines()[0]})")
    return exits.STORAGE
  print(f"exported {path} to {export_dir}")
  return exits.OK


if __name__ == "__main__":
  app.run(main)
