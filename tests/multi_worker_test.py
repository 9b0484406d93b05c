"""The local multi-worker launcher: a dead worker, and SIGTERM to one worker.

(That 2 workers train the weights one device does is tests/equivalence_test.py.)
"""

import os
import re
import signal
import time

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
import tensorflow as tf
from absl.testing import absltest

from tests import launching


def two_workers(model_dir):
  """launch.multi_worker and its arguments: 2 local workers training digits into model_dir."""
  return ("launch.multi_worker", "--num_workers=2", "--", "--flagfile=launch/configs/digits.cfg",
          "--global_batch_size=32", "--steps_per_loop=2", f"--model_dir={model_dir}",
          f"--data_dir={model_dir}/data")


class MultiWorkerLauncherTest(absltest.TestCase):

  def start_and_wait_for_progress(self, model_dir, *extra):
    """Starts 2 local workers; returns (launcher, {index: pid}) once worker 0 has trained."""
    launcher = launching.start(*two_workers(model_dir), "--log_every_steps=2",
                               "--collective_timeout_seconds=30", *extra)
    pids, lines, deadline = {}, [], time.time() + 300
    for line in launcher.stdout:
      lines.append(line)
      found = re.match(r"\[launcher\] worker (\d): pid (\d+)", line)
      if found:
        pids[int(found.group(1))] = int(found.group(2))
      if line.startswith("[worker 0] step ") or time.time() > deadline:
        break
    self.assertEqual(sorted(pids), [0, 1], "".join(lines))
    return launcher, pids

  def test_a_dead_worker_ends_the_launch_with_an_error(self):
    model_dir = self.create_tempdir().full_path
    launcher, pids = self.start_and_wait_for_progress(model_dir, "--train_steps=400")
    os.kill(pids[1], signal.SIGKILL)
    began = time.time()
    _, err = launcher.communicate(timeout=300)
    self.assertNotEqual(launcher.returncode, 0)
    self.assertIn("worker 1 failed with status -9; ending the others", err)
    print(f"launcher exited {time.time() - began:.1f} s after the worker died")

  def test_sigterm_to_one_worker_saves_on_all_and_resumes(self):
    model_dir = self.create_tempdir().full_path
    launcher, pids = self.start_and_wait_for_progress(model_dir, "--train_steps=16")
    os.kill(pids[1], signal.SIGTERM)  # only worker 1, as a preempted VM would see it
    out, _ = launcher.communicate(timeout=300)
    self.assertEqual(launcher.returncode, 75, out[-3000:])
    # Worker 0, the chief, got no signal: it stopped because worker 1 did, at the same step
    # (the save is collective), and the chief's log says which.
    saved = re.findall(r"\[worker 0\] SIGTERM: saved a checkpoint at step (\d+)", out)
    self.assertLen(saved, 1, out[-3000:])
    step = int(saved[0])
    self.assertEqual(tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")),
                     os.path.join(model_dir, "checkpoints", f"ckpt-{step}"))
    again = launching.run(*two_workers(model_dir), "--train_steps=16", "--skip_eval")
    self.assertEqual(again.returncode, 0, again.stdout[-3000:])
    self.assertIn(f"[worker 0] resuming from step {step}", again.stdout)
    self.assertIn("[worker 0] done: 16 steps", again.stdout)


if __name__ == "__main__":
  absltest.main()
