"""A host handed a cluster of several tasks trains one model with the others,
or refuses with one line: never a model of its own.

(That two processes so started train the weights one device does is
tests/equivalence_test.py, started as the README says.)
"""

import json
from unittest import mock

from absl.testing import absltest, parameterized

from resnet_dist import cluster as cluster_lib
from resnet_dist import strategy as strategy_lib
from resnet_dist.config import DistributeConfig
from resnet_dist.errors import ConfigError


def tf_config(num_workers, index=0, chief=False):
  jobs = {"worker": [f"127.0.0.1:{2000 + i}" for i in range(num_workers)]}
  task = {"type": "worker", "index": index}
  if chief:
    jobs["chief"] = ["127.0.0.1:1999"]
    task = {"type": "chief", "index": 0}
  return json.dumps({"cluster": jobs, "task": task})


def cluster_of(num_workers, **kwargs):
  return cluster_lib.from_environment({"TF_CONFIG": tf_config(num_workers, **kwargs)})


class ClusterTest(parameterized.TestCase):

  def test_tf_config_gives_every_training_task_the_chief_first(self):
    cluster = cluster_of(2, chief=True)
    self.assertEqual(cluster.tasks, ("127.0.0.1:1999", "127.0.0.1:2000", "127.0.0.1:2001"))
    self.assertEqual((cluster.task_type, cluster.task_index, cluster.num_tasks), ("chief", 0, 3))
    self.assertEqual(cluster.source, "TF_CONFIG")

  def test_no_or_empty_tf_config_is_no_cluster(self):
    self.assertIsNone(cluster_lib.from_environment({}))
    self.assertIsNone(cluster_lib.from_environment({"TF_CONFIG": " "}))

  @parameterized.named_parameters(
      ("not_json", "{worker", "TF_CONFIG is not valid JSON"),
      ("no_cluster", '{"task": {"type": "worker", "index": 0}}', 'TF_CONFIG has no "cluster"'),
      ("index_outside", tf_config(2, index=2), "is not one of its cluster's chief or worker"),
      ("parameter_server", json.dumps({"cluster": {"worker": ["a:1"], "ps": ["b:1"]},
                                       "task": {"type": "ps", "index": 0}}),
       "is not one of its cluster's chief or worker"))
  def test_a_malformed_tf_config_is_one_line_naming_it(self, text, message):
    with self.assertRaisesRegex(ConfigError, message) as raised:
      cluster_lib.from_environment({"TF_CONFIG": text})
    self.assertNotIn("\n", str(raised.exception))


class ChooseKindTest(parameterized.TestCase):
  """strategy.choose_kind: what --strategy means in a given cluster. A
  broken choice that ignores the cluster (the recipe's own --strategy winning,
  as absl lets a --flagfile after it do) trains N models and fails here."""

  def setUp(self):
    super().setUp()
    # No TPU on this machine, whatever its environment says.
    patcher = mock.patch.object(strategy_lib, "_tpu_attached", return_value=False)
    patcher.start()
    self.addCleanup(patcher.stop)

  def test_auto_in_a_cluster_of_several_tasks_is_multi_worker(self):
    for cluster in (cluster_of(2), cluster_of(2, index=1), cluster_of(1, chief=True)):
      self.assertEqual(strategy_lib.choose_kind("auto", cluster), "multi_worker_mirrored")

  def test_auto_alone_or_in_a_cluster_of_one_task_is_one_host(self):
    self.assertEqual(strategy_lib.choose_kind("auto", None), "mirrored")
    self.assertEqual(strategy_lib.choose_kind("auto", cluster_of(1)), "mirrored")
    self.assertEqual(strategy_lib.choose_kind("auto", None, tpu="my-tpu"), "tpu")

  @parameterized.parameters("one_device", "mirrored", "tpu")
  def test_a_one_host_strategy_in_a_cluster_of_several_tasks_is_refused(self, kind):
    with self.assertRaises(ConfigError) as raised:
      strategy_lib.choose_kind(kind, cluster_of(2, index=1))
    message = str(raised.exception)
    self.assertEqual(message, f"--strategy={kind} would train a separate model on each of the 2 "
                              f"tasks TF_CONFIG names; give --strategy=auto or "
                              f"multi_worker_mirrored (after any --flagfile), or unset TF_CONFIG")

  def test_a_named_tpu_in_a_cluster_of_several_tasks_is_refused(self):
    with self.assertRaisesRegex(ConfigError, "^--tpu=my-tpu would train a separate model"):
      strategy_lib.choose_kind("auto", cluster_of(2), tpu="my-tpu")

  def test_multi_worker_needs_a_cluster(self):
    self.assertEqual(strategy_lib.choose_kind("multi_worker_mirrored", cluster_of(1)),
                     "multi_worker_mirrored")
    with self.assertRaisesRegex(ConfigError, "needs a cluster: set TF_CONFIG"):
      strategy_lib.choose_kind("multi_worker_mirrored", None)

  def test_create_strategy_refuses_before_building_anything(self):
    with mock.patch.dict("os.environ", {"TF_CONFIG": tf_config(2)}), \
        mock.patch.object(strategy_lib.tf.distribute, "MirroredStrategy") as built:
      with self.assertRaisesRegex(ConfigError, "^--strategy=mirrored would train"):
        strategy_lib.create_strategy(DistributeConfig(strategy="mirrored"))
    built.assert_not_called()


if __name__ == "__main__":
  absltest.main()
