"""Decoding, shared by every kind of split: from a reader's stream of
elements to the batches the replicas take.

An encoded example goes through two stages. First, in groups of
skips.GROUP in read order, records are parsed and every image is checked
for the signs of an undecodable one (preprocess.looks_decodable); the
unusable ones are dropped there and counted (skips.py). Then each example
alone is decoded, cropped and augmented, in parallel, and in order only
under --deterministic. Per-example calls of small functions cost a sixth as
much CPU as decoding a small image (docs/benchmarks.md), so the checks, the
parse and the label check run once per group or batch, and the decoding map
is the one call per example.

Between the stages an example is a dict: key (int64; seeds its random crop
and augmentation), image, label, where (names it in errors; its reader's
describe() spells it out) and skipped. The replicas take tuples: training
(images, labels, skipped), evaluation (images, labels, weights).

Evaluation: each pipeline's examples, then zero-weight padding up to the same
number of whole batches on every pipeline, so every example counts exactly
once and every batch keeps its static shape (TPUs need it).
"""

import dataclasses
import functools
import os
from typing import Callable, Optional

import tensorflow as tf

from resnet_dist.data import augment as augment_lib
from resnet_dist.data import preprocess as preprocess_lib
from resnet_dist.data import seeds, skips
from resnet_dist.data.input_errors import BAD_LABEL



@dataclasses.dataclass(frozen=True)
class Reading:
  """What the decoding stage needs of a kind of split, from its reader.

  encoded: the split's images are encoded (JPEG, PNG), and its elements go
  through skips.usable() first, a group at a time. usable_groups(numbered
  elements, strict) -> dataset of skips.kept() groups. fetch(element) -> the
  dict of key, image, label and where of one example, read alone (a split
  held decoded is read by fetch alone). describe(where) -> the Assert data
  naming an example.
  """
  encoded: bool
  describe: Callable
  usable_groups: Optional[Callable] = None
  fetch: Optional[Callable] = None


def input_threads():
  """The input's private thread pool: this process's physical cores (the
  CPUs it may run on, a core's hardware threads counted once), so decoding
  does not queue behind the replicas' kernel launches in TensorFlow's
  inter-op pool, and leaves hyperthreads to the host's other work."""
  try:
    cpus = os.sched_getaffinity(0)
  except AttributeError:  # not Linux
    return os.cpu_count() or 1
  cores = set()
  for cpu in cpus:
    try:
      with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
        cores.add(f.read().strip())
    except OSError:
      cores.add(str(cpu))
  return max(len(cores), 1)


def finish(ds, deterministic=True, slack=False):
  """The pipeline's last prefetch and its options: parallelism and buffer
  sizes tuned by tf.data's autotuning, decoding in a private thread pool."""
  options = tf.data.Options()
  options.deterministic = deterministic
  options.experimental_slack = slack
  options.threading.private_threadpool_size = input_threads()
  return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def _skips_errors(reading, spec):
  return reading.encoded and not spec.strict


def _preprocessor(reading, source, spec, training):
  """example -> dict of image, label, where and skipped: decodes, crops and
  augments one example. For an encoded split the example is one of
  skips.usable(); for one held decoded it is read by reading.fetch(element).
  key seeds the example's random crop and augmentation, so it is augmented
  the same way whatever order, pipeline or restart it comes in.
  """
  def load_and_preprocess(example):
    seed = tf.stack([tf.constant(spec.seed + seeds.EXAMPLE, tf.int64), example["key"]])
    image = preprocess_lib.preprocess(example["image"], spec.crop or source.crop,
                                      size=spec.image_size,
                                      training=training,
                                      seed=seed, encoded=reading.encoded,
                                      crop_fraction=spec.crop_fraction,
                                      interpolation=spec.interpolation,
                                      antialias=spec.antialias,
                                      resize_first=spec.resize_first)
    if training and spec.augment is not None:
      image = augment_lib.augment(image, spec.augment, seed + seeds.POLICY, spec.interpolation)
    return {"image": image, "label": example["label"], "where": example["where"],
            "skipped": example["skipped"]}

  if reading.encoded:
    return load_and_preprocess
  return lambda element: load_and_preprocess(
      {**reading.fetch(element), "skipped": tf.constant(0, tf.int64)})


def _to_decode(ds, reading, source, spec, training):
  """(elements, load): what the decoding map takes, the usable examples of
  an encoded split, and load(element), which decodes and crops one."""
  load = _preprocessor(reading, source, spec, training)
  return (skips.usable(ds, reading, spec.strict) if reading.encoded else ds), load


def _loaded(ds, reading, source, spec, training):
  """(number, example) of every example in order, decoded in parallel and
  numbered before decoding, so an image the decoder itself rejects
  (complete-looking, corrupt inside) leaves a gap in the numbers. Such an
  image is an error: dropped outside strict mode."""
  ds, load = _to_decode(ds, reading, source, spec, training)
  ds = ds.enumerate().map(lambda number, element: (number, load(element)),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.ignore_errors() if _skips_errors(reading, spec) else ds


def decoded_batches(ds, reading, source, spec, *, batch_size):
  """Batches of examples (image, label, where, skipped), each example decoded
  as soon as it can be and its batch filled as examples are ready (training
  out of order).

  The decoding map is followed by the batch alone, which tf.data fuses into
  one op that copies each image into its batch as soon as it is made, while
  it is still in the core's cache; anything between the two (the skipping of
  one failed example included) leaves every image to be copied later by one
  thread, from memory, and costs about a tenth of the input's CPU
  (docs/benchmarks.md). So a batch holding an image the decoder rejects
  (complete-looking, corrupt inside) is dropped whole, uncounted, outside
  strict mode: the images found unusable before decoding, by far the usual
  ones, are still dropped alone and counted (skips.usable).
  """
  ds, load = _to_decode(ds, reading, source, spec, training=True)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.ignore_errors() if _skips_errors(reading, spec) else ds


def _label_check(labels, where, num_classes, describe):
  """Stops the run at a batch with a label outside 0..num_classes-1, naming it."""
  ok = (labels >= 0) & (labels < num_classes)
  first_bad = tf.argmin(tf.cast(ok, tf.int32))
  bad_where = tf.nest.map_structure(lambda t: t[first_bad], where)
  return tf.debugging.Assert(tf.reduce_all(ok),
                             [BAD_LABEL, labels[first_bad]] + describe(bad_where))


def checked(num_classes, describe, batch):
  """A training batch as the replicas take it, (images, labels, skipped),
  once its labels are checked."""
  with tf.control_dependencies([_label_check(batch["label"], batch["where"], num_classes,
                                             describe)]):
    return tf.identity(batch["image"]), batch["label"], tf.cast(batch["skipped"], tf.int32)


def train_batches(ds, reading, source, spec, *, per_replica_batch):
  """(images, labels, skipped) of a reader's elements: skipped counts the
  records skipped (undecodable) just before each example. In order
  (--deterministic) every skipped record is counted; out of order, not the
  batches dropped for an image the decoder rejects (decoded_batches)."""
  if spec.deterministic:
    ds = _loaded(ds, reading, source, spec, training=True)
    ds = ds.batch(per_replica_batch, drop_remainder=True).scan(
        tf.constant(-1, tf.int64), skips.with_rejections)
  else:
    ds = decoded_batches(ds, reading, source, spec, batch_size=per_replica_batch)
  ds = ds.map(functools.partial(checked, source.num_classes, reading.describe))
  return finish(ds, spec.deterministic, spec.slack)


def eval_batches(ds, reading, source, spec, *, num_examples, per_replica_batch):
  """(images, labels, weights): the usable examples in order with weight 1,
  then zero-weight padding up to exactly num_examples."""
  size = spec.image_size
  ds = _loaded(ds, reading, source, spec, training=False)
  ds = ds.map(lambda number, example: {"image": example["image"], "label": example["label"],
                                       "weight": tf.constant(1.0), "where": example["where"]})
  padding = tf.data.Dataset.from_tensors({
      "image": tf.zeros([size, size, 3], tf.uint8), "label": tf.constant(0, tf.int64),
      "weight": tf.constant(0.0),
      "where": tf.nest.map_structure(lambda s: tf.zeros([], s.dtype), ds.element_spec["where"])})
  ds = ds.concatenate(padding.repeat()).take(num_examples)

  def check(batch):
    with tf.control_dependencies([_label_check(batch["label"], batch["where"],
                                               source.num_classes, reading.describe)]):
      return tf.identity(batch["image"]), batch["label"], batch["weight"]

  return finish(ds.batch(per_replica_batch, drop_remainder=True).map(check))
