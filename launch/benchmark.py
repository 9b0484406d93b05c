"""Throughput benchmarks; ratios are measured within one run on one machine.

  python -m launch.benchmark --mode=input [--cores=1,2]
      ImageNet training preprocessing alone (JPEG decode-and-crop, resize,
      flip; then with RandAugment, TrivialAugment-wide) on JPEGs of 500x375
      pixels, the framework's pipeline in turns with a bare tf.data pipeline
      of the same operations (autotuned, out of order): images/s, the
      process's CPU time per image and the cores that would feed an 8-GPU
      host; with --cores, once on each number of cores, a process each.
  python -m launch.benchmark --mode=train [--models=... --batch_sizes=...]
      training steps on synthetic on-device data, one subprocess per case
      (logical devices and peak memory are per process), with the model's
      FLOP/s against the machine's measured matmul peak, and ResNet-50 cases
      against peers (--peers): keras.applications in this process's
      environment; Model Garden and PyTorch (eager or compiled) each in its
      own virtual environment, made in .peers/ on first use, every case a
      process per round, in turns with our plain step and our train loop.
  python -m launch.benchmark --mode=e2e
      ResNet-20 end to end on real 32x32 JPEG TFRecords against synthetic input,
      and on the same TFRecords through a local tf.data service of 2 workers
      (on this machine's cores, beside the trainer).
  python -m launch.benchmark --mode=targets
      the cases behind the issue's targets, and the ratios.

Compared cases are timed in --rounds turns and report the median: on a
shared machine a slow minute then falls on every compared case alike.

Prints a markdown table and writes the results as JSON (--output).
"""

import dataclasses
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from launch import exits  # pylint: disable=g-import-not-at-top  # first: its exit handler
from launch import peers as peers_lib
from launch.peers import timing
from absl import app
from absl import flags

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels (oneDNN)

flags.DEFINE_enum("mode", "input", ["input", "train", "e2e", "targets"],
                  "What to measure; targets: the project's speed targets (docs/benchmarks.md).")
flags.DEFINE_integer("num_images", 512, "input, e2e: distinct JPEGs to generate.")
flags.DEFINE_integer("image_size", 224, "input: output image size; train: the ImageNet "
                     "models' (and the peers') input size.")
flags.DEFINE_integer("batch_size", 128, "input: batch size.")
flags.DEFINE_integer("warmup_batches", 5, "input: batches before timing.")
def _cores():
  """The CPUs this process may run on (taskset, --cores)."""
  return len(os.sched_getaffinity(0))


flags.DEFINE_list("cores", [], "input: measure on the first N of this process's CPUs, for each N "
                  "listed (a process each); by default on all of them, in this process.")
flags.register_validator(
    "cores", lambda counts: all(c.isdigit() and 1 <= int(c) <= _cores() for c in counts),
    f"must list numbers of CPUs from 1 to the {_cores()} this process may run on")
flags.DEFINE_float("host_images_per_second", 19200.0, "input: the rate a host's accelerators "
                   "train at, for the cores column (8 A100s at 2,400 ResNet-50 images/s each).")
flags.DEFINE_float("seconds", 10.0, "Time spent measuring each case, at least, over all "
                   "its rounds.")
flags.DEFINE_list("models", ["resnet50"], "train: models.")
flags.DEFINE_list("batch_sizes", ["32"], "train: global batch sizes.")
flags.DEFINE_list("dtypes", ["fp32"], "train: fp32, bf16, fp16.")
flags.DEFINE_list("strategies", ["one_device"], "train: one_device, mirrored (2 logical CPU "
                  "devices without GPUs).")
flags.DEFINE_list("steps_per_loop", ["1"], "train: steps per tf.function call.")
flags.DEFINE_list("xla", ["false"], "train: compile the replica step with XLA (true/false).")
flags.DEFINE_list("peers", ["keras"], "train: what ResNet-50 cases (one device, no XLA) are "
                  "compared with, in turns: keras (keras.applications' ResNet50, in this "
                  "process's environment), and, each in a virtual environment of its own made "
                  "in .peers/ on first use, modelgarden (tf-models-official's ResNet-50), torch "
                  "(torchvision's, eager, channels_last) and torch_compile. With any of the "
                  "last three our plain step is timed too, and every case runs in a process "
                  "of its own each round. Empty: no peer.")
flags.register_validator(
    "peers", lambda names: set(names) <= {"keras", *peers_lib.PEERS},
    f"must name peers among keras, {', '.join(peers_lib.PEERS)}")
flags.DEFINE_integer("min_steps", 1, "train: timed steps per case in each round, at least.")
flags.DEFINE_string("profile_dir", "", "train: after timing, trace 2 steps of every case (a "
                    "subfolder each: tf.profiler, or torch.profiler for the PyTorch peers) and "
                    "list each case's ops by their self time per step.")
flags.DEFINE_integer("rounds", 3, "Timed turns per case; a case's figure is its median over "
                     "the rounds.")
flags.DEFINE_string("cases", "", "Internal: run these cases (a JSON list) in this process.")
flags.DEFINE_string("output", "", "Write the results here as JSON.")
FLAGS = flags.FLAGS


def natural_jpegs(num_images, height=375, width=500, seed=0):
  """JPEGs at quality 90 of about 72 KB (ImageNet's median size and bytes are
  about 500x375 and 110 KB): smooth colour fields with sensor-like noise."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(seed)
  images = []
  for _ in range(num_images):
    base = tf.image.resize(rng.randint(0, 256, (48, 64, 3)).astype(np.float32), [height, width])
    noisy = tf.clip_by_value(base + rng.normal(0, 6, (height, width, 3)), 0, 255)
    images.append(tf.io.encode_jpeg(tf.cast(noisy, tf.uint8), quality=90).numpy())
  return images


def _drain(iterator, most=64):
  """Reads what a pipeline buffered (autotuning sizes its buffers) until a
  batch takes a millisecond to come, one still being made."""
  for _ in range(most):
    began = time.perf_counter()
    next(iterator)
    if time.perf_counter() - began > 1e-3:
      return


def _input_turns(datasets, batch_size, warmup, seconds, rounds):
  """{name: (images/s of each round, CPU ms per image of each round)}.

  The pipelines take turns in this process, each turn on an iterator of its
  own, deleted at its end: no pipeline's threads (its autotuner, its
  prefetching) run in another's turn. A turn warms up (autotuning ramps the
  parallelism up), drains what was buffered meanwhile (_drain), then times.
  CPU time is the whole process's in the timed part.
  """
  measured = {name: ([], []) for name in datasets}
  for _ in range(rounds):
    for name, ds in datasets.items():
      iterator = iter(ds)
      for _ in range(warmup):
        next(iterator)
      _drain(iterator)
      count, cpu, began = 0, time.process_time(), time.perf_counter()
      while time.perf_counter() - began < seconds / rounds:
        next(iterator)
        count += 1
      images = count * batch_size
      measured[name][0].append(images / (time.perf_counter() - began))
      measured[name][1].append(1000 * (time.process_time() - cpu) / images)
      del iterator
  return measured


def _bare_pipeline(files, size, batch_size, shuffle_buffer):
  """The same operations with nothing else, as a user would tune them by
  hand (files read in parallel, a shuffle buffer, autotuned parallelism and
  prefetch, out of order): the yardstick for our own pipeline."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def load(record):
    encoded = tf.io.parse_single_example(
        record, {"image/encoded": tf.io.FixedLenFeature([], tf.string)})["image/encoded"]
    begin, crop, _ = tf.image.sample_distorted_bounding_box(
        tf.io.extract_jpeg_shape(encoded), tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10)
    image = tf.io.decode_and_crop_jpeg(
        encoded, tf.stack([begin[0], begin[1], crop[0], crop[1]]), channels=3)
    image = tf.image.random_flip_left_right(image)
    return tf.cast(tf.image.resize(image, [size, size]), tf.uint8)

  ds = tf.data.Dataset.from_tensor_slices(files).repeat().interleave(
      tf.data.TFRecordDataset, cycle_length=len(files), num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=False)
  ds = ds.shuffle(shuffle_buffer)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


# torchvision's two policies, and timm's RandAugment as the RSB A1/A2 recipes run it.
_AUGMENTED = ("randaugment", "trivialaugment_wide", "rand-m7-mstd0.5-inc1")
_SHUFFLE_BUFFER = 1000


def _input_pipelines(directory, files):
  """{name: dataset}: ours plain and augmented, and the bare pipeline."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from resnet_dist import data  # pylint: disable=g-import-not-at-top
  from resnet_dist.config import AugmentConfig  # pylint: disable=g-import-not-at-top
  source = data.get_source("imagenet", directory)
  spec = data.InputSpec(FLAGS.batch_size, FLAGS.image_size, shuffle_buffer=_SHUFFLE_BUFFER)
  augments = {"resnet_dist": None, **{f"resnet_dist {policy}": AugmentConfig(policy=policy)
                                      for policy in _AUGMENTED}}
  pipelines = {name: data.train_dataset_fn(source, "train", dataclasses.replace(
      spec, augment=augment))(tf.distribute.InputContext()) for name, augment in augments.items()}
  pipelines["bare tf.data"] = _bare_pipeline(files, FLAGS.image_size, FLAGS.batch_size,
                                             _SHUFFLE_BUFFER)
  return pipelines


def _input_rows(measured, cores):
  """The table's rows: medians, ours against the bare pipeline, and the cores
  that would keep up with --host_images_per_second."""
  rows = {name: {"pipeline": name, "cores": cores,
                 "images_per_second": round(statistics.median(rates), 1),
                 "images_per_second_range": [round(min(rates)), round(max(rates))],
                 "cpu_ms_per_image": round(statistics.median(cpu), 3),
                 "host_cores": round(FLAGS.host_images_per_second
                                     * statistics.median(cpu) / 1000, 1)}
          for name, (rates, cpu) in measured.items()}
  ours, bare = rows["resnet_dist"], rows["bare tf.data"]
  ours["ratio_to_bare"] = round(ours["images_per_second"] / bare["images_per_second"], 3)
  ours["cpu_ratio_to_bare"] = round(ours["cpu_ms_per_image"] / bare["cpu_ms_per_image"], 3)
  # Random erasing, mixup and CutMix run in the replica step: no host cost.
  for policy in _AUGMENTED:
    row = rows[f"resnet_dist {policy}"]
    row["extra_cpu_ms_per_image"] = round(row["cpu_ms_per_image"] - ours["cpu_ms_per_image"], 3)
  return list(rows.values())


def _input_on_cores(counts):
  """input_benchmark in a process per number of cores, on the first N CPUs."""
  available = sorted(os.sched_getaffinity(0))
  rows = []
  for count in map(int, counts):  # each within available: the flag's validator
    with tempfile.NamedTemporaryFile(suffix=".json") as output:
      argv = [sys.executable, "-m", "launch.benchmark"] + [
          f"--{name}={FLAGS[name].value}" for name in
          ("num_images", "image_size", "batch_size", "warmup_batches", "seconds", "rounds",
           "host_images_per_second")]
      subprocess.run(argv + ["--mode=input", f"--output={output.name}"], check=True,
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     preexec_fn=lambda cpus=available[:count]: os.sched_setaffinity(0, cpus))
      with open(output.name) as f:
        rows += json.load(f)["results"]
  return rows


def input_benchmark():
  header = (f"ImageNet training preprocessing, {FLAGS.num_images} JPEGs of 500x375 -> "
            f"{FLAGS.image_size}x{FLAGS.image_size}, batch {FLAGS.batch_size}, "
            f"{FLAGS.rounds} turns of {FLAGS.seconds / FLAGS.rounds:.1f} s each, medians; "
            f"host_cores: cores for {FLAGS.host_images_per_second:.0f} images/s")
  if FLAGS.cores:
    return header, _input_on_cores(FLAGS.cores)
  from resnet_dist.data import records  # pylint: disable=g-import-not-at-top
  directory = tempfile.mkdtemp(prefix="resnet_dist_bench_")
  images = natural_jpegs(FLAGS.num_images)
  files = records.write_imagenet_records(directory, "train", images,
                                         [i % 1000 for i in range(len(images))], num_files=8)
  measured = _input_turns(_input_pipelines(directory, files), FLAGS.batch_size,
                          FLAGS.warmup_batches, FLAGS.seconds, FLAGS.rounds)
  shutil.rmtree(directory, ignore_errors=True)
  mean_kb = sum(map(len, images)) / len(images) / 1024
  return f"{header}; {mean_kb:.0f} KB a JPEG, {_cores()} cores", _input_rows(measured, _cores())


# --- Training throughput ------------------------------------------------------
#
# A subprocess runs a list of cases that share one strategy. After each case's
# warm-up loop (tracing) the cases take turns, --rounds times, each timing
# whole loops for --seconds / --rounds; a case's step time is its median over
# the rounds. Compared cases that can share a process (ours and the peer,
# steps_per_loop 1 and 50, synthetic and JPEG input) share one,
# so a slow spell of a shared machine falls on both; one_device and
# mirrored need different logical devices, so their processes take turns.

PEER_MACS = 3.858e9   # keras.applications.ResNet50 (v1) at 224x224
OUR_RESNET50_MACS = 4.089e9  # resnet_dist's ResNet-50 (v1.5) at 224x224
CIFAR_MODELS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")


def _ours(case, strategy):
  """Our training step: Trainer's train_loop over synthetic or JPEG TFRecord input."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from resnet_dist import data, models  # pylint: disable=g-import-not-at-top
  from resnet_dist.trainer import Trainer  # pylint: disable=g-import-not-at-top
  from resnet_dist import distributed_input  # pylint: disable=g-import-not-at-top
  from resnet_dist.config import Config  # pylint: disable=g-import-not-at-top
  size = case["image_size"]
  config = Config.from_flat(model=case["model"], image_size=size, dtype=case["dtype"],
                            enable_xla=case["xla"], global_batch_size=case["batch"],
                            steps_per_loop=case["steps_per_loop"], dataset="synthetic",
                            num_classes=1000)
  if case.get("input", "").startswith("jpeg"):
    source = data.get_source("imagenet", case["data_dir"], num_classes=10, image_size=size)
  else:
    source = data.get_source("synthetic", num_classes=10 if size <= 64 else 1000,
                             image_size=size)
  trainer = Trainer(config, strategy, source, steps_per_epoch=100, total_steps=10**6)
  spec = data.InputSpec(case["batch"], size, shuffle_buffer=1000,
                        data_service=case.get("data_service", ""),
                        job_name=f"benchmark-{os.getpid()}-{time.time_ns()}")
  iterator = iter(distributed_input.distribute_input(
      strategy, data.train_dataset_fn(source, source.train_split, spec)))
  return (lambda n: trainer.train_loop(iterator, tf.constant(n)),
          models.count_macs(trainer.model, size), trainer.model.compute_dtype)


def _plain_step(case, build_model):
  """run_loop(n) training a Keras model (built by build_model(policy name)) by a
  minimal tf.function step: float images in, softmax cross-entropy, SGD with
  momentum; the step every framework is compared by."""
  import keras  # pylint: disable=g-import-not-at-top
  from launch.peers import tf_step  # pylint: disable=g-import-not-at-top
  from resnet_dist.config import DTYPES  # pylint: disable=g-import-not-at-top
  model = build_model(DTYPES[case["dtype"]])
  optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
  optimizer.build(model.trainable_variables)
  return (tf_step.plain_loop(model, optimizer, case["batch"], case["image_size"]),
          model.compute_dtype)


def _peer(case, strategy):
  """keras.applications.ResNet50 in the plain step, on TensorFlow's default
  device (the peer runs beside one_device cases only)."""
  del strategy
  import keras  # pylint: disable=g-import-not-at-top

  def build(policy):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)  # the peer's layers only
    try:
      return keras.applications.ResNet50(
          weights=None, input_shape=(case["image_size"], case["image_size"], 3))
    finally:
      keras.mixed_precision.set_global_policy(previous)

  run_loop, dtype = _plain_step(case, build)
  return run_loop, PEER_MACS * (case["image_size"] / 224)**2, dtype


def _ours_plain(case, strategy):
  """Our model in the plain step: what the peers are compared with."""
  del strategy
  from resnet_dist import models  # pylint: disable=g-import-not-at-top
  run_loop, dtype = _plain_step(case, lambda policy: models.get_model(
      case["model"], num_classes=1000, dtype=policy))
  return run_loop, models.count_macs(case["model"], case["image_size"]), dtype


# kind -> how run_cases builds a case of it in this process
_IN_PROCESS = {"resnet_dist": _ours, "resnet_dist_step": _ours_plain, "keras_peer": _peer}


def run_cases(cases):
  """The cases of one process (one strategy), alternating: their rows."""
  from launch.peers import tf_step  # pylint: disable=g-import-not-at-top
  from resnet_dist import perf  # pylint: disable=g-import-not-at-top
  from resnet_dist import strategy as strategy_lib  # pylint: disable=g-import-not-at-top
  from resnet_dist.config import DistributeConfig  # pylint: disable=g-import-not-at-top
  strategy = strategy_lib.create_strategy(
      DistributeConfig(strategy=cases[0]["strategy"], num_cpu_devices=2))
  built = [_IN_PROCESS[case["kind"]](case, strategy) for case in cases]
  for (run_loop, _, _), case in zip(built, cases):
    # Warm-up: tracing, first allocations, and a second call (as the peers'
    # two warm-up steps): the train loop's first calls after tracing run slow.
    for _ in range(2):
      run_loop(case["steps_per_loop"])
  times = [[] for _ in cases]
  for _ in range(FLAGS.rounds):
    for (run_loop, _, _), case, case_times in zip(built, cases, times):
      case_times.append(timing.timed_loops(run_loop, case["steps_per_loop"], FLAGS.min_steps,
                                     FLAGS.seconds / FLAGS.rounds))
  for (run_loop, _, _), case in zip(built, cases):
    if case.get("profile_dir"):
      tf_step.trace(run_loop, case["profile_dir"])
  peaks = {dtype: perf.measure_peak_flops(strategy, dtype, size=2048, seconds=2.0)
           for dtype in {dtype for _, _, dtype in built}}
  rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  rows = []
  for (_, macs, dtype), case, case_times in zip(built, cases, times):
    step_seconds = statistics.median(case_times)
    images_per_second = case["batch"] / step_seconds
    flops = images_per_second * perf.training_flops_per_image(macs)
    rows.append({**case, "images_per_second": round(images_per_second, 2),
                 "step_ms": round(1000 * step_seconds, 1),
                 "step_ms_range": [round(1000 * min(case_times), 1),
                                   round(1000 * max(case_times), 1)],
                 "gmacs_per_image": round(macs / 1e9, 4),
                 "model_gflops": round(flops / 1e9, 1),
                 "peak_gflops": round(peaks[dtype] / 1e9, 1),
                 "utilization": round(flops / peaks[dtype], 3),
                 "peak_rss_mb": rss, "process_cases": len(cases)})
  return rows


def _op_times(directory, steps=2, most=12):
  """[(op type, self ms per step)] of a case's trace, longest first: read from
  tf.profiler's trace (framework_op_stats), or the ops.json a PyTorch peer wrote."""
  import glob  # pylint: disable=g-import-not-at-top
  torch_ops = os.path.join(directory, "ops.json")
  if os.path.exists(torch_ops):
    with open(torch_ops) as f:
      totals = json.load(f)
  else:
    from xprof.convert import raw_to_tool_data  # pylint: disable=g-import-not-at-top
    # A rerun into the same folder adds a trace (a folder per start): the newest.
    paths = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True))
    data, _ = raw_to_tool_data.xspace_to_tool_data(paths[-1:], "framework_op_stats", {})
    totals = _self_times_by_type(json.loads(data))
  ranked = sorted(totals.items(), key=lambda item: -item[1])[:most]
  return [(name, round(us / 1000 / steps, 1)) for name, us in ranked]


def _self_times_by_type(tables):
  """{op type: self time in us} summed over a framework_op_stats table's rows;
  oneDNN's kernels (_MklNativeConv2D, ...) under the op they implement."""
  table = tables[0] if isinstance(tables, list) else tables
  columns = [column["id"] for column in table["cols"]]
  kind, self_time = columns.index("type"), columns.index("total_self_time")
  totals = {}
  for row in table["rows"]:
    values = [cell.get("v") if cell else None for cell in row["c"]]
    if values[kind] != "IDLE":
      name = re.sub(r"^_Mkl(Native)?", "", values[kind])
      totals[name] = totals.get(name, 0.0) + float(values[self_time])
  return totals


def _in_subprocess(cases, rounds=None, seconds=None):
  """Runs cases (one strategy) in a fresh process: logical devices and peak
  memory are per process. A peer's case runs alone, in its own environment."""
  seconds = seconds or FLAGS.seconds
  if cases[0]["kind"] in peers_lib.PEERS:
    argv = peers_lib.command(cases[0]["kind"], cases[0], seconds, FLAGS.min_steps)
  else:
    argv = [sys.executable, "-m", "launch.benchmark", f"--cases={json.dumps(cases)}",
            f"--seconds={seconds}", f"--min_steps={FLAGS.min_steps}",
            f"--rounds={rounds or FLAGS.rounds}"]
  result = subprocess.run(argv, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f"cases {cases} failed:\n{result.stderr[-3000:]}")
  rows = json.loads(result.stdout.strip().splitlines()[-1])
  rows = rows if isinstance(rows, list) else [_peer_row(rows)]
  for row in rows:
    print(f"  {row['kind']} {row['model']} batch {row['batch']} {row['dtype']} {row['strategy']} "
          f"steps_per_loop {row['steps_per_loop']}: {row['images_per_second']} images/s",
          file=sys.stderr, flush=True)
  return rows


def _peer_row(row):
  """A peer's row with the model's cost: the peers train ResNet-50 v1.5, as ours."""
  from resnet_dist import perf  # pylint: disable=g-import-not-at-top
  macs = OUR_RESNET50_MACS * (row["image_size"] / 224)**2
  flops = row["images_per_second"] * perf.training_flops_per_image(macs)
  return {**row, "gmacs_per_image": round(macs / 1e9, 4),
          "model_gflops": round(flops / 1e9, 1)}


def _taking_turns(cases):
  """Cases that cannot share a process (different strategies, peers in their
  own environments): one process per case per round, in turns; each case
  keeps its middle run (the median for an odd --rounds, the upper middle
  for an even one) and every round's images/s. A case with a profile_dir
  is traced in the last round only."""
  runs = [[] for _ in cases]
  for round_ in range(FLAGS.rounds):
    for case, case_runs in zip(cases, runs):
      if round_ < FLAGS.rounds - 1:
        case = {k: v for k, v in case.items() if k != "profile_dir"}
      case_runs.append(_in_subprocess([case], rounds=1, seconds=FLAGS.seconds / FLAGS.rounds)[0])
  merged = []
  for case, case_runs in zip(cases, runs):
    middle = sorted(case_runs, key=lambda row: row["step_ms"])[len(case_runs) // 2]
    merged.append({**middle, **case, "step_ms_range": [min(r["step_ms"] for r in case_runs),
                                               max(r["step_ms"] for r in case_runs)],
                   "images_per_second_rounds": [r["images_per_second"] for r in case_runs],
                   "peak_rss_mb": max(r.get("peak_rss_mb", 0) for r in case_runs)})
  return merged


def _case(model, batch, dtype="fp32", strategy="one_device", steps_per_loop=1, xla=False,
          kind="resnet_dist", **extra):
  return {"kind": kind, "model": model, "batch": int(batch), "dtype": dtype,
          "strategy": strategy, "steps_per_loop": int(steps_per_loop), "xla": xla,
          "image_size": 32 if model in CIFAR_MODELS else FLAGS.image_size, **extra}


_PEER_MODELS = {"keras": "keras ResNet50", "modelgarden": "Model Garden ResNet-50",
                "torch": "torchvision resnet50", "torch_compile": "torchvision resnet50"}


def _peer_cases(case):
  """The cases a case is compared with: our plain step, where an outside peer
  is asked for, and the peers; none but for one-device ResNet-50 without XLA."""
  if not FLAGS.peers or case["model"] != "resnet50" or case["strategy"] != "one_device" \
      or case["xla"]:
    return []
  peers = [dict(case, kind="keras_peer" if name == "keras" else name, model=_PEER_MODELS[name])
           for name in FLAGS.peers]
  outside = set(FLAGS.peers) - {"keras"}
  return ([dict(case, kind="resnet_dist_step")] if outside else []) + peers


def _with_ratios(rows):
  """Each row's images/s against the rows compared with it: ours (the train
  loop) against our plain step, our plain step against each peer."""
  by_kind = {row["kind"]: row for row in rows}
  ours = by_kind.get("resnet_dist_step", by_kind["resnet_dist"])
  for row in rows:
    if row is not ours and row["kind"] != "resnet_dist":
      row["ours_to_this"] = round(ours["images_per_second"] / row["images_per_second"], 3)
  if "resnet_dist_step" in by_kind:
    loop = by_kind["resnet_dist"]
    loop["loop_to_plain_step"] = round(loop["images_per_second"] / ours["images_per_second"], 3)
  return rows


def _profiled(cases):
  """The cases, each with a profile_dir of its own under --profile_dir."""
  if not FLAGS.profile_dir:
    return cases
  return [dict(case, profile_dir=os.path.abspath(os.path.join(FLAGS.profile_dir, "-".join(
      str(case[key]) for key in ("kind", "model", "batch", "dtype", "strategy",
                                 "steps_per_loop")).replace(" ", "_")))) for case in cases]


def train_benchmark():
  cases = [_case(m, b, d, s, n, x == "true")
           for m in FLAGS.models for b in FLAGS.batch_sizes for d in FLAGS.dtypes
           for s in FLAGS.strategies for n in FLAGS.steps_per_loop for x in FLAGS.xla]
  rows = []
  for case in cases:  # each alone in its process(es), but for the peers it is compared with
    group = _profiled([case, *_peer_cases(case)])
    if any(c["kind"] in peers_lib.PEERS for c in group):
      rows += _with_ratios(_taking_turns(group))
    else:
      rows += _with_ratios(_in_subprocess(group)) if len(group) > 1 else _in_subprocess(group)
  for row in rows:
    if row["kind"] == "keras_peer":
      row["images_per_second_mac_scaled"] = round(_mac_scaled(row), 2)
    if row.get("profile_dir"):
      row["top_ops_ms_per_step"] = _op_times(row["profile_dir"])
  return f"training steps on synthetic data, {os.cpu_count()} cores", rows


def _mac_scaled(peer_row):
  """The peer's images/s had it done our ResNet-50's multiply-adds per image."""
  return peer_row["images_per_second"] * PEER_MACS / OUR_RESNET50_MACS


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


def _synthetic_and_jpeg(service=""):
  """ResNet-20 rows on synthetic input and on JPEG TFRecords (and through the
  tf.data service at `service`), timed in turns in one process."""
  directory = _jpeg_records(FLAGS.num_images * 4)
  cases = [_case("resnet20", 128, steps_per_loop=10, input=i, data_dir=directory)
           for i in ("synthetic", "jpeg")]
  if service:
    cases.append(dict(cases[1], input="jpeg via tf.data service", data_service=service))
  try:
    return _in_subprocess(cases)
  finally:
    shutil.rmtree(directory)


def _local_service(num_workers):
  """(process, address) of `launch.data_service --role=local`."""
  process = subprocess.Popen(
      [sys.executable, "-m", "launch.data_service", "--role=local",
       f"--num_workers={num_workers}"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      stdout=subprocess.PIPE, text=True)
  for line in process.stdout:
    if "--data_service=" in line:
      return process, line.strip().rsplit("=", 1)[1]
  raise RuntimeError(f"the local tf.data service did not start (status {process.wait()})")


def e2e_benchmark():
  service, address = _local_service(2)
  try:
    rows = _synthetic_and_jpeg(address)
  finally:
    service.terminate()
    service.wait()
  for row in rows[1:]:
    row["ratio_to_synthetic"] = round(row["images_per_second"] / rows[0]["images_per_second"], 3)
  return ("ResNet-20 end to end, 32x32 JPEG TFRecords (local, and through a local tf.data "
          "service of 2 workers) against synthetic input", rows)


def targets_benchmark():
  """The cases behind the targets; each ratio compares cases measured in turns."""
  ours, peer = _in_subprocess([_case("resnet50", 32), _case("resnet50", 32, kind="keras_peer")])
  # Alone and one round: on CPUs without AVX-512 a bf16 step takes minutes
  # (TensorFlow falls back from oneDNN to emulated bfloat16 kernels).
  bf16, = _in_subprocess([_case("resnet50", 32, "bf16")], rounds=1)
  one_device, mirrored = _taking_turns([_case("resnet50", 32),
                                        _case("resnet50", 32, strategy="mirrored")])
  spl1, spl50 = _in_subprocess([_case("resnet20", 128, steps_per_loop=1),
                                _case("resnet20", 128, steps_per_loop=50)])
  synthetic, jpeg = _synthetic_and_jpeg()
  peer_scaled = _mac_scaled(peer)
  checks = [
      ("ResNet-50 fp32 vs keras.applications peer (MAC-scaled)",
       ours["images_per_second"] / peer_scaled, 1.0),
      ("ResNet-50 fp32 FLOP/s vs fp32 matmul peak", ours["utilization"], 0.7),
      ("ResNet-50 bf16 vs fp32 images/s", bf16["images_per_second"] / ours["images_per_second"], 1.3),
      ("ResNet-50 mirrored (2 logical devices) vs one_device",
       mirrored["images_per_second"] / one_device["images_per_second"], 0.9),
      ("ResNet-20 steps_per_loop 50 vs 1", spl50["images_per_second"] / spl1["images_per_second"], 1.3),
      ("ResNet-20 JPEG TFRecords vs synthetic input",
       jpeg["images_per_second"] / synthetic["images_per_second"], 0.9),
  ]
  summary = [{"target": name, "measured": round(value, 3), "required": required,
              "met": value >= required} for name, value, required in checks]
  rows = [ours, peer, bf16, one_device, mirrored, spl1, spl50, synthetic, jpeg]
  return (f"targets, {os.cpu_count()} cores, {FLAGS.rounds} rounds; rows below", summary + rows)


def markdown(results):
  keys = list(dict.fromkeys(k for row in results for k in row))
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in results]
  return "\n".join(lines)


@exits.prompt
def main(argv):
  del argv
  if FLAGS.cases:  # a subprocess of the training modes: one JSON line out
    print(json.dumps(run_cases(json.loads(FLAGS.cases))))
    return
  header, results = {"input": input_benchmark, "train": train_benchmark,
                     "e2e": e2e_benchmark, "targets": targets_benchmark}[FLAGS.mode]()
  print(header)
  print(markdown(results))
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump({"mode": FLAGS.mode, "setting": header, "results": results}, f, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=exits.parse_flags)
