"""--mode=input: ImageNet training preprocessing alone (JPEG decode-and-crop,
resize, flip; then with each augmentation policy) on JPEGs of 500x375
pixels, our pipeline in turns with a bare tf.data pipeline of the same
operations (pipelines.py): images/s, the process's CPU time per image and
the cores that would feed a host's accelerators; with cores, once on each
number of cores, a process each."""

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from launch.benchmarks import turns


@dataclasses.dataclass(frozen=True)
class Settings:
  """The input mode's settings, each named as its flag: a process per number
  of cores is given them as flags."""
  num_images: int                # distinct JPEGs
  image_size: int                # the pipelines' output size
  batch_size: int
  warmup_batches: int            # a turn's batches before it times
  seconds: float                 # each pipeline's time measured, over all its rounds
  rounds: int                    # turns each pipeline takes
  host_images_per_second: float  # the rate the cores column feeds


def available_cores():
  """The CPUs this process may run on (taskset, --cores)."""
  return len(os.sched_getaffinity(0))


def run(settings, cores=()):
  """(header, rows): in this process, or with cores (numbers of CPUs) in a
  process on each number of this process's first CPUs."""
  header = (f"ImageNet training preprocessing, {settings.num_images} JPEGs of 500x375 -> "
            f"{settings.image_size}x{settings.image_size}, batch {settings.batch_size}, "
            f"{settings.rounds} turns of {settings.seconds / settings.rounds:.1f} s each, "
            f"medians; host_cores: cores for {settings.host_images_per_second:.0f} images/s")
  if cores:
    return header, _on_cores(cores, settings)
  from launch.benchmarks import pipelines  # pylint: disable=g-import-not-at-top  # TensorFlow
  directory = tempfile.mkdtemp(prefix="resnet_dist_bench_")
  images = pipelines.natural_jpegs(settings.num_images)
  files = pipelines.write_records(directory, images)
  measured = _in_turns(pipelines.compared(directory, files, settings.image_size,
                                          settings.batch_size), settings)
  shutil.rmtree(directory, ignore_errors=True)
  mean_kb = sum(map(len, images)) / len(images) / 1024
  rows = _rows(measured, available_cores(), settings.host_images_per_second,
               pipelines.AUGMENTED)
  return f"{header}; {mean_kb:.0f} KB a JPEG, {available_cores()} cores", rows


def _drain(iterator, most=64):
  """Reads what a pipeline buffered (autotuning sizes its buffers) until a
  batch takes a millisecond to come, one still being made."""
  for _ in range(most):
    began = time.perf_counter()
    next(iterator)
    if time.perf_counter() - began > 1e-3:
      return


def _in_turns(datasets, settings):
  """{name: (images/s of each round, CPU ms per image of each round)}.

  The pipelines take turns in this process, each turn on an iterator of its
  own, deleted at its end: no pipeline's threads (its autotuner, its
  prefetching) run in another's turn. A turn warms up (autotuning ramps the
  parallelism up), drains what was buffered meanwhile (_drain), then times.
  CPU time is the whole process's in the timed part.
  """
  measured = {name: ([], []) for name in datasets}
  for _ in range(settings.rounds):
    for name, ds in datasets.items():
      iterator = iter(ds)
      for _ in range(settings.warmup_batches):
        next(iterator)
      _drain(iterator)
      count, cpu, began = 0, time.process_time(), time.perf_counter()
      while time.perf_counter() - began < settings.seconds / settings.rounds:
        next(iterator)
        count += 1
      images = count * settings.batch_size
      measured[name][0].append(images / (time.perf_counter() - began))
      measured[name][1].append(1000 * (time.process_time() - cpu) / images)
      del iterator
  return measured


def _rows(measured, cores, host_images_per_second, augmented):
  """The table's rows: medians, ours against the bare pipeline, and the cores
  that would keep up with host_images_per_second."""
  rows = {name: {"pipeline": name, "cores": cores,
                 "images_per_second": round(statistics.median(rates), 1),
                 "images_per_second_range": [round(min(rates)), round(max(rates))],
                 "cpu_ms_per_image": round(statistics.median(cpu), 3),
                 "host_cores": round(host_images_per_second * statistics.median(cpu) / 1000, 1)}
          for name, (rates, cpu) in measured.items()}
  ours, bare = rows["resnet_dist"], rows["bare tf.data"]
  ours["ratio_to_bare"] = round(ours["images_per_second"] / bare["images_per_second"], 3)
  ours["cpu_ratio_to_bare"] = round(ours["cpu_ms_per_image"] / bare["cpu_ms_per_image"], 3)
  # Random erasing, mixup and CutMix run in the replica step: no host cost.
  for policy in augmented:
    row = rows[f"resnet_dist {policy}"]
    row["extra_cpu_ms_per_image"] = round(row["cpu_ms_per_image"] - ours["cpu_ms_per_image"], 3)
  return list(rows.values())


def _on_cores(counts, settings):
  """The rows of this mode in a process per number of cores, each on this
  process's first N CPUs."""
  available = sorted(os.sched_getaffinity(0))
  rows = []
  for count in map(int, counts):  # each within available: --cores' validator
    with tempfile.NamedTemporaryFile(suffix=".json") as output:
      argv = [sys.executable, "-m", "launch.benchmark"] + [
          f"--{name}={value}" for name, value in dataclasses.asdict(settings).items()]
      subprocess.run(argv + ["--mode=input", f"--output={output.name}"], check=True,
                     cwd=turns.ROOT,
                     preexec_fn=lambda cpus=available[:count]: os.sched_setaffinity(0, cpus))
      with open(output.name) as f:
        rows += json.load(f)["results"]
  return rows
