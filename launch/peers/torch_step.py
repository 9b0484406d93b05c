"""The PyTorch peer: torchvision's ResNet-50 trained by a plain eager step (or
torch.compile's), channels_last, SGD with momentum, bf16 under torch.autocast.

Run by launch.benchmark in the peer's own virtual environment:
  python torch_step.py CASE_JSON SECONDS MIN_STEPS
"""

import json
import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # pylint: disable=g-import-not-at-top


def build(case):
  """run_loop(n) for a case: kind torch or torch_compile, dtype fp32 or bf16."""
  torch.manual_seed(0)
  model = torchvision.models.resnet50(num_classes=1000).to(memory_format=torch.channels_last)
  model.train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  size = case["image_size"]
  images = torch.rand(case["batch"], 3, size, size).to(memory_format=torch.channels_last)
  labels = torch.randint(0, 1000, (case["batch"],))
  forward = torch.compile(model) if case["kind"] == "torch_compile" else model
  bf16 = case["dtype"] == "bf16"

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      logits = forward(images)
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    loss.backward()
    optimizer.step()

  def run_loop(n):
    for _ in range(n):
      step()

  return run_loop


def trace(run_loop, directory):
  """2 steps under torch.profiler; writes ops.json, {op: self CPU time in us}
  summed over the steps, which launch.benchmark reads."""
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
    run_loop(2)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "ops.json"), "w") as f:
    json.dump({event.key: event.self_cpu_time_total for event in profile.key_averages()}, f)


if __name__ == "__main__":
  timing.peer_main(build, trace)
