#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine: Bazel 4.2.3 from Debian and a
# virtual environment at .venv with the pinned requirements. Safe to re-run;
# each part is skipped when already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

# slurm-wlm and munge: the SLURM tests start a real slurmctld and slurmd.
apt_packages=(bazel-bootstrap bazel-rules-java bazel-platforms slurm-wlm munge)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The stamp records what the venv was built from, so changing a requirements file
# rebuilds it on the next `make`.
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: building .venv from requirements.txt"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
  echo "$want" > "$stamp"
fi
