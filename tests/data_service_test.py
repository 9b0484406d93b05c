"""Training input through a tf.data service: `launch.data_service --role=local`
with worker processes on 127.0.0.1, real runs through it, what the service
guarantees about the examples, and its faults."""

import json
import os
import signal
import socket
import time

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
import numpy as np
import tensorflow as tf
from absl.testing import absltest

from resnet_dist import data
from resnet_dist.config import Config
from resnet_dist.errors import ConfigError
from resnet_dist.data import indexed_reader, records
from tests import launching
from tests.fixtures import numbered_source

CHUNK = indexed_reader.service_chunk(512)  # the tests' datasets have 512 examples


def start_service(num_workers):
  """(process, address, dispatcher pid, worker pids) of a local service."""
  process = launching.start("launch.data_service", "--role=local",
                            f"--num_workers={num_workers}")
  address = None
  for line in process.stdout:
    if "--data_service=" in line:
      address = line.strip().rsplit("=", 1)[1]
    if line.startswith("pids:"):
      dispatcher = int(line.split("dispatcher ")[1].split(",")[0])
      workers = [int(p) for p in line.split("workers ")[1].split(";")[0].split()]
      return process, address, dispatcher, workers
  raise RuntimeError(f"the service did not start: {process.stderr.read()[-3000:]}")


def stop_service(process):
  if process.poll() is None:
    process.send_signal(signal.SIGTERM)
  process.communicate(timeout=60)


def alive(pid):
  try:
    os.kill(pid, 0)
    return True
  except ProcessLookupError:
    return False


def chunks_of(n, seed, epochs):
  """{(epoch, chunk): its example ids}, as the pipeline cuts each epoch's order."""
  found = {}
  for epoch in range(epochs):
    order = indexed_reader.epoch_order(n, seed, tf.constant(epoch, tf.int64)).numpy()
    for chunk in range(-(-n // CHUNK)):
      found[(epoch, chunk)] = set(order[chunk * CHUNK:(chunk + 1) * CHUNK].tolist())
  return found


class ServiceTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.service, cls.address, _, _ = start_service(2)
    cls.data_dir = launching.digits_dir()  # prepared once, before any process starts

  @classmethod
  def tearDownClass(cls):
    stop_service(cls.service)
    super().tearDownClass()

  def stream(self, source, batch, start_step=0, pipelines=(1, 0), replicas=1, job=""):
    config = data.InputSpec(batch, 32, seed=3, shuffle_buffer=8, data_service=self.address,
                              job_name=job or f"{self.id()}-{time.time_ns()}")
    context = tf.distribute.InputContext(*pipelines, replicas)
    return data.train_dataset_fn(source, "train", config, start_step)(context)

  def test_local_role_ends_every_process_on_sigterm(self):
    _, _, dispatcher, workers = service = start_service(1)
    stop_service(service[0])
    self.assertEqual(service[0].returncode, 0)
    self.assertEqual([pid for pid in [dispatcher, *workers] if alive(pid)], [])

  def test_each_example_arrives_once_per_epoch(self):
    # 4 chunks an epoch, 8 batches a chunk: a batch belongs to one chunk of
    # one epoch, whichever worker made it. Workers go at their own pace: a
    # chunk one of them holds can arrive epochs after the other's later
    # chunks, so the stream is read until the first two epochs are whole
    # (or 12 epochs have gone by, which fails).
    n = 4 * CHUNK
    chunks = chunks_of(n, 3, 13)
    batches = {}
    def whole(epoch):
      return sorted(i for c in range(4) for i in batches.get((epoch, c), [])) == list(range(n))
    for _, labels, _ in self.stream(numbered_source(n), 16).take(12 * n // 16):
      ids = set(labels.numpy().tolist())
      owner = [key for key, members in chunks.items() if ids <= members]
      self.assertLen(owner, 1, f"a batch of no single chunk: {sorted(ids)}")
      batches.setdefault(owner[0], []).extend(labels.numpy().tolist())
      self.assertCountEqual(batches[owner[0]], set(batches[owner[0]]), owner[0])  # never twice
      if whole(0) and whole(1):
        break
    for epoch in (0, 1):
      self.assertCountEqual([i for c in range(4) for i in batches.get((epoch, c), [])],
                            range(n), f"epoch {epoch}")

  def test_a_resumed_stream_starts_at_the_chunk_of_its_step_and_pipelines_share_none(self):
    n = 4 * CHUNK
    chunks = chunks_of(n, 3, 3)
    seen = {0: set(), 1: set()}
    for pipeline_id in (0, 1):
      # Step 10 of global batches of 32 is position 320: chunk 2 of epoch 0.
      for _, labels, _ in self.stream(numbered_source(n), 32, start_step=10,
                                      pipelines=(2, pipeline_id), replicas=2).take(24):
        ids = set(labels.numpy().tolist())
        seen[pipeline_id] |= {key for key, members in chunks.items() if ids <= members}
    slots = {(slot // 4, slot % 4): slot for slot in range(12)}
    for pipeline_id in (0, 1):
      # Pipeline p reads slots p, p + 2, ..., from the one holding position 320.
      self.assertIn((0, 2 + pipeline_id), seen[pipeline_id])
      self.assertTrue(all(slots[key] >= 2 and slots[key] % 2 == pipeline_id
                          for key in seen[pipeline_id]), seen[pipeline_id])

  def test_records_through_the_service_keep_labels_with_their_images(self):
    directory = self.create_tempdir().full_path
    records.write_imagenet_records(
        directory, "train", [tf.io.encode_jpeg(np.full((40, 40, 3), 2 * i, np.uint8)).numpy()
                             for i in range(96)], list(range(96)), 6)
    source = data.get_source("imagenet", directory, num_classes=96)
    labels = []
    for images, batch_labels, _ in self.stream(source, 8).take(10 * 96 // 8):
      pixels = np.round(images.numpy().reshape(8, -1).mean(1) / 2).astype(int)
      np.testing.assert_array_equal(pixels, batch_labels.numpy())
      labels += batch_labels.numpy().tolist()
    # Each worker reads up to 16 files (of 6 an epoch) at once, ahead of the
    # stream, and shuffles what it reads: 3 epochs' worth of records once
    # missed 3 of the 96. 10 epochs' worth holds whole epochs read through.
    self.assertEqual(set(labels), set(range(96)))

  def test_a_digits_run_trains_through_it_evaluates_every_example_and_resumes(self):
    model_dir = self.create_tempdir().full_path
    args = ["--flagfile=launch/configs/digits.cfg", "--model=resnet8",
            f"--data_dir={self.data_dir}",
            f"--model_dir={model_dir}", f"--data_service={self.address}",
            "--steps_per_loop=4"]
    result = launching.run_train(*args, "--train_steps=8")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn(f"input      tf.data service at {self.address}, 2 workers", result.stdout)
    self.assertIn("over 359 examples", result.stdout)
    with open(os.path.join(model_dir, "summary.json")) as f:
      summary = json.load(f)
    self.assertEqual(summary["eval_examples"], 359)
    self.assertEqual(summary["data_service"]["workers_at_end"], 2)
    self.assertIsNone(summary["skipped_train_records"])  # not counted by the service
    result = launching.run_train(*args, "--train_steps=12", "--skip_eval")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn("resuming from step 8", result.stdout)
    self.assertIn("the data service starts at the split holding that step's data position",
                  result.stdout)

  def test_an_unreachable_service_is_one_line_and_status_2(self):
    with socket.socket() as s:  # a port nothing listens on
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    model_dir = os.path.join(self.create_tempdir().full_path, "run")
    result = launching.run_train("--dataset=digits", f"--data_dir={self.data_dir}",
                                 f"--model_dir={model_dir}", f"--data_service=127.0.0.1:{port}",
                                 "--data_service_timeout_seconds=2")
    self.assertEqual(result.returncode, 2)
    self.assertEqual(result.stderr.strip().splitlines(),
                     [f"error: cannot reach a tf.data service dispatcher at --data_service="
                      f"127.0.0.1:{port} within 2 s (--data_service_timeout_seconds)"])
    self.assertFalse(os.path.exists(model_dir))


class SettingsTest(absltest.TestCase):

  def test_settings_the_service_cannot_work_with_are_refused(self):
    for changes, message in (
        ({"data_service": "localhost"}, r"--data_service=localhost must be HOST:PORT"),
        ({"data_service": "h:1", "deterministic": True}, r"--deterministic do not go together"),
        ({"data_service": "h:1", "dataset": "synthetic"}, r"nothing to do for --dataset=synth"),
        ({"data_service": "h:1", "cache_data": True}, r"--cache_data do not go together"),
        ({"data_service": "h:1", "data_service_timeout_seconds": 0}, r"timeout_seconds must")):
      with self.assertRaisesRegex(ConfigError, message):
        Config.from_flat(**changes).validate()
    Config.from_flat(data_service="dispatcher.example.com:5050").validate()


class FaultTest(absltest.TestCase):

  def test_a_lost_worker_is_a_warning_and_a_lost_dispatcher_ends_the_run(self):
    service, address, dispatcher, workers = start_service(2)
    args = self.args(address)
    try:
      out, err, code = self.run_and_kill(workers[0], *args)
      self.assertEqual(code, 0, err[-3000:])
      self.assertIn("warning: the tf.data service has 1 of its 2 workers", out)
      self.assertIn("step 44/44", out)
      # --role=local ends its workers when its dispatcher ends.
      out, err, code = self.run_and_kill(dispatcher, *args)
      self.assertEqual(code, 69, err[-3000:])
      self.assertEqual([line for line in err.splitlines() if line.startswith("error")],
                       [f"error: the tf.data service dispatcher at {address} has not answered "
                        f"for 3 s; restart it (with its --work_dir to keep the jobs) and run "
                        f"again to resume from the last checkpoint"])
    finally:
      stop_service(service)

  def test_a_service_that_loses_every_worker_ends_the_run_with_69(self):
    """The dispatcher still answers, with no worker to feed the run: a run
    that waited on it would hang; this one says so and ends."""
    service, address, _, workers = start_service(1)
    try:
      _, err, code = self.run_and_kill(workers[0], *self.args(address))
      self.assertEqual(code, 69, err[-3000:])
      self.assertIn(f"error: the tf.data service dispatcher at {address} has had no workers "
                    f"for 3 s; restart it", err)
    finally:
      stop_service(service)

  def args(self, address):
    """A digits run of 44 steps through the service at address, which gives up
    3 s after losing the service."""
    return ["--flagfile=launch/configs/digits.cfg", "--model=resnet8",
            f"--data_dir={launching.digits_dir()}", f"--data_service={address}",
            "--train_epochs=2", "--skip_eval", "--log_every_steps=4", "--steps_per_loop=2",
            "--data_service_timeout_seconds=3"]

  def run_and_kill(self, pid, *args):
    """(stdout, stderr, status) of a run in which `pid` is killed at step 8.
    Whatever its status, the run leaves no lock on its model_dir."""
    model_dir = self.create_tempdir().full_path
    process = launching.start("launch.train", f"--model_dir={model_dir}", *args)
    lines = []
    for line in process.stdout:
      lines.append(line)
      if line.startswith("step 8/"):
        os.kill(pid, signal.SIGKILL)
        break
    out, err = process.communicate(timeout=300)
    self.assertFalse(os.path.exists(os.path.join(model_dir, "training.lock")))
    return "".join(lines) + out, err, process.returncode


if __name__ == "__main__":
  absltest.main()
