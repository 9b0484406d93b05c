"""Several workers as processes: the local launcher (a dead worker, SIGTERM to
one worker or to the launcher) and the pods of launch.kubernetes's Job.

(That 2 workers train the weights one device does is tests/equivalence_test.py.)
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
import numpy as np
import tensorflow as tf
from absl.testing import absltest, parameterized

from launch import kubernetes
from tests import launching


def two_workers(model_dir):
  """launch.multi_worker and its arguments: 2 local workers training digits into model_dir."""
  return ("launch.multi_worker", "--num_workers=2", "--", "--flagfile=launch/configs/digits.cfg",
          "--model=resnet8", "--global_batch_size=32", "--steps_per_loop=2",
          f"--model_dir={model_dir}",
          f"--data_dir={model_dir}/data")


class MultiWorkerLauncherTest(absltest.TestCase):

  def start_and_wait_for_progress(self, model_dir, *extra):
    """Starts 2 local workers; returns (launcher, {index: pid}) once worker 0 has trained."""
    launcher = launching.start(*two_workers(model_dir), "--log_every_steps=2", *extra)
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

  def test_a_dead_worker_ends_the_others_with_one_line(self):
    model_dir = self.create_tempdir().full_path
    launcher, pids = self.start_and_wait_for_progress(model_dir, "--train_steps=400")
    os.kill(pids[1], signal.SIGKILL)
    began = time.time()
    out, err = launcher.communicate(timeout=300)
    lasted = time.time() - began
    print(f"launcher exited {lasted:.1f} s after the worker died")
    # The shell's status for a process killed by SIGKILL, as the launcher says.
    self.assertEqual(launcher.returncode, 128 + signal.SIGKILL)
    self.assertIn("worker 1 was killed by SIGKILL (status 137); ending the others", err)
    # Worker 0 sits in a collective with its dead peer, where the launcher's
    # SIGTERM cannot reach it; TensorFlow's heartbeats end it, with one line,
    # before the launcher's SIGKILL would (30 s).
    self.assertIn("[worker 0] error: worker 1 stopped responding; start every worker again "
                  "to resume from the last checkpoint", out)
    self.assertNotIn("Traceback", out)
    # TensorFlow's own account of it reaches the survivor's stderr (a task of
    # several logs TensorFlow's errors, launch/exits.py).
    self.assertRegex(out, r"\[worker 0\] E\d{4} .*(StartAbort|[Cc]oordination)")
    self.assertLess(lasted, 30)

  def test_sigterm_to_one_worker_saves_on_all_and_resumes_bit_exactly(self):
    """Catches a resume that restarts the input, the step's random draws or
    the optimizer's state anywhere but where the stopped run left them: the
    weights would differ from an uninterrupted run's."""
    model_dir = self.create_tempdir().full_path
    launcher, pids = self.start_and_wait_for_progress(model_dir, *EXACT)
    os.kill(pids[1], signal.SIGTERM)  # only worker 1, as a preempted VM would see it
    out, _ = launcher.communicate(timeout=300)
    self.assertEqual(launcher.returncode, 75, out[-3000:])
    # Worker 0, the chief, got no signal: it stopped because worker 1 did, at the same step
    # (the save is collective), and the chief's log says so.
    saved = re.findall(r"\[worker 0\] a signal to another worker: saved a checkpoint at "
                       r"step (\d+)", out)
    self.assertLen(saved, 1, out[-3000:])
    step = int(saved[0])
    self.assertLess(step, 16)
    self.assertEqual(tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")),
                     os.path.join(model_dir, "checkpoints", f"ckpt-{step}"))
    again = launching.run(*two_workers(model_dir), *EXACT)
    self.assertEqual(again.returncode, 0, again.stdout[-3000:])
    self.assertIn(f"[worker 0] resuming from step {step}", again.stdout)
    self.assertIn("[worker 0] done: 16 steps", again.stdout)
    straight_dir = self.create_tempdir().full_path
    straight = launching.run(*two_workers(straight_dir), *EXACT)
    self.assertEqual(straight.returncode, 0, straight.stdout[-3000:])
    resumed, uninterrupted = model_of(model_dir), model_of(straight_dir)
    self.assertEqual(sorted(resumed), sorted(uninterrupted))
    self.assertGreater(len(resumed), 30)  # every weight and BN statistic of resnet8
    for key, value in uninterrupted.items():
      if "moving_" in key:
        # A stop's checkpoint holds the workers' mean BN statistics, which
        # the uninterrupted run averages only at its next save
        # (docs/checkpoints.md): they agree to rounding.
        np.testing.assert_allclose(resumed[key], value, rtol=1e-6, err_msg=key)
      else:
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)


# A 16-step run that resumes bit-exactly.
EXACT = ("--train_steps=16", "--deterministic", "--skip_eval")


def model_of(model_dir):
  """{key: value} of the model variables in a run's latest checkpoint."""
  reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints"))
  return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
          if key.startswith("model/")}


class LauncherSignalTest(parameterized.TestCase):

  # Ctrl-C. A scheduler's SIGTERM takes the same way (the launcher forwards
  # both; the trainer handles both alike) and is tested on one worker above.
  @parameterized.parameters(("SIGINT",))
  def test_a_signal_to_the_launcher_stops_every_worker_with_a_checkpoint(self, name):
    model_dir = self.create_tempdir().full_path
    launcher = launching.start(*two_workers(model_dir), "--train_steps=400",
                               "--log_every_steps=2")
    for line in launcher.stdout:
      if line.startswith("[worker 0] step "):
        break
    launcher.send_signal(getattr(signal, name))
    out, err = launcher.communicate(timeout=120)
    self.assertEqual(launcher.returncode, 75, err[-3000:])
    saved = re.findall(rf"\[worker 0\] {name}: saved a checkpoint at step (\d+)", out)
    self.assertLen(saved, 1, out[-3000:])
    self.assertEqual(tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")),
                     os.path.join(model_dir, "checkpoints", f"ckpt-{saved[0]}"))


class TasksAgreeTest(absltest.TestCase):

  def test_workers_given_different_settings_stop_with_one_line_each(self):
    """Two workers started by hand, one with --train_steps=40, one with 80:
    both ended in a TensorFlow traceback ("Shape mismatch in the collective
    instance"); others would deadlock or train something else."""
    model_dir = self.create_tempdir().full_path
    base = free_port_pair()
    hosts = [f"127.0.0.1:{base}{index}" for index in (0, 1)]
    workers = []
    for index, steps in enumerate((40, 80)):
      config = json.dumps({"cluster": {"worker": hosts},
                           "task": {"type": "worker", "index": index}})
      workers.append(subprocess.Popen(
          launching.command("launch.train", "--flagfile=launch/configs/digits.cfg",
                            "--model=resnet8", f"--train_steps={steps}",
                            f"--model_dir={model_dir}", f"--data_dir={model_dir}/data"),
          cwd=launching.ROOT, env={**launching.ENV, "TF_CONFIG": config},
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for index, worker in enumerate(workers):
      out, err = worker.communicate(timeout=300)
      self.assertEqual(worker.returncode, 2, err[-3000:])
      self.assertEqual(err.count("\n"), 1, err)
      self.assertEqual(err, f"error: the tasks of this run were given different settings "
                            f"(--train_steps; here --train_steps={40 * (index + 1)}); start "
                            f"every task with the same flags\n")
      self.assertNotIn("step ", out)
    self.assertFalse(os.path.exists(os.path.join(model_dir, "checkpoints")))


def thread_count(pid):
  """Threads of a live process; None once it is gone (never a count of 0)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
  except (OSError, StopIteration):
    return None


def free_port_pair():
  """A base B for which ports B0 and B1 are free: worker {index} at B{index}."""
  for _ in range(100):
    base = random.randrange(2000, 6500)
    try:
      for index in (0, 1):
        with socket.socket() as s:
          s.bind(("127.0.0.1", int(f"{base}{index}")))
      return base
    except OSError:
      continue
  raise AssertionError("no two free ports")


def start_pods(model_dir, *train_args):
  """The 2 pods of launch.kubernetes's Job as processes of this machine: each
  runs the container's command with the container's variables and the index
  Kubernetes adds. Only the address changes: the pods' DNS names do not
  resolve here, and two local workers cannot share a port."""
  # model_dir as the pods see a shared claim mounted there.
  job = kubernetes.Job("train", "image", ["--flagfile=launch/configs/digits.cfg",
                                          "--model=resnet8", f"--model_dir={model_dir}/run",
                                          f"--data_dir={model_dir}/data", *train_args],
                       volume=f"runs:{model_dir}")
  command, env = launching.pod_of(job)
  command[0] = sys.executable  # the image's python
  env["RESNET_DIST_WORKER_ADDRESS"] = f"127.0.0.1:{free_port_pair()}{{index}}"
  return [subprocess.Popen(command, cwd=launching.ROOT,
                           env={**launching.ENV, **env, "JOB_COMPLETION_INDEX": str(index)},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for index in (0, 1)]


class KubernetesPodsTest(absltest.TestCase):

  def test_the_jobs_pods_train_one_model_and_their_threads_stay_bounded(self):
    # A collective timeout held a thread per collective for its whole length
    # (thousands within minutes); nothing may grow with the number of steps.
    model_dir = self.create_tempdir().full_path
    pods = start_pods(model_dir, "--global_batch_size=32", "--train_steps=50",
                      "--steps_per_loop=10", "--log_every_steps=10", "--skip_eval")
    outputs = [[], []]
    readers = [threading.Thread(target=lambda p=p, o=o: o.extend(p.stdout))
               for p, o in zip(pods, outputs)]
    for reader in readers:
      reader.start()
    at_step = {}  # worker threads when worker 0 reports step N
    while any(pod.poll() is None for pod in pods):
      steps = [int(m.group(1)) for m in map(re.compile(r"step (\d+)/").match,
                                             list(outputs[0])) if m]
      counts = [c for c in (thread_count(pod.pid) for pod in pods) if c is not None]
      if steps and steps[-1] not in at_step and len(counts) == 2:
        at_step[steps[-1]] = max(counts)
      time.sleep(0.1)
    for reader in readers:
      reader.join()
    chief, other = ("".join(lines) for lines in outputs)
    self.assertEqual([pod.returncode for pod in pods], [0, 0], chief[-3000:] + other[-3000:])
    self.assertIn("strategy   multi_worker_mirrored: 2 replica(s), worker 0 of 2 tasks", chief)
    self.assertIn("done: 50 steps", chief)
    # Tasks of several log TensorFlow's errors; a healthy run has none to log.
    for output in (chief, other):
      self.assertNotRegex(output, r"(?m)^[EF]\d{4} ", output[-3000:])
    self.assertNotIn("done:", other)  # one run of two tasks, reported by its chief
    self.assertIn("finished at step 50, worker 1 of 2 tasks, 1 CPU replica each; the chief "
                  "writes the run's summary", other)
    self.assertFalse(os.path.exists(os.path.join(model_dir, "run", "scratch", "worker_1")),
                     "worker 1 left its copy of a checkpoint")
    print(f"threads per worker at step N: {at_step}")
    self.assertGreaterEqual(len(at_step), 3, at_step)
    self.assertGreater(min(at_step.values()), 20)  # a TensorFlow process: counted, not gone
    self.assertLess(max(at_step.values()), 300)
    # Once the first steps have run, more steps add no threads.
    later = [count for step, count in at_step.items() if step >= 30]
    self.assertLessEqual(max(later), at_step[min(at_step)] + 10, at_step)


if __name__ == "__main__":
  absltest.main()
