#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it, copy this repository to every
# worker, install the pinned packages, start the training detached on worker 0,
# poll until it ends, then delete the TPU if the run finished (exit 0).
#
#   launch/tpu_vm.sh --name=resnet-v3-8 --project=P --zone=europe-west4-a \
#     --accelerator_type=v3-8 --data_dir=gs://B/imagenet --model_dir=gs://B/runs/r50 \
#     -- --flagfile=launch/configs/resnet50_imagenet_tpu_v3-8.cfg
#
# One host (v2-8, v3-8, v4-8, v5litepod-8, v5p-8, v6e-8 and smaller: a type
# ending in 8 or less) trains with --tpu=local. A pod slice (v4-32, v3-128,
# ...) has several hosts but one TensorFlow client: worker 0 runs the training
# with --tpu=NAME and TPU_LOAD_LIBRARY=0 while the TPU runtime serves every
# host, and the runtime defaults to the -pod image.
#
# --runtime_version  default: launch/tpu_runtime.py's for the accelerator type and
#                    the TensorFlow of requirements.txt (tpu-vm-tf-2.21.0-pjrt-v5p-and-below
#                    for v3-8); given, it is checked against the type
# --name             default $TPU_NAME
# --keep             keep the TPU after a finished run (it is always kept after a
#                    failed or stopped one, to look at or resume)
# --attach           only poll a run already started (after a dropped connection)
# --delete           only delete the TPU
# --no_create        use an existing TPU
# --spot             a Spot TPU: cheaper, and preempted at short notice (the poll
#                    then ends with 69; --delete, then the same command resumes)
# --queued           ask for the TPU through a queued resource (of the same name),
#                    which waits until capacity is free; --delete deletes both
# --poll_seconds=N   between checks of the run (default 60)
# --dry_run          print every command instead of running it
# Flags after "--" go to launch.train. Exit status: 2 on bad arguments; 69
# when the TPU is preempted, stopped or deleted, its queued resource fails, or
# worker 0 misses 5 polls in a row (the checkpoints stay: --delete it, then run
# again to resume); otherwise the training's (75: stopped by SIGTERM after
# saving; run again).
set -euo pipefail

usage() {
  sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'
}

die() {
  echo "error: $*" >&2
  exit 2
}

repo="$(cd "$(dirname "$0")/.." && pwd)"
name="${TPU_NAME:-}" project="" zone="" accelerator_type="" runtime_version="" data_dir=""
model_dir="" dry_run=0 keep=0 create=1 attach=0 delete_only=0 poll_seconds=60 max_ssh_failures=5
spot=0 queued=0
train_flags=()
while (($#)); do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator_type=*) accelerator_type="${1#*=}" ;;
    --runtime_version=*) runtime_version="${1#*=}" ;;
    --data_dir=*) data_dir="${1#*=}" ;;
    --model_dir=*) model_dir="${1#*=}" ;;
    --poll_seconds=*) poll_seconds="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --keep) keep=1 ;;
    --no_create) create=0 ;;
    --spot) spot=1 ;;
    --queued) queued=1 ;;
    --attach) attach=1 ;;
    --delete) delete_only=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; train_flags=("$@"); break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

run() {
  if ((dry_run)); then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

tpu=(gcloud compute tpus tpu-vm)
queued_resources=(gcloud compute tpus queued-resources)
for required in name project zone; do
  [[ -n "${!required}" ]] || die "--$required is required (see --help)"
done
where=(--project="$project" --zone="$zone")
delete_tpu() {
  if ((queued)); then  # --force: its TPU with it
    run "${queued_resources[@]}" delete "$name" "${where[@]}" --force --quiet
  else
    run "${tpu[@]}" delete "$name" "${where[@]}" --quiet
  fi
}
if ((delete_only)); then
  delete_tpu
  exit
fi

# The run's files on worker 0: its console output and, once it has ended, its exit status.
log_file='~/resnet_dist.log'
status_file='~/resnet_dist.status'
on_worker0() {
  run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=0 --command="$1"
}

# The state of the TPU (READY, PREEMPTED, TERMINATED, ...) or, given
# `queued-resources state.state`, of its queued resource (WAITING_FOR_RESOURCES,
# ACTIVE, FAILED, ...) as the TPU API tells it; NOT_FOUND once it is deleted,
# UNKNOWN when the API cannot be asked.
tpu_state() {
  local group="${1:-tpu-vm}" field="${2:-state}" answer
  if answer="$(gcloud compute tpus "$group" describe "$name" "${where[@]}" \
    --format="value($field)" 2>&1)"; then
    echo "${answer:-UNKNOWN}"
  elif [[ "$answer" == *NOT_FOUND* || "$answer" == *"not found"* ]]; then
    echo NOT_FOUND
  else
    echo UNKNOWN
  fi
}

# The TPU is gone or unreachable: one line, and the status of a lost peer.
lost() {
  echo "error: $1; the run's checkpoints are kept in its --model_dir: delete what is left" \
    "of the TPU (--delete), then run this command again to create it anew and resume from" \
    "the last checkpoint" >&2
  exit 69
}

# Returns the run's exit status once it has ended; prints the last log line while it runs.
# A failed ssh (a dropped connection, a VM being restarted) is tried again, unless
# the TPU API says the TPU is gone, or max_ssh_failures polls in a row failed.
poll() {
  local answer failures=0 state
  while true; do
    if answer="$(on_worker0 "tail -n 1 $log_file; cat $status_file 2>/dev/null")"; then
      failures=0
    else
      failures=$((failures + 1))
      state="$(tpu_state)"
      case "$state" in
        PREEMPTED | TERMINATED | STOPPING | STOPPED | DELETING | NOT_FOUND)
          lost "the TPU $name is $state" ;;
      esac
      ((failures < max_ssh_failures)) ||
        lost "worker 0 of the TPU $name did not answer $failures polls in a row (state $state)"
    fi
    if ((dry_run)); then
      echo "$answer"
      return 0
    fi
    if [[ "$answer" =~ resnet_dist\ exited\ with\ status\ ([0-9]+) ]]; then
      return "${BASH_REMATCH[1]}"
    fi
    [[ -z "$answer" ]] || echo "[tpu_vm] ${answer##*$'\n'}"
    sleep "$poll_seconds"
  done
}

# A queued resource waits for capacity (WAITING_FOR_RESOURCES, PROVISIONING)
# until ACTIVE, when its TPU exists; FAILED, SUSPENDED or deleted ends the script.
wait_until_active() {
  local state="" previous=""
  if ((dry_run)); then
    run "${queued_resources[@]}" describe "$name" "${where[@]}" --format='value(state.state)'
    return
  fi
  while true; do
    state="$(tpu_state queued-resources state.state)"
    case "$state" in
      ACTIVE) return ;;
      FAILED | SUSPENDING | SUSPENDED | NOT_FOUND) lost "the queued resource $name is $state" ;;
    esac
    [[ "$state" == "$previous" ]] || echo "[tpu_vm] queued resource $name: $state"
    previous="$state"
    sleep "$poll_seconds"
  done
}

finish() {
  local status=0
  poll || status=$?
  if ((status == 0 && !keep)); then
    delete_tpu
  elif ((status != 0)); then
    echo "[tpu_vm] the run ended with status $status; the TPU $name is kept:" \
      "its log is $log_file on worker 0. Run again to resume, or delete it with" \
      "launch/tpu_vm.sh --name=$name --project=$project --zone=$zone --delete" >&2
  fi
  exit "$status"
}

if ((attach)); then
  finish
fi

for required in accelerator_type data_dir model_dir; do
  [[ -n "${!required}" ]] || die "--$required is required (see --help)"
done
[[ "$data_dir" == gs://* ]] || die "--data_dir=$data_dir must be on GCS (gs://...): every TPU worker reads it"
[[ "$model_dir" == gs://* ]] || die "--model_dir=$model_dir must be on GCS (gs://...): workers write it"
# The runtime, the TensorFlow its image carries, one host or several, and the
# training's environment: launch/tpu_runtime.py holds the table of them.
tf_version="$(sed -n 's/^tensorflow==//p' "$repo/requirements.txt")"
resolved="$(python3 "$repo/launch/tpu_runtime.py" "$accelerator_type" "$tf_version" \
  "$runtime_version")" || exit 2
eval "$resolved"
((dry_run)) || echo "[tpu_vm] $accelerator_type: runtime $runtime_version (TensorFlow" \
  "$tensorflow), training environment: ${train_env:-none}"
if ((pod)); then
  tpu_flags="--tpu=$name --tpu_zone=$zone --gcp_project=$project"
else
  tpu_flags="--tpu=local"
fi
archive="/tmp/resnet_dist-$name.tar.gz"
quoted_flags="$(printf ' %q' "${train_flags[@]}")"
# Each host's own GCE metadata server tells of its coming preemption or maintenance.
metadata="http://metadata.google.internal/computeMetadata/v1"
train_command="$train_env python3 -m launch.train --strategy=tpu $tpu_flags --data_dir=$data_dir --model_dir=$model_dir --gce_metadata=$metadata$quoted_flags"
# On a pod slice the loss of any host ends the run: a relay on every host
# leaves its notice in model_dir/notices, where worker 0's run finds it. It
# must not open the host's chips (the slice's runtime serves them). A relay
# of an earlier run is stopped first ("[l]" keeps pkill off this command's own shell).
relay_command="pkill -f '[l]aunch.notices'; cd resnet_dist && TPU_LOAD_LIBRARY=0 nohup setsid python3 -m launch.notices --model_dir=$model_dir --gce_metadata=$metadata > ~/resnet_dist-notices.log 2>&1 < /dev/null &"

spot_flag=()
if ((spot)); then
  spot_flag=(--spot)
fi
if ((create && queued)); then
  run "${queued_resources[@]}" create "$name" --node-id="$name" "${where[@]}" \
    --accelerator-type="$accelerator_type" --runtime-version="$runtime_version" "${spot_flag[@]}"
  wait_until_active
elif ((create)); then
  run "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator_type" \
    --version="$runtime_version" "${spot_flag[@]}"
fi
run git -C "$repo" archive --format=tar.gz --prefix=resnet_dist/ -o "$archive" HEAD
run "${tpu[@]}" scp "$archive" "$name:~/resnet_dist.tar.gz" "${where[@]}" --worker=all
# The runtime image has TensorFlow for TPUs: install the rest beside it, replacing
# nothing the image has (launch/tpu_install.py), on every worker (on a pod slice
# each host runs an input pipeline). A mismatch stops here, before training.
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="rm -rf resnet_dist && tar xzf resnet_dist.tar.gz && cd resnet_dist && python3 launch/tpu_install.py"
if ((pod)); then
  run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$relay_command"
fi
# Detached from the ssh session (setsid, nohup), so a dropped connection does not end it.
on_worker0 "rm -f $status_file && cd resnet_dist && nohup setsid bash -c '$train_command; echo resnet_dist exited with status \$? > $status_file' > $log_file 2>&1 < /dev/null &"
finish
