#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it, copy this repository to every
# worker, install the pinned packages, run the training on all workers at once,
# then delete the TPU (unless --keep).
#
#   launch/tpu_vm.sh --name=resnet-v3-8 --project=P --zone=europe-west4-a \
#     --accelerator_type=v3-8 --runtime_version=tpu-vm-tf-2.21.0-pjrt \
#     --data_dir=gs://B/imagenet --model_dir=gs://B/runs/r50 \
#     -- --flagfile=launch/configs/resnet50_imagenet_tpu_v3-8.cfg
#
# --dry_run prints every command instead of running it. Flags after "--" go to
# launch.train on each worker (with --strategy=tpu --tpu=local and the two dirs).
# Exit status: 2 on bad arguments; otherwise that of the first failing command.
set -euo pipefail

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
}

die() {
  echo "error: $*" >&2
  exit 2
}

name="" project="" zone="" accelerator_type="" runtime_version="" data_dir="" model_dir=""
dry_run=0 keep=0 create=1
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
    --dry_run) dry_run=1 ;;
    --keep) keep=1 ;;
    --no_create) create=0 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; train_flags=("$@"); break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

for required in name project zone accelerator_type runtime_version data_dir model_dir; do
  [[ -n "${!required}" ]] || die "--$required is required (see --help)"
done
[[ "$data_dir" == gs://* ]] || die "--data_dir=$data_dir must be on GCS (gs://...): every TPU worker reads it"
[[ "$model_dir" == gs://* ]] || die "--model_dir=$model_dir must be on GCS (gs://...): workers write it"

run() {
  if ((dry_run)); then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

tpu=(gcloud compute tpus tpu-vm)
where=(--project="$project" --zone="$zone")
repo="$(cd "$(dirname "$0")/.." && pwd)"
archive="/tmp/resnet_dist-$name.tar.gz"
quoted_flags="$(printf ' %q' "${train_flags[@]}")"

if ((create)); then
  run "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator_type" \
    --version="$runtime_version"
fi
if ((!keep)); then
  # Delete the TPU however the run ends: it is billed while it exists.
  trap 'run "${tpu[@]}" delete "$name" "${where[@]}" --quiet' EXIT
fi
run git -C "$repo" archive --format=tar.gz --prefix=resnet_dist/ -o "$archive" HEAD
run "${tpu[@]}" scp "$archive" "$name:~/resnet_dist.tar.gz" "${where[@]}" --worker=all
# The runtime image has TensorFlow for TPUs: install the other pinned packages beside it.
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="rm -rf resnet_dist && tar xzf resnet_dist.tar.gz && cd resnet_dist && grep -v -e '^tensorflow==' -e '^keras==' requirements.txt > /tmp/requirements-tpu.txt && python3 -m pip install -q -r /tmp/requirements-tpu.txt && python3 -m pip install -q --no-deps -r requirements-nodeps.txt"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="cd resnet_dist && python3 -m launch.train --strategy=tpu --tpu=local --data_dir=$data_dir --model_dir=$model_dir$quoted_flags"
