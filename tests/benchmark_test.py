"""The benchmark harness runs its modes end to end on tiny cases (no speed is asserted)."""

import json
import os
import tempfile

from absl.testing import absltest

from tests import launching


class BenchmarkTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.output = os.path.join(tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir()), "out.json")

  def run_benchmark(self, *args):
    result = launching.run("launch.benchmark", f"--output={self.output}", *args)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    with open(self.output) as f:
      return result.stdout, json.load(f)

  def test_train_mode_rows_in_turns(self):
    stdout, report = self.run_benchmark(
        "--mode=train", "--models=resnet20", "--batch_sizes=8", "--steps_per_loop=1,2",
        "--seconds=0.2", "--rounds=2")
    rows = report["results"]
    self.assertEqual([(r["model"], r["steps_per_loop"]) for r in rows],
                     [("resnet20", 1), ("resnet20", 2)])
    for row in rows:
      self.assertGreater(row["images_per_second"], 0)
      low, high = row["step_ms_range"]
      self.assertTrue(low <= row["step_ms"] <= high, row)
      # step_ms is rounded to 0.1 ms, images_per_second to 0.01: equal within those roundings
      # (a fast step of 20 ms leaves 8000 / step_ms up to 1 image/s off).
      self.assertBetween(row["images_per_second"], 8000 / (row["step_ms"] + 0.05) - 0.005,
                         8000 / (row["step_ms"] - 0.05) + 0.005)
      self.assertAlmostEqual(row["gmacs_per_image"], 0.041, delta=0.001)  # ResNet-20 at 32x32
      self.assertAlmostEqual(row["model_gflops"],
                             row["images_per_second"] * 6 * row["gmacs_per_image"], delta=0.3)
      self.assertGreater(row["peak_gflops"], 0)
      self.assertGreater(row["peak_rss_mb"], 100)
    self.assertIn("| resnet_dist | resnet20 | 8 |", stdout)  # the markdown table

  def test_resnet50_against_the_keras_peer_in_turns(self):
    _, report = self.run_benchmark(
        "--mode=train", "--models=resnet50", "--batch_sizes=2", "--image_size=64",
        "--peers=keras", "--seconds=0.4", "--rounds=2")
    ours, peer = report["results"]
    self.assertEqual((ours["kind"], peer["kind"]), ("resnet_dist", "keras_peer"))
    self.assertEqual((peer["batch"], peer["image_size"]), (2, 64))
    self.assertAlmostEqual(peer["ours_to_this"],
                           ours["images_per_second"] / peer["images_per_second"], delta=0.01)
    # keras.applications' ResNet50 (v1) costs 3.858 GMACs at 224: at 64, (64/224)**2 of that.
    self.assertAlmostEqual(peer["gmacs_per_image"], 3.858 * (64 / 224)**2, delta=0.001)

  def test_profiles_list_the_ops_by_time(self):
    directory = self.create_tempdir().full_path
    _, report = self.run_benchmark(
        "--mode=train", "--models=resnet20", "--batch_sizes=8", "--seconds=0.2", "--rounds=1",
        f"--profile_dir={directory}")
    row, = report["results"]
    ops = dict(row["top_ops_ms_per_step"])
    # A ResNet's step: convolutions forward and both backward, the longest ops.
    self.assertTrue({"Conv2D", "Conv2DBackpropFilter", "Conv2DBackpropInput"} <= set(ops), ops)
    self.assertTrue(all(ms > 0 for ms in ops.values()), ops)
    self.assertEqual([ms for _, ms in row["top_ops_ms_per_step"]],
                     sorted(ops.values(), reverse=True))
    self.assertTrue(os.path.isdir(row["profile_dir"]) and
                    row["profile_dir"].startswith(directory), row["profile_dir"])

  def test_an_unknown_peer_is_one_line(self):
    result = launching.run("launch.benchmark", "--mode=train", "--peers=keras,mxnet")
    self.assertEqual(result.returncode, 2, result.stderr[-2000:])
    self.assertEqual(result.stderr, "error: flag --peers=['keras', 'mxnet']: must name peers "
                                    "among keras, modelgarden, torch, torch_compile\n")

  def test_input_mode_compares_with_the_bare_pipeline(self):
    _, report = self.run_benchmark("--mode=input", "--num_images=16", "--batch_size=8",
                                   "--image_size=64", "--warmup_batches=1", "--seconds=0.5",
                                   "--rounds=2", "--cores=1", "--host_images_per_second=1000")
    rows = report["results"]
    self.assertEqual([row["pipeline"] for row in rows],
                     ["resnet_dist", "resnet_dist randaugment",
                      "resnet_dist trivialaugment_wide", "resnet_dist rand-m7-mstd0.5-inc1",
                      "bare tf.data"])
    ours, bare = rows[0], rows[-1]
    for row in rows:
      self.assertEqual(row["cores"], 1)  # measured in a process on one CPU
      low, high = row["images_per_second_range"]
      self.assertTrue(low - 1 <= row["images_per_second"] <= high + 1, row)  # ends are rounded
      self.assertGreater(row["cpu_ms_per_image"], 0)
      self.assertAlmostEqual(row["host_cores"], row["cpu_ms_per_image"], delta=0.06)  # 1000/s
    for augmented in rows[1:4]:
      self.assertAlmostEqual(augmented["extra_cpu_ms_per_image"],
                             augmented["cpu_ms_per_image"] - ours["cpu_ms_per_image"], delta=0.01)
    self.assertAlmostEqual(ours["ratio_to_bare"],
                           ours["images_per_second"] / bare["images_per_second"], delta=0.01)
    self.assertAlmostEqual(ours["cpu_ratio_to_bare"],
                           ours["cpu_ms_per_image"] / bare["cpu_ms_per_image"], delta=0.01)


if __name__ == "__main__":
  absltest.main()
