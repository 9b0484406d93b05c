"""--mode=targets: the cases behind the project's speed targets
(docs/benchmarks.md), and each target's ratio, of cases measured in turns."""

import dataclasses
import functools
import os

from launch.benchmarks import cases as cases_lib
from launch.benchmarks import e2e, turns


def run(image_size, num_images, budget):
  """(header, rows): a row per target (measured, required, met), then the cases'."""
  case = functools.partial(cases_lib.case, image_size=image_size)
  ours, peer = turns.in_subprocess([case("resnet50", 32), case("resnet50", 32, kind="keras_peer")],
                                   budget)
  # Alone and one round: on CPUs without AVX-512 a bf16 step takes minutes
  # (TensorFlow falls back from oneDNN to emulated bfloat16 kernels).
  bf16, = turns.in_subprocess([case("resnet50", 32, "bf16")],
                              dataclasses.replace(budget, rounds=1))
  one_device, mirrored = turns.taking_turns([case("resnet50", 32),
                                             case("resnet50", 32, strategy="mirrored")], budget)
  spl1, spl50 = turns.in_subprocess([case("resnet20", 128, steps_per_loop=1),
                                     case("resnet20", 128, steps_per_loop=50)], budget)
  synthetic, jpeg = e2e.synthetic_and_jpeg(num_images, budget)
  checks = [
      ("ResNet-50 fp32 vs keras.applications peer (MAC-scaled)",
       ours["images_per_second"] / cases_lib.mac_scaled(peer), 1.0),
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
  return f"targets, {os.cpu_count()} cores, {budget.rounds} rounds; rows below", summary + rows
