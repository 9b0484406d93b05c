#!/usr/bin/env bash
# Bazel runs this through a runfiles symlink; the real file lies in the
# repository, two levels below its root, beside which .venv was set up.
here="$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"
venv_python="$here/../../.venv/bin/python"
if [ ! -x "$venv_python" ]; then
  echo "resnet_dist: $venv_python is missing; run 'make setup' first" >&2
  exit 127
fi
exec "$venv_python" "$@"
