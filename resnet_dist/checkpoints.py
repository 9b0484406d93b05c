"""A run's model_dir: checkpoints, resume, and what the run was.

model_dir holds checkpoints/ (the chief's), run.json (the model the
checkpoints are of, checked on resume), classes.json (label id -> name),
summary.json, and the TensorBoard logs (monitor.py).
"""

import datetime
import json
import os
import re

import tensorflow as tf

from resnet_dist import models
from resnet_dist.models import weights
from resnet_dist import strategy as strategy_lib
from resnet_dist import errors
from resnet_dist.errors import ConfigError, StorageError
from resnet_dist import monitor
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
  return {v.path: models.plain_variable(v) for v in model.variables}


def resolve_model_dir(config):
  if config.checkpoint.model_dir:
    return config.checkpoint.model_dir
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  name = config.data.dataset.replace(":", "-").replace("/", "-")
  return os.path.join("runs", f"{config.model.name}-{name}-{stamp}")


def check_writable(model_dir):
  """ConfigError, before any work, where model_dir or a directory the run
  writes in it (checkpoints, TensorBoard's) cannot be written."""
  try:
    tf.io.gfile.makedirs(model_dir)
    probe = os.path.join(model_dir, ".write_test")
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("ok")
    tf.io.gfile.remove(probe)
  except (tf.errors.OpError, OSError) as e:
    raise ConfigError(f"--model_dir={model_dir} is not writable ({e})") from None
  for name in ("checkpoints", *monitor.SUMMARY_DIRS):
    path = os.path.join(model_dir, name)
    if tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path):
      raise ConfigError(f"{path} is a file where the run writes a directory "
                        f"({'checkpoints' if name == 'checkpoints' else 'TensorBoard events'}); "
                        f"move it, or use another --model_dir")


def checkpoint_dir(model_dir):
  return os.path.join(model_dir, "checkpoints")


def saved_checkpoints(directory):
  """Every checkpoint prefix in directory, oldest first.

  Found by their .index files, not by the manager's state file (`checkpoint`),
  which may be missing or damaged while the checkpoints themselves are fine.
  """
  found = []
  for path in tf.io.gfile.glob(os.path.join(directory, "ckpt-*.index")):
    number = re.fullmatch(r"ckpt-(\d+)\.index", os.path.basename(path))
    if number:
      found.append(int(number.group(1)))
  return [os.path.join(directory, f"ckpt-{n}") for n in sorted(found)]


def save_manager(checkpoint, strategy, model_dir, keep, existing):
  """The CheckpointManager that saves this worker's checkpoints.

  Saving is collective, so every worker saves, but only the chief into
  model_dir/checkpoints; the others write to a scratch dir of their own. The
  chief's manager is told of `existing` (the checkpoints found on disk), so it
  rewrites a missing or damaged state file and keeps deleting the oldest.
  """
  if strategy_lib.is_chief(strategy):
    directory = checkpoint_dir(model_dir)
    if existing:
      # The manager deletes only checkpoints younger than the state's
      # "preserved" time: without the timestamps, it would keep every
      # checkpoint of the runs before this one, whatever --keep_checkpoints.
      times = [tf.io.gfile.stat(path + ".index").mtime_nsec / 1e9 for path in existing]
      tf.compat.v1.train.update_checkpoint_state(
          directory, existing[-1], all_model_checkpoint_paths=existing,
          all_model_checkpoint_timestamps=times, last_preserved_timestamp=min(times) - 1)
    return tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep)
  task_type, task_id = strategy_lib.task_info(strategy)
  return tf.train.CheckpointManager(
      checkpoint, os.path.join(model_dir, "scratch", f"{task_type}_{task_id}"), max_to_keep=1)


def _model_identity(config, source):
  return {"model": config.model.name, "resnet_variant": config.model.resnet_variant,
          "num_classes": source.num_classes}


def check_resumable(model_dir, config, source):
  """A model_dir resumes only the model and batch size it was made with
  (run.json says which); raises ConfigError saying what differs. Only a
  model_dir with checkpoints has a model to keep: a start that failed before
  its first save leaves nothing to resume."""
  if config.checkpoint.start_over or not _has_checkpoints(model_dir):
    return
  saved = read_run(model_dir)
  differs = [f"{k} {saved.get(k)} there, {v} here"
             for k, v in _model_identity(config, source).items() if saved.get(k) != v]
  if differs:
    raise ConfigError(f"--model_dir={model_dir} holds checkpoints of another model "
                      f"({'; '.join(differs)}); use a new --model_dir")
  here = config.schedule.global_batch_size
  batch = saved.get("global_batch_size", here)  # older run.json: unknown
  if batch != here:
    raise ConfigError(
        f"--model_dir={model_dir} was trained at --global_batch_size={batch}; resuming at "
        f"{here} would move the data position and the learning rate: "
        f"pass --global_batch_size={batch}, or --start_over")
  dtype = saved.get("config", {}).get("model", {}).get("dtype", config.model.dtype)
  if dtype != config.model.dtype:
    raise ConfigError(
        f"--model_dir={model_dir} was trained with --dtype={dtype}; resuming with "
        f"--dtype={config.model.dtype} would change its arithmetic (and its loss scale) "
        f"mid-run: pass --dtype={dtype}, or --start_over")
  _check_same_data(model_dir, saved, config, source)


def _check_same_data(model_dir, saved, config, source):
  """A resume trains on the data the run began with, normalised alike:
  run.json, classes.json, evaluate and export describe that data, and the
  weights were fitted to it. Another dataset is a fine-tuning, in a model_dir
  of its own."""
  here = {"dataset": config.data.dataset, "mean": list(source.mean), "std": list(source.std)}
  for key, value in here.items():
    if key in saved and saved[key] != value:
      raise ConfigError(
          f"--model_dir={model_dir} was trained on {key} {saved[key]}, not {value}: a resume "
          f"trains on the data it began with; to train these weights on other data, start a "
          f"new --model_dir with --init_checkpoint={model_dir}")


def _has_checkpoints(model_dir):
  return (tf.io.gfile.exists(os.path.join(model_dir, RUN_FILE))
          and bool(saved_checkpoints(checkpoint_dir(model_dir))))


def write_run_record(model_dir, config, source, total_steps=None):
  """Writes run.json for a new run (or one started over): the model, and how
  it sees its input, for resuming, evaluate and export; the length its
  learning-rate schedule was made for; and under "config" every setting,
  part by part."""
  path = os.path.join(model_dir, RUN_FILE)
  if _has_checkpoints(model_dir) and not config.checkpoint.start_over:
    return
  data = config.data
  with tf.io.gfile.GFile(path, "w") as f:
    json.dump({**_model_identity(config, source), "image_size": data.image_size,
               "dataset": data.dataset, "data_dir": data.data_dir,
               "crop": source.crop, "interpolation": data.interpolation,
               "antialias": data.antialias,
               "mean": list(source.mean), "std": list(source.std),
               "global_batch_size": config.schedule.global_batch_size,
               "eval_image_size": data.eval_size, "eval_resize_size": data.eval_resize_size,
               "eval_crop_fraction": data.eval_crop_fraction, "total_steps": total_steps,
               "config": config.to_dict()},
              f, indent=2)


def record_total_steps(model_dir, total_steps):
  """run.json's length, after a resume that changed it."""
  run = read_run(model_dir)
  with tf.io.gfile.GFile(os.path.join(model_dir, RUN_FILE), "w") as f:
    json.dump({**run, "total_steps": total_steps}, f, indent=2)


def read_run(model_dir):
  """run.json of a model_dir: the model and how it sees its input."""
  path = os.path.join(model_dir, RUN_FILE)
  if not tf.io.gfile.exists(path):
    raise ConfigError(f"--model_dir={model_dir} has no {RUN_FILE}: not a training run's directory")
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def find_checkpoint(path):
  """A checkpoint prefix, or a model_dir (its latest checkpoint)."""
  try:
    return _find_checkpoint(path)
  except tf.errors.OpError as e:  # a remote path that cannot be reached
    raise ConfigError(f"cannot read {path} ({_first_line(e)})") from None


def using_latest(model_dir, use, attempts=3):
  """use(the model_dir's latest checkpoint), for a reader beside a live run:
  a checkpoint the run's rotation deleted between the look and the read (a
  ConfigError, its files gone) is replaced by the newest at that moment."""
  for attempt in range(attempts):
    path = find_checkpoint(model_dir)
    try:
      return use(path)
    except ConfigError:
      if attempt == attempts - 1 or tf.io.gfile.exists(path + ".index"):
        raise
  raise AssertionError("unreachable")


def _find_checkpoint(path):
  if tf.io.gfile.isdir(path):
    latest = (tf.train.latest_checkpoint(os.path.join(path, "checkpoints"))
              or tf.train.latest_checkpoint(path))
    if not latest:
      raise ConfigError(f"no checkpoint in {path}")
    return latest
  if not tf.io.gfile.exists(path + ".index"):
    raise ConfigError(errors.missing(f"checkpoint {path}", path))
  return path


MODEL_KEY = "model"  # the weights, in Trainer.checkpoint_state()
EMA_KEY = "ema"      # their EMA, in runs with --ema_decay


def checkpoint_key(name, key=MODEL_KEY):
  """The key under which tf.train.Checkpoint saves model_state()[name]."""
  return f"{key}/" + name.replace(".", "..").replace("/", ".S") + "/.ATTRIBUTES/VARIABLE_VALUE"


def has_ema(path):
  """Whether a checkpoint holds an EMA of the weights; ConfigError when its
  index cannot be read (training would skip it for the one before; here the
  user chose it, or it is the latest)."""
  try:
    keys = tf.train.load_checkpoint(path).get_variable_to_shape_map()
  except (tf.errors.OpError, ValueError) as e:
    raise ConfigError(f"cannot read checkpoint {path} ({_first_line(e)}); --checkpoint can "
                      f"name an earlier one") from None
  return any(k.startswith(EMA_KEY + "/") for k in keys)


def restore_model(model, path, key=MODEL_KEY):
  """Loads a checkpoint's model weights (or, key=EMA_KEY, their EMA) into model."""
  try:
    tf.train.Checkpoint(**{key: model_state(model)}).restore(path).expect_partial() \
        .assert_existing_objects_matched()
  except AssertionError as e:
    raise ConfigError(f"{path} does not hold this model's weights ({_first_line(e)})") from None
  except (tf.errors.OpError, ValueError, IndexError) as e:
    raise ConfigError(f"cannot read checkpoint {path} ({_first_line(e)})") from None


def save(manager, step, chief=True):
  """manager.save(step); a failed write (a full disk) leaves no half-written
  checkpoint behind and raises StorageError, the earlier checkpoints intact.

  A worker that is not the chief saves only because saving is collective:
  its copy (save_manager's scratch dir) is deleted once written, or every
  save would leave N-1 extra checkpoints on the run's shared storage.
  """
  try:
    manager.save(checkpoint_number=step)
    if not chief:
      tf.io.gfile.rmtree(manager.directory)
  except (tf.errors.OpError, OSError) as e:
    for partial in tf.io.gfile.glob(os.path.join(manager.directory, f"ckpt-{step}_temp*")):
      (tf.io.gfile.rmtree if tf.io.gfile.isdir(partial) else tf.io.gfile.remove)(partial)
    raise StorageError(f"cannot save the checkpoint of step {step} in {manager.directory} "
                       f"({_first_line(e)}); the last saved one is "
                       f"{manager.latest_checkpoint}") from None


def find_initial_weights(path):
  """--init_checkpoint: a weights file (.safetensors, .pth) or our checkpoint."""
  if weights.is_weights_file(path):
    weights.check_readable(path)
    return path
  return find_checkpoint(path)


def init_from(model, path):
  """Starts model from another run's weights or a weights file (--init_checkpoint).

  The classifier keeps its fresh initialisation when its shape differs (a
  dataset with another number of classes); any other difference is an error.
  Returns the names of the variables left fresh.
  """
  if weights.is_weights_file(path):
    tensors = weights.read(path)
    return weights.assign(model, tensors, path, weights.classifier_differs(model, tensors))
  shapes = tf.train.load_checkpoint(path).get_variable_to_shape_map()
  state = model_state(model)
  missing = [name for name in state if checkpoint_key(name) not in shapes]
  if missing:
    raise ConfigError(f"--init_checkpoint={path} is not of this architecture (it has no "
                      f"{missing[0]})")
  fresh = [name for name, v in state.items()
           if shapes[checkpoint_key(name)] != v.shape.as_list()]
  other = [name for name in fresh if not name.startswith("fc/")]
  if other:
    raise ConfigError(f"--init_checkpoint={path}: {other[0]} has shape "
                      f"{shapes[checkpoint_key(other[0])]} there, "
                      f"{state[other[0]].shape.as_list()} here")
  tf.train.Checkpoint(model={n: v for n, v in state.items() if n not in fresh}).restore(
      path).expect_partial().assert_existing_objects_matched()
  return fresh


def _first_line(error):
  return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__


# Parts a checkpoint holds only with some settings: (key, the setting, its flag).
_OPTIONAL_PARTS = (("loss_scale", "--dtype=fp16 (its loss scale)", "--dtype"),
                   (EMA_KEY, "--ema_decay (an EMA of the weights)", "--ema_decay"))


def _check_same_parts(path, keys, checkpoint):
  for part, setting, flag in _OPTIONAL_PARTS:
    saved = any(k.startswith(part + "/") for k in keys)
    if saved != hasattr(checkpoint, part):
      raise ConfigError(f"{path} was saved by a run with{'' if saved else 'out'} {setting}; "
                        f"resume it with the same {flag}")


def restore_latest(checkpoint, paths, chief):
  """Restores the newest readable checkpoint of paths (oldest first); returns it.

  A damaged one is skipped with a warning in favour of the one before. One
  that reads fine but does not fit (saved by a run with other settings) is a
  ConfigError, and so is a list none of which can be read: training from an
  older one, or from scratch, would overwrite them.
  """
  for path in reversed(paths):
    try:
      keys = tf.train.load_checkpoint(path).get_variable_to_shape_map()
    except Exception as e:  # pylint: disable=broad-except
      monitor.warn(f"cannot read checkpoint {path} ({_first_line(e)}); trying the one before",
                   chief)
      continue
    _check_same_parts(path, keys, checkpoint)
    try:
      checkpoint.restore(path).assert_existing_objects_matched()
    except AssertionError as e:  # the files read fine: their objects do not fit
      raise ConfigError(f"{path} does not fit this run ({_first_line(e)})") from None
    except Exception as e:  # pylint: disable=broad-except
      # Damaged data surfaces as OpError, IndexError or ValueError, by where it is cut.
      monitor.warn(f"cannot read checkpoint {path} ({_first_line(e)}); trying the one before",
                   chief)
      continue
    return path
  if paths:
    raise ConfigError(f"none of the {len(paths)} checkpoints in {os.path.dirname(paths[0])} can "
                      f"be read; --start_over trains from step 0 and replaces them")
  return None


def remove_checkpoints(model_dir):
  """--start_over: the checkpoints of an earlier run in model_dir go."""
  directory = checkpoint_dir(model_dir)
  if tf.io.gfile.exists(directory):
    tf.io.gfile.rmtree(directory)


def save_class_names(model_dir, source, chief):
  """Label id -> class name, logged (image folders) and kept in model_dir/classes.json."""
  if not (chief and source.class_names):
    return
  with tf.io.gfile.GFile(os.path.join(model_dir, CLASSES_FILE), "w") as f:
    json.dump(list(source.class_names), f, indent=0)
  if source.name.startswith("folder:"):
    # A name with a newline or another control character is shown escaped:
    # the console keeps one line.
    shown = ", ".join(f"{i}={name}" if name.isprintable() else f"{i}={name!r}"
                      for i, name in enumerate(source.class_names[:20]))
    more = f", ... ({len(source.class_names)} in all)" if len(source.class_names) > 20 else ""
    log(f"label ids: {shown}{more} (saved in {CLASSES_FILE})")
