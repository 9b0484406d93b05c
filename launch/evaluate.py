"""Evaluate a run's checkpoint on a split:
`python -m launch.evaluate --model_dir=runs/X [--checkpoint=...] [--split=...]`.

The model, its input size and the dataset come from the run's run.json unless
given as flags; every training flag (strategy, batch size, data_dir) applies.
Prints one line and the result as JSON. Exit status 2 on bad input.
"""

import json

from launch import exits  # first: its exit handler runs last
from absl import app
from absl import flags
from absl import logging

with exits.quiet_start():
  from flags import definitions
  from resnet_dist import checkpoints, evaluation
  from resnet_dist.errors import ConfigError

flags.adopt_module_key_flags(definitions)
flags.DEFINE_string("checkpoint", "", "A checkpoint of the run; default its latest.")
flags.DEFINE_string("split", "", "The split to evaluate; default the dataset's eval split.")
flags.DEFINE_bool("use_ema", True, "Evaluate the EMA of the weights where the run keeps one "
                  "(--ema_decay); false: the weights themselves.")
FLAGS = flags.FLAGS

# What run.json knows about the run; a flag given on the command line wins.
FROM_RUN = ("model", "resnet_variant", "image_size", "dataset", "data_dir", "num_classes",
            "eval_image_size", "eval_resize_size", "interpolation", "antialias")


def _evaluate(config, path):
  """(path, whether of the EMA weights, evaluation.evaluate's result)."""
  use_ema = FLAGS.use_ema and checkpoints.has_ema(path)
  return path, use_ema, evaluation.evaluate(config, path, FLAGS.split or None, use_ema=use_ema)


@exits.prompt
def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  try:
    if not FLAGS.model_dir:
      raise ConfigError("--model_dir is required: the run to evaluate")
    run = checkpoints.read_run(FLAGS.model_dir)
    config = definitions.config_from_flags(**{k: run[k] for k in FROM_RUN if k in run})
    evaluate = lambda path: _evaluate(config, path)
    # Of the newest checkpoint readable now: the run may still be saving and rotating them.
    path, use_ema, result = (evaluate(checkpoints.find_checkpoint(FLAGS.checkpoint))
                             if FLAGS.checkpoint else
                             checkpoints.using_latest(FLAGS.model_dir, evaluate))
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    return exits.fail(e)
  print(f"{result['split']}: loss {result['loss']:.4f} top-1 {result['top1']:.4f} "
        f"top-5 {result['top5']:.4f} over {int(result['count'])} of "
        f"{result['split_examples']} examples ({path}{', EMA weights' if use_ema else ''})")
  print(json.dumps(result))
  return exits.OK


if __name__ == "__main__":
  app.run(main, flags_parser=exits.parse_flags)
