"""Cases measured in processes of their own, and cases taking turns across
processes.

A process times a list of cases that share one strategy: logical devices
are fixed once per process, and peak memory is the whole process's. Ours
and the keras peer run in `python -m launch.benchmark --cases=JSON`
(in_process.run_cases); an outside peer (launch.peers) runs alone, in its
own environment, by its step script. Either prints its rows as one JSON
line, its last.

Compared cases that can share a process (ours and the keras peer,
steps_per_loop 1 and 50, synthetic and JPEG input) take turns inside it, so
a slow spell of a shared machine falls on each alike; those that cannot
(one_device and mirrored, any outside peer) take turns a process each
(taking_turns).
"""

import json
import os
import subprocess
import sys

from launch import peers as peers_lib
from launch.benchmarks import cases as cases_lib

# Where the processes run: `-m launch.benchmark` is found from here.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def command(cases, budget):
  """argv of the process that times `cases` within `budget` (a cases.Budget)."""
  if cases[0]["kind"] in peers_lib.PEERS:
    return peers_lib.command(cases[0]["kind"], cases[0], budget.seconds, budget.min_steps)
  return [sys.executable, "-m", "launch.benchmark", f"--cases={json.dumps(cases)}",
          f"--seconds={budget.seconds}", f"--min_steps={budget.min_steps}",
          f"--rounds={budget.rounds}"]


def in_subprocess(cases, budget):
  """The rows of cases (one strategy) timed in a fresh process; a line each
  on stderr as they come."""
  result = subprocess.run(command(cases, budget), cwd=ROOT, capture_output=True, text=True,
                          check=False)
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
  """An outside peer's row with the model's cost: the peers train ResNet-50
  v1.5, as ours."""
  from resnet_dist import perf  # pylint: disable=g-import-not-at-top
  macs = cases_lib.resnet50_macs(row["image_size"])
  flops = row["images_per_second"] * perf.training_flops_per_image(macs)
  return {**row, "gmacs_per_image": round(macs / 1e9, 4),
          "model_gflops": round(flops / 1e9, 1)}


def taking_turns(cases, budget):
  """Cases that cannot share a process: one process per case per round, in
  turns; each case keeps its middle run (the median for an odd number of
  rounds, the upper middle for an even one) and every round's images/s. A
  case with a profile_dir is traced in the last round only."""
  runs = [[] for _ in cases]
  for round_ in range(budget.rounds):
    for case, case_runs in zip(cases, runs):
      if round_ < budget.rounds - 1:
        case = {k: v for k, v in case.items() if k != "profile_dir"}
      case_runs.append(in_subprocess([case], budget.one_round())[0])
  merged = []
  for case, case_runs in zip(cases, runs):
    middle = sorted(case_runs, key=lambda row: row["step_ms"])[len(case_runs) // 2]
    merged.append({**middle, **case, "step_ms_range": [min(r["step_ms"] for r in case_runs),
                                                       max(r["step_ms"] for r in case_runs)],
                   "images_per_second_rounds": [r["images_per_second"] for r in case_runs],
                   "peak_rss_mb": max(r.get("peak_rss_mb", 0) for r in case_runs)})
  return merged
