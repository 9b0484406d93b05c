"""A run's model_dir: checkpoints, resume, and what the run was.

model_dir holds checkpoints/ (the chief's), run.json (the model the
checkpoints are of, checked on resume), classes.json (label id -> name),
summary.json, and the TensorBoard logs (monitor.py).
"""

import datetime
import json
import os

import tensorflow as tf

from resnet_dist import optim
from resnet_dist import strategy as strategy_lib
from resnet_dist.errors import ConfigError
from resnet_dist.monitor import log

SUMMARY_FILE = "summary.json"
RUN_FILE = "run.json"  # what a model_dir's checkpoints hold; checked on resume
CLASSES_FILE = "classes.json"  # label id -> class name


def model_state(model):
  """Every model variable by its Keras path, for tf.train.Checkpoint.

  Checkpointing the keras.Model object itself misses the layers a block keeps
  in Python lists, BatchNorm moving statistics among them; naming each
  variable explicitly saves all of them, under readable keys such as
  model/layer1.0/bn1/moving_mean.
  """
  return {v.path: optim.plain_variable(v) for v in model.variables}


def resolve_model_dir(config):
  if config.model_dir:
    return config.model_dir
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  name = config.dataset.replace(":", "-").replace("/", "-")
  return os.path.join("runs", f"{config.model}-{name}-{stamp}")


def check_writable(model_dir):
  try:
    tf.io.gfile.makedirs(model_dir)
    probe = os.path.join(model_dir, ".write_test")
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("ok")
    tf.io.gfile.remove(probe)
  except (tf.errors.OpError, OSError) as e:
    raise ConfigError(f"--model_dir={model_dir} is not writable ({e})") from None


def managers(checkpoint, strategy, model_dir, keep):
  """(restore manager, save manager).

  Every worker restores from the chief's checkpoints. Saving is collective, so
  all workers save, but only the chief into model_dir/checkpoints; the others
  write to a scratch dir of their own.
  """
  real = tf.train.CheckpointManager(
      checkpoint, os.path.join(model_dir, "checkpoints"), max_to_keep=keep)
  if strategy_lib.is_chief(strategy):
    return real, real
  task_type, task_id = strategy_lib.task_info(strategy)
  scratch = tf.train.CheckpointManager(
      checkpoint, os.path.join(model_dir, "scratch", f"{task_type}_{task_id}"), max_to_keep=1)
  return real, scratch


def check_same_model(model_dir, config, source, chief):
  """A model_dir resumes only the model it was made for; says what differs.

  run.json also records how the model sees its input, for evaluate and export.
  """
  path = os.path.join(model_dir, RUN_FILE)
  this = {"model": config.model, "resnet_variant": config.resnet_variant,
          "num_classes": source.num_classes}
  if tf.io.gfile.exists(path):
    saved = read_run(model_dir)
    differs = [f"{k} {saved.get(k)} there, {v} here" for k, v in this.items()
               if saved.get(k) != v]
    if differs:
      raise ConfigError(f"--model_dir={model_dir} holds checkpoints of another model "
                        f"({'; '.join(differs)}); use a new --model_dir")
  elif chief:
    with tf.io.gfile.GFile(path, "w") as f:
      json.dump({**this, "image_size": config.image_size, "dataset": config.dataset,
                 "data_dir": config.data_dir, "augment": source.augment,
                 "mean": list(source.mean), "std": list(source.std)}, f, indent=2)


def read_run(model_dir):
  """run.json of a model_dir: the model and how it sees its input."""
  path = os.path.join(model_dir, RUN_FILE)
  if not tf.io.gfile.exists(path):
    raise ConfigError(f"--model_dir={model_dir} has no {RUN_FILE}: not a training run's directory")
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def find_checkpoint(path):
  """A checkpoint prefix, or a model_dir (its latest checkpoint)."""
  if tf.io.gfile.isdir(path):
    latest = (tf.train.latest_checkpoint(os.path.join(path, "checkpoints"))
              or tf.train.latest_checkpoint(path))
    if not latest:
      raise ConfigError(f"no checkpoint in {path}")
    return latest
  if not tf.io.gfile.exists(path + ".index"):
    raise ConfigError(f"checkpoint {path} does not exist")
  return path


def _key(name):
  """The key tf.train.Checkpoint gives model_state()[name]."""
  return "model/" + name.replace(".", "..").replace("/", ".S") + "/.ATTRIBUTES/VARIABLE_VALUE"


def restore_model(model, path):
  """Loads a checkpoint's model weights (nothing else) into model."""
  tf.train.Checkpoint(model=model_state(model)).restore(path).expect_partial() \
      .assert_existing_objects_matched()


def init_from(model, path):
  """Starts model from another run's weights (--init_checkpoint).

  The classifier keeps its fresh initialisation when its shape differs (a
  dataset with another number of classes); any other difference is an error.
  Returns the names of the variables left fresh.
  """
  shapes = tf.train.load_checkpoint(path).get_variable_to_shape_map()
  state = model_state(model)
  missing = [name for name in state if _key(name) not in shapes]
  if missing:
    raise ConfigError(f"--init_checkpoint={path} is not of this architecture (it has no "
                      f"{missing[0]})")
  fresh = [name for name, v in state.items() if shapes[_key(name)] != v.shape.as_list()]
  other = [name for name in fresh if not name.startswith("fc/")]
  if other:
    raise ConfigError(f"--init_checkpoint={path}: {other[0]} has shape "
                      f"{shapes[_key(other[0])]} there, {state[other[0]].shape.as_list()} here")
  tf.train.Checkpoint(model={n: v for n, v in state.items() if n not in fresh}).restore(
      path).expect_partial().assert_existing_objects_matched()
  return fresh


def restore_latest(checkpoint, manager, chief):
  """Restores the newest readable checkpoint; a corrupt one is skipped with a warning."""
  for path in reversed(manager.checkpoints):
    try:
      checkpoint.restore(path).assert_existing_objects_matched()
      return path
    except Exception as e:  # pylint: disable=broad-except
      # A truncated file surfaces as OpError, IndexError or ValueError, by where it is cut.
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      log(f"warning: cannot read checkpoint {path} ({reason}); trying the one before", chief)
  return None


def save_class_names(model_dir, source, chief):
  """Label id -> class name, logged (image folders) and kept in model_dir/classes.json."""
  if not (chief and source.class_names):
    return
  with tf.io.gfile.GFile(os.path.join(model_dir, CLASSES_FILE), "w") as f:
    json.dump(list(source.class_names), f, indent=0)
  if source.name.startswith("folder:"):
    shown = ", ".join(f"{i}={name}" for i, name in enumerate(source.class_names[:20]))
    more = f", ... ({len(source.class_names)} in all)" if len(source.class_names) > 20 else ""
    log(f"label ids: {shown}{more} (saved in {CLASSES_FILE})")
