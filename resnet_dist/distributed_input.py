"""The input through the strategy: what the replicas read their batches
from, and how the distributed iterators are let go.

A distributed iterator's per-device datasets do not autotune (tf_patches,
applied when the strategy is created, and here for a strategy built
elsewhere), yet destroying one can still wait for its pipeline's threads;
drop_in_background() keeps that wait out of the run.
"""

import atexit
import threading

import tensorflow as tf

from resnet_dist import strategy as strategy_lib
from resnet_dist import tf_patches


def distribute_input(strategy, dataset_fn):
  """What the replicas take their batches from: the dataset dataset_fn makes
  for each input pipeline, distributed by the strategy, and copied to the
  devices unless every replica is a CPU device.

  One replica on a CPU reads its dataset directly: a distributed dataset's
  iterator (a MultiDeviceIterator, with nothing to copy here) slows every
  training step in the process by 5-7% on CPUs, steps that do not read from
  it included (docs/benchmarks.md), and strategy.run takes plain tensors.
  """
  if strategy.num_replicas_in_sync == 1 and strategy_lib.all_on_cpu(strategy):
    return dataset_fn(tf.distribute.InputContext())
  tf_patches.apply()  # a no-op after create_strategy(); for a strategy built elsewhere
  return strategy.distribute_datasets_from_function(
      dataset_fn, options=tf.distribute.InputOptions(
          experimental_fetch_to_device=not strategy_lib.all_on_cpu(strategy)))


def input_wait_measurable(strategy):
  """Whether timing next(iterator) in the train loop measures input waits.

  Over several logical CPU devices it does not: the replicas' kernels occupy
  the inter-op threads the distributed iterator also needs, so next() waits
  for a thread while the step computes. On synthetic data, where input costs
  nothing, it read a quarter to a half of the time there; a third inter-op
  thread hides that but costs throughput.
  """
  return strategy.num_replicas_in_sync == 1 or not strategy_lib.all_on_cpu(strategy)


_dropping = []             # the threads drop_in_background() started
_wait_for_drops_at_exit = [True]


def drop_in_background(holder):
  """Empties holder, a list holding the only references to distributed
  iterators, in a daemon thread.

  Destroying an iterator can still wait for its pipeline's threads (the
  per-device autotuning that made it wait up to a minute is off,
  tf_patches); a run done with its input has no reason to wait at all. A
  process that ends with os._exit (the entrypoints) does not wait for the
  thread either; one that finalizes normally (a notebook, a test) waits at
  exit (_wait_for_drops).
  """
  thread = threading.Thread(target=holder.clear, name="drop-iterators", daemon=True)
  thread.start()
  _dropping.append(thread)


def ends_without_finalization():
  """Says that this process will end with os._exit, skipping Python's
  finalization, so no iterator need be destroyed before it ends."""
  _wait_for_drops_at_exit[0] = False


@atexit.register
def _wait_for_drops():
  # A daemon thread still inside TensorFlow's C++ code when Python finalizes
  # is unwound by force, and the process aborts ("FATAL: exception not
  # rethrown"): a process that finalizes lets the drops finish first.
  if _wait_for_drops_at_exit[0]:
    for thread in _dropping:
      thread.join()
