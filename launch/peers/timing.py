"""How every benchmarked step is timed, ours and the peers' alike (standard
library only: the peers' own virtual environments run it too)."""

import json
import sys
import time


def timed_loops(run_loop, steps_per_loop, min_steps, seconds):
  """Seconds per step over whole loops of steps_per_loop steps, timing at
  least min_steps steps and at least `seconds`."""
  steps, began = 0, time.perf_counter()
  while steps < min_steps or time.perf_counter() - began < seconds:
    run_loop(steps_per_loop)
    steps += steps_per_loop
  return (time.perf_counter() - began) / steps


def peer_main(build, trace):
  """A peer script's main: argv is (case as JSON, seconds, min_steps); build(case)
  returns run_loop(n), which runs n training steps and waits for them. Prints
  one JSON line: the case with its step time. With a profile_dir in the
  case, trace(run_loop, directory) profiles 2 steps there after the timing."""
  case, seconds, min_steps = json.loads(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
  run_loop = build(case)
  run_loop(2)  # warm-up: tracing or compiling, first allocations
  step_seconds = timed_loops(run_loop, 1, min_steps, seconds)
  if case.get("profile_dir"):
    trace(run_loop, case["profile_dir"])
  print(json.dumps({**case, "step_ms": round(1000 * step_seconds, 1),
                    "images_per_second": round(case["batch"] / step_seconds, 2)}))
