"""The train entrypoint as users run it: flags, one-line errors, a short real run."""

import json
import os

from absl.testing import absltest

from tests.launching import run_train


class BadInputTest(absltest.TestCase):

  def assert_one_line_error(self, result, pattern):
    self.assertEqual(result.returncode, 2, result.stderr)
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    self.assertLen(lines, 1, result.stderr)
    self.assertRegex(lines[0], pattern)
    self.assertNotIn("Traceback", result.stderr)

  def test_unknown_model(self):
    self.assert_one_line_error(run_train("--model=resnet9000"), r"--model=resnet9000.*resnet50")

  def test_unknown_dataset(self):
    self.assert_one_line_error(run_train("--dataset=nope"), r"--dataset must be digits")

  def test_batch_that_does_not_divide_among_replicas(self):
    model_dir = self.create_tempdir().full_path
    result = run_train("--global_batch_size=7", "--num_cpu_devices=2",
                       f"--model_dir={model_dir}", "--data_dir=" + model_dir)
    self.assert_one_line_error(result, r"--global_batch_size=7 does not divide among 2")

  def test_unwritable_model_dir_fails_before_training(self):
    blocker = self.create_tempfile("file").full_path  # a file where a directory should be
    result = run_train(f"--model_dir={blocker}/run", "--data_dir=" + self.create_tempdir().full_path)
    self.assert_one_line_error(result, r"--model_dir=.* is not writable")

  def test_tpu_strategy_without_a_tpu_fails_fast_and_clearly(self):
    data_dir = self.create_tempdir().full_path
    for tpu, pattern in (("", r"no TPU is attached"),
                         ("grpc://127.0.0.1:9", r"--tpu=grpc://127.0.0.1:9: cannot connect")):
      result = run_train("--strategy=tpu", f"--tpu={tpu}", f"--data_dir={data_dir}",
                         f"--model_dir={data_dir}/run", timeout=120)
      self.assert_one_line_error(result, pattern)
      self.assertFalse(os.path.exists(f"{data_dir}/run"))  # nothing written

  def test_helpshort_lists_the_flags(self):
    result = run_train("--helpshort")
    self.assertEqual(result.returncode, 0, result.stderr)
    for flag in ("--model", "--dataset", "--strategy", "--global_batch_size", "--dtype"):
      self.assertIn(flag, result.stdout)


class ShortRunTest(absltest.TestCase):

  def test_trains_and_writes_summary(self):
    model_dir = self.create_tempdir().full_path
    result = run_train("--flagfile=launch/configs/digits.cfg", "--train_steps=6",
                       "--steps_per_loop=3", "--log_every_steps=3",
                       f"--model_dir={model_dir}", f"--data_dir={model_dir}/data")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn("step 6/6", result.stdout)
    self.assertIn(f"tensorboard --logdir {model_dir}", result.stdout)
    with open(os.path.join(model_dir, "summary.json")) as f:
      summary = json.load(f)
    for key in ("global_step", "train_loss", "eval_top1", "eval_top5", "eval_examples",
                "examples_per_second", "strategy", "num_replicas", "model", "dataset"):
      self.assertIn(key, summary)
    self.assertEqual(summary["global_step"], 6)
    self.assertEqual(summary["eval_examples"], 359)
    self.assertEqual(summary["strategy"], "mirrored")
    self.assertEqual(summary["num_replicas"], 2)
    self.assertTrue(os.listdir(os.path.join(model_dir, "train")))
    self.assertTrue(os.listdir(os.path.join(model_dir, "checkpoints")))


if __name__ == "__main__":
  absltest.main()
