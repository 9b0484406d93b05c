"""--mode=train: training steps on synthetic on-device data, each case alone
in its process(es) but for the peers it is compared with.

The peers train ResNet-50, one device, no XLA: keras.applications' in our
process, in turns with our train loop; an outside peer (launch.peers) in a
process of its own each round, in turns with our train loop and our plain
step (taking turns: turns.py).
"""

import os

from launch import peers as peers_lib
from launch.benchmarks import cases as cases_lib
from launch.benchmarks import traces, turns

_PEER_MODELS = {"keras": "keras ResNet50", "modelgarden": "Model Garden ResNet-50",
                "torch": "torchvision resnet50", "torch_compile": "torchvision resnet50"}


def grid(*, models, batch_sizes, dtypes, strategies, steps_per_loop, xla, image_size):
  """Every combination's case, the first list varying slowest."""
  return [cases_lib.case(m, b, dtype=d, strategy=s, steps_per_loop=n, xla=x,
                         image_size=image_size)
          for m in models for b in batch_sizes for d in dtypes
          for s in strategies for n in steps_per_loop for x in xla]


def run(cases, peers, profile_dir, budget):
  """(header, rows) of the cases and what they are compared with: peers
  (names among keras and launch.peers.PEERS), a trace of each under
  profile_dir ("": none)."""
  rows = []
  for case in cases:
    group = _profiled([case, *peer_cases(case, peers)], profile_dir)
    if any(c["kind"] in peers_lib.PEERS for c in group):
      rows += with_ratios(turns.taking_turns(group, budget))
    elif len(group) > 1:
      rows += with_ratios(turns.in_subprocess(group, budget))
    else:
      rows += turns.in_subprocess(group, budget)
  for row in rows:
    if row["kind"] == "keras_peer":
      row["images_per_second_mac_scaled"] = round(cases_lib.mac_scaled(row), 2)
    if row.get("profile_dir"):
      row["top_ops_ms_per_step"] = traces.op_times(row["profile_dir"])
  return f"training steps on synthetic data, {os.cpu_count()} cores", rows


def peer_cases(case, peers):
  """The cases a case is compared with: our plain step, where an outside peer
  is asked for, and the peers; none but for one-device ResNet-50 without XLA."""
  if not peers or case["model"] != "resnet50" or case["strategy"] != "one_device" \
      or case["xla"]:
    return []
  compared = [dict(case, kind="keras_peer" if name == "keras" else name,
                   model=_PEER_MODELS[name]) for name in peers]
  outside = set(peers) - {"keras"}
  return ([dict(case, kind="resnet_dist_step")] if outside else []) + compared


def with_ratios(rows):
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


def _profiled(cases, profile_dir):
  """The cases, each with a profile_dir of its own under profile_dir."""
  if not profile_dir:
    return cases
  return [dict(case, profile_dir=os.path.abspath(os.path.join(profile_dir, "-".join(
      str(case[key]) for key in ("kind", "model", "batch", "dtype", "strategy",
                                 "steps_per_loop")).replace(" ", "_")))) for case in cases]
