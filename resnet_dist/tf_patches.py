"""Where resnet_dist changes TensorFlow's own private code, each change once.

strategy.create_strategy() calls apply(); importing the library changes
nothing, so a process that imports resnet_dist only for its settings or
tables (a notebook, flags/, a test) keeps TensorFlow as it is. Each patch
names what it replaces, which a TensorFlow upgrade must check again.
"""

import tensorflow as tf


def apply():
  """Applies every patch below; again is a no-op."""
  _untune_per_device_input()


def _untune_per_device_input():
  """Turns tf.data autotuning off in the datasets of a MultiDeviceIterator
  (multi_device_iterator_ops._create_device_dataset).

  A distributed iterator (a MultiDeviceIterator, on CPUs too) feeds each
  device through a small dataset of its own: a generator and a prefetch of
  fixed size, nothing to tune. TensorFlow 2.21 still autotunes each, and its
  optimisation thread sleeps up to a minute between rounds without waking
  when the iterator is destroyed: deleting an iterator then waits out the
  sleep, in ~RootDataset::Iterator joining Model::OptimizeLoop
  (docs/benchmarks.md). The training and evaluation pipelines themselves
  keep autotuning.
  """
  from tensorflow.python.data.ops import multi_device_iterator_ops  # pylint: disable=g-import-not-at-top
  create = getattr(multi_device_iterator_ops, "_create_device_dataset", None)
  if create is None or getattr(create, "untuned", False):
    return

  def create_untuned(*args, **kwargs):
    options = tf.data.Options()
    options.autotune.enabled = False
    return create(*args, **kwargs).with_options(options)

  create_untuned.untuned = True
  multi_device_iterator_ops._create_device_dataset = create_untuned  # pylint: disable=protected-access
