"""The benchmark's cases in this process: their sizes and costs from the
model table, what each is compared with, and the training run it times."""

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
from absl.testing import absltest

from launch.benchmarks import cases, in_process, train
from resnet_dist import models
from resnet_dist import run_setup
from resnet_dist.config import Config


class CasesTest(absltest.TestCase):

  def test_the_cifar_models_of_the_model_table_train_at_32x32(self):
    for name in ("resnet8", "resnet20", "resnet110"):  # resnet8: the tests' model
      self.assertEqual(cases.case(name, 8, image_size=224)["image_size"], 32, name)
    for name in ("resnet18", "resnet50"):
      self.assertEqual(cases.case(name, 8, image_size=64)["image_size"], 64, name)
    self.assertLessEqual(cases.cifar_models(), set(models.list_models()))

  def test_the_multiply_adds_of_our_resnet50_and_the_keras_peer(self):
    self.assertAlmostEqual(cases.resnet50_macs() / 1e9, 4.089, delta=0.001)  # v1.5 at 224
    self.assertAlmostEqual(cases.peer_macs(112), 3.858e9 / 4)  # v1, by the image's area
    self.assertAlmostEqual(cases.mac_scaled({"images_per_second": 10.0}), 10.0 * 3.858 / 4.089,
                           delta=1e-3)

  def test_a_round_of_the_budget(self):
    budget = cases.Budget(seconds=9.0, rounds=3, min_steps=5)
    self.assertEqual(budget.one_round(), cases.Budget(seconds=3.0, rounds=1, min_steps=5))


class ComparedTest(absltest.TestCase):

  def test_peers_only_for_one_device_resnet50_without_xla(self):
    case = cases.case("resnet50", 32)
    self.assertEqual([c["kind"] for c in train.peer_cases(case, ["keras"])], ["keras_peer"])
    # An outside peer brings our plain step, the step it is compared by.
    self.assertEqual([(c["kind"], c["model"]) for c in train.peer_cases(case, ["keras", "torch"])],
                     [("resnet_dist_step", "resnet50"), ("keras_peer", "keras ResNet50"),
                      ("torch", "torchvision resnet50")])
    for other in (cases.case("resnet50", 32, strategy="mirrored"),
                  cases.case("resnet50", 32, xla=True), cases.case("resnet18", 32)):
      self.assertEqual(train.peer_cases(other, ["keras", "torch"]), [], other)
    self.assertEqual(train.peer_cases(case, []), [])

  def test_ratios_against_our_plain_step(self):
    rows = [dict(kind="resnet_dist", images_per_second=12.0),
            dict(kind="resnet_dist_step", images_per_second=10.0),
            dict(kind="torch", images_per_second=8.0)]
    loop, step, peer = train.with_ratios(rows)
    self.assertEqual(loop["loop_to_plain_step"], 1.2)
    self.assertEqual(peer["ours_to_this"], 1.25)
    self.assertNotIn("ours_to_this", step)
    self.assertNotIn("ours_to_this", loop)


class RunTest(absltest.TestCase):

  def test_a_case_is_the_config_of_a_training_run(self):
    case = cases.case("resnet20", 16, steps_per_loop=10, input="jpeg via tf.data service",
                      data_dir="records", data_service="localhost:5050")
    config = in_process.case_config(case)
    self.assertEqual(config, Config.from_flat(
        model="resnet20", global_batch_size=16, steps_per_loop=10, image_size=32,
        dataset="imagenet", data_dir="records", num_classes=10, data_service="localhost:5050",
        strategy="one_device", dtype="fp32", enable_xla=False, train_steps=10**6))
    # What a run reads besides: its defaults (a run's shuffle buffer, not one of the benchmark's).
    self.assertEqual(run_setup.input_spec(config).shuffle_buffer, Config().data.shuffle_buffer)
    synthetic = in_process.case_config(cases.case("resnet50", 32, "bf16", image_size=224))
    self.assertEqual((synthetic.data.dataset, synthetic.data.num_classes, synthetic.model.dtype),
                     ("synthetic", 1000, "bf16"))


if __name__ == "__main__":
  absltest.main()
