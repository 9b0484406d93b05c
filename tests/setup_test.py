"""The pinned environment: all five dependencies import together in one process."""

import importlib.metadata

from absl.testing import absltest


class EnvironmentTest(absltest.TestCase):

  def test_all_dependencies_import_in_one_process(self):
    import absl  # pylint: disable=unused-import
    import tensorboard  # pylint: disable=unused-import
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from cloud_tpu_client import Client  # pylint: disable=unused-import
    import keras
    self.assertEqual(tf.__version__, "2.21.0")
    self.assertEqual(keras.__version__.split(".")[0], "3")
    self.assertTrue(hasattr(tfds, "builder"))

  def test_protobuf_was_not_dragged_down_by_cloud_tpu_client(self):
    major = int(importlib.metadata.version("protobuf").split(".")[0])
    self.assertGreaterEqual(major, 6)
    # cloud-tpu-client's own pin would have installed google-api-python-client 1.8.
    client = importlib.metadata.version("google-api-python-client")
    self.assertGreaterEqual(int(client.split(".")[0]), 2)

  def test_tensorflow_resolves_named_tpus_through_cloud_tpu_client(self):
    from tensorflow.python.distribute.cluster_resolver.tpu import tpu_cluster_resolver
    # TF falls back to its own, older client when cloud_tpu_client is missing.
    self.assertEqual(tpu_cluster_resolver.client.__name__, "cloud_tpu_client.client")


if __name__ == "__main__":
  absltest.main()
