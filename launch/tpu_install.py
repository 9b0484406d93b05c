"""Installs this project on a TPU VM against its image's own TensorFlow.

  python3 launch/tpu_install.py [--dry_run]      (in the copied repository)

The image's TensorFlow for TPUs, and everything already installed beside it
(its Keras, TensorBoard, protobuf, grpcio), stays: requirements.txt's pins
are installed only for what the image lacks (never TensorFlow, Keras or
TensorBoard, which come with the image's TensorFlow), with every installed
version as a pip constraint, so pip can add packages but never replace one. What cannot
be satisfied so (the image's TensorFlow too old, a conflict pip finds) is one
line on stderr and status 3, before any training starts.

Standard library only: it runs before anything is installed.
"""

import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_TENSORFLOW = (2, 16)     # Keras 3
# Never installed from requirements.txt: the image's TensorFlow (whatever its
# distribution's name, tensorflow-tpu on some images) brings its own.
IMAGE_OWNS = {"tensorflow", "keras", "tensorboard"}
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name):
  return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions():
  """{canonical name: version} of what this Python already has."""
  return {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
          if d.metadata["Name"]}


def plan(requirement_lines, installed):
  """(requirements to install, constraints): the requirement lines whose
  package is not installed (nor TensorFlow's own), and every installed
  package pinned where it is."""
  wanted = []
  for line in requirement_lines:
    line = line.split("#", 1)[0].strip()
    match = _NAME.match(line)
    if match and canonical(match.group(1)) not in installed.keys() | IMAGE_OWNS:
      wanted.append(line)
  constraints = [f"{name}=={version}" for name, version in sorted(installed.items())]
  return wanted, constraints


def image_tensorflow():
  """The TensorFlow version the image's python3 imports, or None."""
  result = subprocess.run(
      [sys.executable, "-c", "import tensorflow as tf; print(tf.__version__)"],
      capture_output=True, text=True, check=False, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  lines = result.stdout.split()
  return lines[-1] if result.returncode == 0 and lines else None


def _lines(name):
  with open(os.path.join(REPO, name)) as f:
    return f.read().splitlines()


def _pip(args, dry_run):
  command = [sys.executable, "-m", "pip", "install", "-q", *args]
  if dry_run:
    print("+", " ".join(command))
    return None
  return subprocess.run(command, capture_output=True, text=True, check=False)


def _last_error_line(output):
  lines = [l.strip() for l in output.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("ERROR")]
  return (errors or lines or ["(no output)"])[-1]


def main(argv):
  dry_run = "--dry_run" in argv[1:]
  version = image_tensorflow()
  if version is None:
    print("error: the TPU VM's python3 cannot import tensorflow: use a tpu-vm-tf-* runtime",
          file=sys.stderr)
    return 3
  if tuple(int(p) for p in re.findall(r"\d+", version)[:2]) < MIN_TENSORFLOW:
    print(f"error: the image's TensorFlow is {version}; resnet_dist needs "
          f"{'.'.join(map(str, MIN_TENSORFLOW))} or later (Keras 3): pick another "
          "--runtime_version", file=sys.stderr)
    return 3
  installed = installed_versions()
  wanted, constraints = plan(_lines("requirements.txt"), installed)
  no_deps, _ = plan(_lines("requirements-nodeps.txt"), installed)
  with tempfile.TemporaryDirectory() as scratch:
    pinned = os.path.join(scratch, "constraints.txt")
    with open(pinned, "w") as f:
      f.write("\n".join(constraints) + "\n")
    steps = ([[*wanted, "-c", pinned]] if wanted else []) + (
        [["--no-deps", *no_deps]] if no_deps else [])
    for args in steps:
      result = _pip(args, dry_run)
      if result is not None and result.returncode:
        print(f"error: cannot install resnet_dist beside the image's TensorFlow {version}: "
              f"{_last_error_line(result.stdout + result.stderr)}", file=sys.stderr)
        return 3
  print(f"resnet_dist installed against the image's TensorFlow {version} "
        f"({len(wanted) + len(no_deps)} packages added, none replaced)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
