"""Relays this host's GCE preemption or maintenance notice to the run:
`python -m launch.notices --model_dir=gs://B/runs/X --gce_metadata=URL`.

On a TPU pod slice only worker 0 runs the training, but the preemption of
any host ends the slice's runtime. tpu_vm.sh starts this on every host: it
polls its host's metadata server every --notice_poll_seconds and, at the
first notice, leaves it in model_dir/notices (one file named after the
host), where the training's own watch (--gce_metadata) finds it within a
poll and stops the run after a step, saved. Then it exits 0.
"""

import time

from launch import exits  # first: its exit handler runs last
from absl import app
from absl import flags

with exits.quiet_start():
  from flags import definitions
  from resnet_dist import preemption
  from resnet_dist.errors import ConfigError

flags.adopt_module_key_flags(definitions)
flags.DEFINE_float("notice_poll_seconds", 5.0, "Between two looks at the metadata server.",
                   lower_bound=0.1)
FLAGS = flags.FLAGS


@exits.prompt
def main(argv):
  del argv
  try:
    if not FLAGS.model_dir or not FLAGS.gce_metadata:
      raise ConfigError("--model_dir and --gce_metadata are required: where the run finds "
                        "notices, and the server to watch")
    notices = preemption.Notices(FLAGS.gce_metadata, f"{FLAGS.model_dir}/notices")
    while True:
      reason = notices.host_notice()
      if reason:
        notices.leave(reason)
        print(f"{reason}: left in {notices.notices_dir}", flush=True)
        return exits.OK
      time.sleep(FLAGS.notice_poll_seconds)
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    return exits.fail(e)


if __name__ == "__main__":
  app.run(main, flags_parser=exits.parse_flags)
