"""A profiled case's ops by their self time per step, from its trace: a
tf.profiler trace (ours, the keras peer, Model Garden) or the ops.json a
PyTorch peer writes (launch/peers/torch_step.py)."""

import glob
import json
import os
import re


def op_times(directory, steps=2, most=12):
  """[(op type, self ms per step)] of the case traced in directory, longest first."""
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
