"""A trained model as a SavedModel (uint8 images of any size in, class
probabilities out, with the run's evaluation preprocessing inside), or as
weights in torchvision's layout (save_weights).

Signatures:
  serving_default  images: uint8 [batch, height, width, 3], any height and width
  encoded          images: string [batch] of JPEG or PNG files' bytes
Both return probabilities [batch, num_classes] and classes [batch] (int64).
"""

import os

import tensorflow as tf
from safetensors import SafetensorError

from resnet_dist import checkpoints, models
from resnet_dist.errors import StorageError
from resnet_dist.data import preprocess


class Classifier(tf.Module):
  """The model behind the run's evaluation preprocessing."""

  def __init__(self, model, image_size, crop, mean, std,
               crop_fraction=preprocess.EVAL_CROP_FRACTION, interpolation="bilinear",
               antialias=False, resize_first=False, of_ema=False):
    super().__init__(name="classifier")
    self.model = model
    self.image_size = image_size
    self.crop = crop
    self.mean, self.std = tuple(mean), tuple(std)
    self.crop_fraction = crop_fraction
    self.interpolation = interpolation
    self.antialias = antialias
    self.resize_first = resize_first
    self.of_ema = of_ema

  def _classify(self, images, encoded):
    def one(image):
      return preprocess.preprocess(image, self.crop, self.image_size, training=False,
                                   seed=tf.zeros([2], tf.int64), encoded=encoded,
                                   crop_fraction=self.crop_fraction,
                                   interpolation=self.interpolation,
                                   antialias=self.antialias,
                                   resize_first=self.resize_first)
    batch = tf.map_fn(one, images, fn_output_signature=tf.TensorSpec(
        [self.image_size, self.image_size, 3], tf.uint8))
    logits = self.model(preprocess.normalize(batch, self.mean, self.std, tf.float32),
                        training=False)
    probabilities = tf.nn.softmax(tf.cast(logits, tf.float32))
    return {"probabilities": probabilities, "classes": tf.argmax(probabilities, axis=-1)}

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
  def serve(self, images):
    return self._classify(images, encoded=False)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
  def serve_encoded(self, images):
    return self._classify(images, encoded=True)


def load_classifier(model_dir, checkpoint_path=None, use_ema=True):
  """(the Classifier of a run's checkpoint, its path): of checkpoint_path, or
  of the newest one readable while the run may still be saving and rotating
  them; in float32, at the run's evaluation size and crop; of the EMA weights
  where the checkpoint has them, unless not use_ema."""
  run = checkpoints.read_run(model_dir)
  load = lambda path: (_classifier(run, path, use_ema), path)
  if checkpoint_path:
    return load(checkpoints.find_checkpoint(checkpoint_path))
  return checkpoints.using_latest(model_dir, load)


def _classifier(run, path, use_ema):
  size = run.get("eval_image_size") or run["image_size"]
  model = models.get_model(run["model"], num_classes=run["num_classes"],
                           variant=run["resnet_variant"], image_size=size)
  of_ema = use_ema and checkpoints.has_ema(path)
  checkpoints.restore_model(model, path, checkpoints.EMA_KEY if of_ema else checkpoints.MODEL_KEY)
  # run.json's "crop" was "augment" before --augment named the policies.
  crop = run.get("crop") or run["augment"]
  return Classifier(model, size, crop, mean=run["mean"], std=run["std"],
                    crop_fraction=run.get("eval_crop_fraction", preprocess.EVAL_CROP_FRACTION),
                    interpolation=run.get("interpolation", "bilinear"),
                    antialias=run.get("antialias", False),
                    resize_first=run.get("eval_resize_size", 0) > 0, of_ema=of_ema)


def default_dir(model_dir, checkpoint_path, of_ema):
  """model_dir/export/<step>, or <step>-ema for the EMA weights: the two
  exports of one checkpoint never overwrite each other."""
  step = checkpoint_path.rsplit("-", 1)[-1]
  return os.path.join(model_dir, "export", f"{step}-ema" if of_ema else step)


def _partial(path):
  """Where an export is written before it is complete: beside path, under a
  name of this process's own that a watcher of export/ ignores."""
  head, tail = os.path.split(path.rstrip("/"))
  return os.path.join(head, f".partial-{os.getpid()}-{tail}")


def _write_whole(path, write):
  """write(a temporary path), then the result renamed to path: a reader (a
  serving system watching export/) sees the whole export or none, and a write
  that fails (a full disk) leaves nothing behind but raises StorageError."""
  partial = _partial(path)
  try:
    tf.io.gfile.makedirs(os.path.dirname(path.rstrip("/")) or ".")
    write(partial)
    if tf.io.gfile.isdir(path):  # an earlier export of the same checkpoint
      tf.io.gfile.rmtree(path)
    tf.io.gfile.rename(partial, path, overwrite=True)
  except (tf.errors.OpError, OSError, SafetensorError) as e:
    if tf.io.gfile.exists(partial):
      (tf.io.gfile.rmtree if tf.io.gfile.isdir(partial) else tf.io.gfile.remove)(partial)
    raise StorageError(f"cannot write {path} ({str(e).strip().splitlines()[0]})") from None


def save_weights(classifier, path):
  """The model's weights as a torchvision-layout .safetensors file; StorageError
  when it cannot be written."""
  # The temporary name keeps the .safetensors ending save_weights asks for.
  _write_whole(path, lambda partial: models.save_weights(classifier.model, partial))


def save(classifier, export_dir):
  """Writes the SavedModel; StorageError when it cannot be written."""
  _write_whole(export_dir, lambda partial: tf.saved_model.save(
      classifier, partial, signatures={"serving_default": classifier.serve,
                                       "encoded": classifier.serve_encoded}))
