"""TensorFlow's private code is changed when a strategy is created, never by
an import: a process that imports resnet_dist for its settings, its tables
or its flags keeps TensorFlow as it is.

The library is imported inside the test, after the original is read, so
nothing of it may be imported at the top of this file.
"""

import importlib
import pkgutil

import resnet_dist  # before TensorFlow: its CPU kernels
from absl.testing import absltest
from tensorflow.python.data.ops import multi_device_iterator_ops


def create_device_dataset():
  return multi_device_iterator_ops._create_device_dataset  # pylint: disable=protected-access


def import_the_library():
  """Every module of resnet_dist, and the flags, which read its tables."""
  for module in pkgutil.walk_packages(resnet_dist.__path__, "resnet_dist."):
    importlib.import_module(module.name)
  importlib.import_module("flags.definitions")


class PatchTest(absltest.TestCase):

  def test_importing_leaves_tensorflow_alone_and_a_strategy_patches_it_once(self):
    # One test, in this order: which TensorFlow a later test would see
    # depends on what an earlier one created.
    original = create_device_dataset()
    self.assertFalse(getattr(original, "untuned", False), "patched before the library")
    import_the_library()
    self.assertIs(create_device_dataset(), original, "an import patched TensorFlow")

    strategy_lib = importlib.import_module("resnet_dist.strategy")
    config_lib = importlib.import_module("resnet_dist.config")
    strategy_lib.create_strategy(config_lib.DistributeConfig(strategy="one_device"))
    patched = create_device_dataset()
    self.assertIsNot(patched, original)
    self.assertTrue(patched.untuned)

    strategy_lib.create_strategy(config_lib.DistributeConfig(strategy="one_device"))
    self.assertIs(create_device_dataset(), patched, "patched twice")


if __name__ == "__main__":
  absltest.main()
