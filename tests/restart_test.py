"""What only another host or a restarted container shows, with Linux
namespaces standing in for them (root, outside Bazel's sandbox):

- a run whose chief is SIGKILLed restarts with both workers as another
  host's pods (another hostname, the trainer as PID 1 of a new PID
  namespace, as a replaced Kubernetes pod sees itself) and ends with the
  weights of a run never killed, while another run on its model_dir is
  refused as long as the lease is fresh;
- a worker alive but stuck (its input blocks on FIFOs that replaced its
  images mid-run, a mount namespace showing it alone those files, as a
  stalled NFS mount would) ends every worker of the run with status 70 and
  one line, within the progress bound, and the run resumes once restarted.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
import numpy as np
import tensorflow as tf
from absl.testing import absltest

from resnet_dist import watchdog
from launch import multi_worker
from tests import fixtures, launching

# 16 steps that resume bit-exactly, a checkpoint every 4.
EXACT = ["--flagfile=launch/configs/digits.cfg", "--model=resnet8", "--global_batch_size=32",
         "--train_steps=16", "--steps_per_loop=2", "--checkpoint_every_steps=4",
         "--deterministic", "--skip_eval", "--keep_checkpoints=10"]


def tf_configs(ports):
  hosts = [f"127.0.0.1:{port}" for port in ports]
  return [json.dumps(multi_worker.tf_config(hosts, i)) for i in range(len(hosts))]


def as_pod(hostname, command, bind=None):
  """command as PID 1 of a new PID namespace, named `hostname`: how a
  restarted pod on another node sees itself. bind=(source, target) mounts
  source over target for this process alone."""
  mount = f'mount --bind "{bind[0]}" "{bind[1]}" && ' if bind else ""
  return ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "bash", "-c",
          f'{mount}hostname {hostname} && exec "$@"', "bash", *command]


def start_workers(test, args, configs, wrap=lambda index, command: command):
  """One launch.train per TF_CONFIG; output to a file each. (processes, log
  paths); any still running when the test ends are killed."""
  processes, logs = [], []
  for index, config in enumerate(configs):
    log = tempfile.NamedTemporaryFile("w", suffix=f"-worker{index}.log", delete=False)
    command = wrap(index, launching.command("launch.train", *args,
                                            "--strategy=multi_worker_mirrored"))
    processes.append(subprocess.Popen(command, cwd=launching.ROOT,
                                      env={**launching.ENV, "TF_CONFIG": config},
                                      stdout=log, stderr=subprocess.STDOUT, text=True))
    test.addCleanup(lambda p=processes[-1]: p.poll() is None and (p.kill(), p.wait()))
    logs.append(log.name)
  return processes, logs


def read(path):
  with open(path) as f:
    return f.read()


def wait_all(processes, timeout):
  deadline = time.time() + timeout
  for process in processes:
    try:
      process.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
  return [process.returncode for process in processes]


def checkpoint_step(model_dir):
  latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
  return int(latest.rsplit("-", 1)[1]) if latest else 0


def model_of(model_dir):
  reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints"))
  return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
          if key.startswith("model/")}


class RestartElsewhereTest(absltest.TestCase):

  def test_a_killed_chief_restarts_as_other_hosts_pods_and_resumes_bit_exactly(self):
    data_dir = launching.digits_dir()
    model_dir = self.create_tempdir().full_path
    args = [*EXACT, f"--model_dir={model_dir}", f"--data_dir={data_dir}"]
    configs = tf_configs(multi_worker.free_ports(2))
    processes, logs = start_workers(self, args, configs)
    deadline = time.time() + 300
    while checkpoint_step(model_dir) < 4 and time.time() < deadline and all(
        p.poll() is None for p in processes):
      time.sleep(0.05)
    processes[0].send_signal(signal.SIGKILL)  # the chief: its lock stays, freshly renewed
    statuses = wait_all(processes, 120)
    killed_at = checkpoint_step(model_dir)
    self.assertEqual(statuses[0], -signal.SIGKILL, read(logs[0])[-2000:])
    self.assertLess(killed_at, 16, "the run finished before the kill; nothing was tested")
    self.assertTrue(os.path.exists(os.path.join(model_dir, "training.lock")))

    # Another run, on another host, while the lease is fresh: refused, nothing written.
    other = subprocess.run(
        as_pod("other-host", launching.command(
            "launch.train", *args, "--strategy=one_device")),
        cwd=launching.ROOT, env=launching.ENV, capture_output=True, text=True, timeout=300)
    self.assertEqual(other.returncode, 2, other.stderr[-2000:])
    self.assertRegex(other.stderr, r"^error: --model_dir=\S+ is in use by another run \(run "
                                   r"TF_CONFIG cluster \w+, host \S+, pid \d+, renewed \d+ s "
                                   r"ago\); if it is gone, its lease runs out in \d+ s")
    self.assertEqual(other.stderr.count("\n"), 1, other.stderr)
    self.assertEqual(checkpoint_step(model_dir), killed_at)

    # The same run, both workers restarted as pods of other nodes.
    processes, logs = start_workers(
        self, args, configs, wrap=lambda index, command: as_pod(f"pod-{index}", command))
    statuses = wait_all(processes, 300)
    chief = read(logs[0])
    self.assertEqual(statuses, [0, 0], chief[-3000:] + read(logs[1])[-2000:])
    self.assertIn("warning: taking over the lock of an earlier start of the same run "
                  "(run TF_CONFIG cluster", chief)
    self.assertIn(f"resuming from step {killed_at}", chief)
    self.assertIn("done: 16 steps", chief)

    straight_dir = self.create_tempdir().full_path
    processes, logs = start_workers(
        self, [*EXACT, f"--model_dir={straight_dir}", f"--data_dir={data_dir}"],
        tf_configs(multi_worker.free_ports(2)))
    self.assertEqual(wait_all(processes, 300), [0, 0], read(logs[0])[-3000:])
    resumed, uninterrupted = model_of(model_dir), model_of(straight_dir)
    self.assertEqual(sorted(resumed), sorted(uninterrupted))
    self.assertGreater(len(resumed), 30)  # every weight and BN statistic of resnet8
    for key, value in uninterrupted.items():
      np.testing.assert_array_equal(resumed[key], value, err_msg=key)


class StuckWorkerTest(absltest.TestCase):

  def test_a_worker_stuck_on_its_input_ends_every_worker_within_the_bound(self):
    root = self.create_tempdir().full_path
    data_dir, stuck_copy = os.path.join(root, "images"), os.path.join(root, "stuck")
    fixtures.make_image_folder(data_dir)
    shutil.copytree(data_dir, stuck_copy)
    model_dir = os.path.join(root, "run")
    bound = 20
    args = ["--model=resnet8", f"--dataset=folder:{data_dir}", "--image_size=32",
            "--global_batch_size=8", "--train_steps=100000", "--steps_per_loop=2",
            "--checkpoint_every_steps=4", "--skip_eval", f"--model_dir={model_dir}",
            f"--progress_timeout_seconds={bound}"]
    configs = tf_configs(multi_worker.free_ports(2))
    # Worker 1 alone sees the copy at data_dir: its images are the ones that stall.
    wrap = lambda index, command: (as_pod("pod-1", command, bind=(stuck_copy, data_dir))
                                   if index else command)
    processes, logs = start_workers(self, args, configs, wrap)
    deadline = time.time() + 300
    while checkpoint_step(model_dir) < 4 and time.time() < deadline and all(
        p.poll() is None for p in processes):
      time.sleep(0.05)
    self.assertGreaterEqual(checkpoint_step(model_dir), 4, read(logs[0])[-3000:])
    fixtures.images_to_fifos(stuck_copy)
    stalled_from = time.time()
    statuses = wait_all(processes, 300)
    lasted = time.time() - stalled_from
    outputs = [read(log) for log in logs]
    print(f"every worker ended {lasted:.0f} s after the images stalled (bound {bound} s)")
    self.assertEqual(statuses, [watchdog.STALLED] * 2, outputs[0][-2000:] + outputs[1][-2000:])
    for output in outputs:
      lines = [l for l in output.splitlines() if l.startswith("error:")]
      self.assertLen(lines, 1, output[-3000:])
      self.assertRegex(lines[0], rf"^error: no progress for {bound} s \(in training steps "
                                 rf"\d+ to \d+; .*\); ending this task \(status 70\): start "
                                 rf"every task again to resume from the last checkpoint$")
      self.assertNotIn("Traceback", output)
    # Some prefetched batches feed a few steps after the swap; then nothing moves.
    self.assertLess(lasted, bound + 60)
    self.assertFalse(os.path.exists(os.path.join(model_dir, "training.lock")))

    # Restarted, with its images readable again, the run resumes.
    shutil.rmtree(stuck_copy)
    shutil.copytree(data_dir, stuck_copy)
    stalled_at = checkpoint_step(model_dir)
    resumed_args = [a if not a.startswith("--train_steps") else f"--train_steps={stalled_at + 4}"
                    for a in args]
    processes, logs = start_workers(self, resumed_args, configs, wrap)
    statuses = wait_all(processes, 300)
    self.assertEqual(statuses, [0, 0], read(logs[0])[-3000:] + read(logs[1])[-2000:])
    self.assertIn(f"resuming from step {stalled_at}", read(logs[0]))


if __name__ == "__main__":
  absltest.main()
