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

This module is the command line: its flags, and main, which reads them and
runs the mode. Each mode is a module of launch/benchmarks/, which take their
settings as arguments (launch/benchmarks/__init__.py says which does what).
"""

import dataclasses
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from launch import exits  # pylint: disable=g-import-not-at-top  # first: its exit handler
from launch import peers as peers_lib
from absl import app
from absl import flags

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels (oneDNN)
# The modes' modules load TensorFlow only where they run: a flag's error is one line.
from launch.benchmarks import e2e, targets, train
from launch.benchmarks import cases as cases_lib
from launch.benchmarks import input as input_mode

flags.DEFINE_enum("mode", "input", ["input", "train", "e2e", "targets"],
                  "What to measure; targets: the project's speed targets (docs/benchmarks.md).")
flags.DEFINE_integer("num_images", 512, "input, e2e: distinct JPEGs to generate.")
flags.DEFINE_integer("image_size", 224, "input: output image size; train: the ImageNet "
                     "models' (and the peers') input size.")
flags.DEFINE_integer("batch_size", 128, "input: batch size.")
flags.DEFINE_integer("warmup_batches", 5, "input: batches before timing.")
flags.DEFINE_list("cores", [], "input: measure on the first N of this process's CPUs, for each N "
                  "listed (a process each); by default on all of them, in this process.")
flags.register_validator(
    "cores", lambda counts: all(c.isdigit() and 1 <= int(c) <= input_mode.available_cores()
                                for c in counts),
    f"must list numbers of CPUs from 1 to the {input_mode.available_cores()} this process may "
    "run on")
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


def markdown(results):
  """The rows as a markdown table, a column per key any row has."""
  keys = list(dict.fromkeys(k for row in results for k in row))
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in results]
  return "\n".join(lines)


@exits.prompt
def main(argv):
  """Reads the flags (only main does) and runs the mode they name."""
  del argv
  budget = cases_lib.Budget(seconds=FLAGS.seconds, rounds=FLAGS.rounds,
                            min_steps=FLAGS.min_steps)
  if FLAGS.cases:  # the process timing a training mode's cases (turns.py): one JSON line out
    from launch.benchmarks import in_process  # pylint: disable=g-import-not-at-top
    print(json.dumps(in_process.run_cases(json.loads(FLAGS.cases), budget)))
    return
  if FLAGS.mode == "input":
    settings = input_mode.Settings(**{field.name: FLAGS[field.name].value
                                      for field in dataclasses.fields(input_mode.Settings)})
    header, results = input_mode.run(settings, FLAGS.cores)
  elif FLAGS.mode == "train":
    cases = train.grid(models=FLAGS.models, batch_sizes=FLAGS.batch_sizes, dtypes=FLAGS.dtypes,
                       strategies=FLAGS.strategies, steps_per_loop=FLAGS.steps_per_loop,
                       xla=[x == "true" for x in FLAGS.xla], image_size=FLAGS.image_size)
    header, results = train.run(cases, FLAGS.peers, FLAGS.profile_dir, budget)
  elif FLAGS.mode == "e2e":
    header, results = e2e.run(FLAGS.num_images, budget)
  else:
    header, results = targets.run(FLAGS.image_size, FLAGS.num_images, budget)
  print(header)
  print(markdown(results))
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump({"mode": FLAGS.mode, "setting": header, "results": results}, f, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=exits.parse_flags)
