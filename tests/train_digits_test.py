"""`make train`'s run reaches its target: >= 97% test accuracy on digits."""

import json
import os

from absl.testing import absltest
from tests import launching

TARGET_TOP1 = 0.97


class DefaultRunTest(absltest.TestCase):

  def test_default_recipe_reaches_its_accuracy_target(self):
    model_dir = self.create_tempdir().full_path  # fresh: a finished run would only resume
    # The same command as `make train`, in a model_dir of the test's own.
    result = launching.run_train("--flagfile=launch/configs/digits.cfg",
                                 f"--model_dir={model_dir}", f"--data_dir={model_dir}/data",
                                 timeout=1500)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    with open(os.path.join(model_dir, "summary.json")) as f:
      summary = json.load(f)
    print(json.dumps(summary, indent=2))
    self.assertEqual(summary["eval_examples"], 359)
    self.assertGreaterEqual(summary["eval_top1"], TARGET_TOP1)


if __name__ == "__main__":
  absltest.main()
