"""--mode=e2e: ResNet-20 end to end on real 32x32 JPEG TFRecords against
synthetic input, and on the same TFRecords through a local tf.data service
of 2 workers (on this machine's cores, beside the trainer)."""

import shutil
import subprocess
import sys
import tempfile

from launch.benchmarks import cases as cases_lib
from launch.benchmarks import turns


def run(num_images, budget):
  """(header, rows): the rows of synthetic_and_jpeg, through a local service too."""
  service, address = _local_service(2)
  try:
    rows = synthetic_and_jpeg(num_images, budget, address)
  finally:
    service.terminate()
    service.wait()
  for row in rows[1:]:
    row["ratio_to_synthetic"] = round(row["images_per_second"] / rows[0]["images_per_second"], 3)
  return ("ResNet-20 end to end, 32x32 JPEG TFRecords (local, and through a local tf.data "
          "service of 2 workers) against synthetic input", rows)


def synthetic_and_jpeg(num_images, budget, service=""):
  """ResNet-20 rows on synthetic input and on 4 x num_images JPEG TFRecords
  (and through the tf.data service at `service`), timed in turns in one process."""
  directory = _jpeg_records(num_images * 4)
  cases = [cases_lib.case("resnet20", 128, steps_per_loop=10, input=i, data_dir=directory)
           for i in ("synthetic", "jpeg")]
  if service:
    cases.append(dict(cases[1], input="jpeg via tf.data service", data_service=service))
  try:
    return turns.in_subprocess(cases, budget)
  finally:
    shutil.rmtree(directory)


def _jpeg_records(num_images, size=32):
  """CIFAR-sized JPEG TFRecords in the standard layout, in a temp dir."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from resnet_dist.data import records  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  images = [tf.io.encode_jpeg(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).numpy()
            for _ in range(num_images)]
  directory = tempfile.mkdtemp(prefix="resnet_dist_e2e_")
  records.write_imagenet_records(directory, "train", images,
                                 [i % 10 for i in range(num_images)], num_files=4)
  return directory


def _local_service(num_workers):
  """(process, address) of `launch.data_service --role=local`."""
  process = subprocess.Popen(
      [sys.executable, "-m", "launch.data_service", "--role=local",
       f"--num_workers={num_workers}"],
      cwd=turns.ROOT, stdout=subprocess.PIPE, text=True)
  for line in process.stdout:
    if "--data_service=" in line:
      return process, line.strip().rsplit("=", 1)[1]
  raise RuntimeError(f"the local tf.data service did not start (status {process.wait()})")
