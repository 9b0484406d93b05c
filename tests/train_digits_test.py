"""`make train`'s run reaches its target (>= 97% test accuracy on digits) and ends
right after its last line."""

import json
import os
import time

from absl.testing import absltest
from tests import launching

TARGET_TOP1 = 0.97


class DefaultRunTest(absltest.TestCase):

  def test_default_recipe_reaches_its_accuracy_target(self):
    model_dir = self.create_tempdir().full_path  # fresh: a finished run would only resume
    # The same command as `make train`, in a model_dir of the test's own.
    process = launching.start("launch.train", "--flagfile=launch/configs/digits.cfg",
                              f"--model_dir={model_dir}", f"--data_dir={model_dir}/data")
    last_line = time.time()
    for _ in process.stdout:
      last_line = time.time()
    _, err = process.communicate(timeout=1500)
    self.assertEqual(process.returncode, 0, err[-3000:])
    self.assertEqual(err, "", "a healthy run writes nothing to stderr")
    # A hang detector, not a speed test: the process used to idle up to a minute
    # after its last line (tf.data iterators in Python's final garbage collection).
    lingered = time.time() - last_line
    print(f"exited {lingered:.1f} s after its last line")
    self.assertLess(lingered, 20)
    with open(os.path.join(model_dir, "summary.json")) as f:
      summary = json.load(f)
    print(json.dumps(summary, indent=2))
    self.assertEqual(summary["eval_examples"], 359)
    self.assertGreaterEqual(summary["eval_top1"], TARGET_TOP1)


if __name__ == "__main__":
  absltest.main()
