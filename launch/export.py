"""Export a run: `python -m launch.export --model_dir=runs/X [--format=safetensors]`.

saved_model (default): a SavedModel that takes uint8 images of any size (or
JPEG/PNG bytes, signature "encoded") and returns class probabilities, with the
run's evaluation preprocessing inside. safetensors: the weights alone, in
torchvision's layout and names (model.safetensors), for PyTorch and timm.
Exit status 2 on a bad model_dir or checkpoint, 74 when the export cannot be
written.
"""

import os

from launch import exits  # first: its exit handler runs last
from absl import app
from absl import flags
from absl import logging

with exits.quiet_start():
  from resnet_dist import export  # before TensorFlow: its CPU kernel setting

flags.DEFINE_string("model_dir", None, "The training run to export.", required=True)
flags.DEFINE_string("checkpoint", "", "A checkpoint of it; default its latest.")
flags.DEFINE_string("export_dir", "", "Where to write; default model_dir/export/<step> "
                    "(<step>-ema for the EMA weights).")
flags.DEFINE_bool("use_ema", True, "Export the EMA of the weights where the run keeps one "
                  "(--ema_decay); false: the weights themselves.")
flags.DEFINE_enum("format", "saved_model", ["saved_model", "safetensors"],
                  "saved_model, or safetensors: torchvision-layout weights in "
                  "export_dir/model.safetensors.")
FLAGS = flags.FLAGS


@exits.prompt
def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # TensorFlow's SavedModel notes stay off the console
  try:
    classifier, path = export.load_classifier(FLAGS.model_dir, FLAGS.checkpoint or None,
                                              FLAGS.use_ema)
    export_dir = FLAGS.export_dir or export.default_dir(FLAGS.model_dir, path,
                                                       classifier.of_ema)
    if FLAGS.format == "safetensors":
      export_dir = os.path.join(export_dir, "model.safetensors")
      export.save_weights(classifier, export_dir)
    else:
      export.save(classifier, export_dir)
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    return exits.fail(e)
  print(f"exported {path}{' (EMA weights)' if classifier.of_ema else ''} to {export_dir}")
  return exits.OK


if __name__ == "__main__":
  app.run(main, flags_parser=exits.parse_flags)
