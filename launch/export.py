"""Export a run as a SavedModel: `python -m launch.export --model_dir=runs/X`.

The SavedModel takes uint8 images of any size (or JPEG/PNG bytes, signature
"encoded") and returns class probabilities, with the run's evaluation
preprocessing inside. Exit status 2 on a bad model_dir or checkpoint.
"""

import os

from launch import exits  # first: its exit handler runs last
from absl import app
from absl import flags

with exits.quiet_start():
  from resnet_dist import export
  from resnet_dist.errors import ConfigError

flags.DEFINE_string("model_dir", None, "The training run to export.", required=True)
flags.DEFINE_string("checkpoint", "", "A checkpoint of it; default its latest.")
flags.DEFINE_string("export_dir", "", "Where to write; default model_dir/export/<step>.")
FLAGS = flags.FLAGS


@exits.prompt
def main(argv):
  del argv
  try:
    classifier, path = export.load_classifier(FLAGS.model_dir, FLAGS.checkpoint or None)
  except ConfigError as e:
    exits.error(e)
    return exits.USAGE
  export_dir = FLAGS.export_dir or os.path.join(
      FLAGS.model_dir, "export", path.rsplit("-", 1)[-1])
  export.save(classifier, export_dir)
  print(f"exported {path} to {export_dir}")
  return exits.OK


if __name__ == "__main__":
  app.run(main)
