"""Skip accounting: the examples of an encoded split found unusable, dropped
and counted on the next example kept.

Bad images: an image found unusable before decoding (empty, cut short, not
an image, a corrupt record, one that is no Example or lacks a feature) and
one the decoder rejects are skipped and counted (the third element of every
training batch is the number of records skipped just before each example;
out of order, an image the decoder rejects drops its batch, uncounted:
decoding.decoded_batches), or, with strict, stop the run naming the record
or file. A label outside 0..num_classes-1 always stops the run.

Every example is numbered in read order before anything can drop it, so
the gaps in the numbers are the examples skipped: usable() counts those
dropped a group at a time before decoding, with_rejections() those the
decoder rejected.
"""

import tensorflow as tf

from resnet_dist.data import preprocess as preprocess_lib
from resnet_dist.data.input_errors import BAD_IMAGE

GROUP = 64           # examples parsed and checked by one call


def usable(ds, reading, strict):
  """The examples of ds that look decodable, in order, each a dict of key,
  image (encoded), label, where and skipped: the examples dropped just before
  it (unusable, unreadable, a record that does not parse). Under strict the
  first unusable one stops the run, named instead.

  reading.usable_groups(numbered elements, strict) reads and checks the
  (number, element) pairs a group at a time (kept()).
  """
  groups = reading.usable_groups(ds.enumerate(), strict)
  # A group that fails as a whole (a record damaged inside its Example) is
  # dropped: the gap in the numbering counts its records.
  groups = groups if strict else groups.ignore_errors()
  return groups.scan(tf.constant(-1, tf.int64), _with_skips).unbatch()


def kept(numbers, examples, reasons, *, strict, describe):
  """(numbers, examples) of a group, without those unusable: with a reason
  found before, or an image that does not look decodable. Under strict the
  first unusable one stops the run instead, with its reason and
  describe(where), its name."""
  reasons = tf.where((reasons == "") & ~preprocess_lib.looks_decodable(examples["image"]),
                     BAD_IMAGE, reasons)
  keep = reasons == ""
  if strict:
    first = tf.argmin(tf.cast(keep, tf.int32))
    named = describe(tf.nest.map_structure(lambda t: t[first], examples["where"]))
    with tf.control_dependencies([tf.debugging.Assert(tf.reduce_all(keep),
                                                      [reasons[first]] + named)]):
      keep = tf.identity(keep)
  return unless_all(keep, (numbers, examples), lambda: tf.nest.map_structure(
      lambda t: tf.boolean_mask(t, keep), (numbers, examples)))


def unless_all(flags, unchanged, changed):
  """unchanged where every flag is true, else changed(): the group's images are
  copied by a swap or a mask, which all but a few groups do not need."""
  return tf.cond(tf.reduce_all(flags), lambda: unchanged, changed)


def _with_skips(previous, group):
  """scan() over kept groups: each example with the examples dropped since
  the one before it (previous: the number of the last example kept)."""
  numbers, examples = group
  numbered = tf.concat([[previous], numbers], 0)
  return numbered[-1], {**examples, "skipped": numbers - numbered[:-1] - 1}


def with_rejections(previous, batch):
  """scan() over in-order batches of (numbers, examples) numbered before
  decoding: each example's skipped count with the images the decoder
  rejected just before it (the gaps in the numbers)."""
  numbers, examples = batch
  rejected = numbers - tf.concat([[previous], numbers[:-1]], 0) - 1
  return numbers[-1], {**examples, "skipped": examples["skipped"] + rejected}
