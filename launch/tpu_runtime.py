"""The Cloud TPU VM software version (runtime) and the training environment
for an accelerator type: the one table of them, read by tpu_vm.sh.

  python3 launch/tpu_runtime.py ACCELERATOR_TYPE TENSORFLOW_VERSION [RUNTIME]

prints shell assignments for tpu_vm.sh to eval: runtime_version, tensorflow
(the version that runtime's image carries), pod (1: several hosts) and
train_env (the variables the training command sets itself, since it runs
under a non-login shell that reads no profile). RUNTIME, when given, is used
as it is and only checked. A bad argument is one line on stderr, status 2.

Standard library only: it runs wherever tpu_vm.sh does, before any install.
"""

import re
import sys

# TensorFlow versions with TPU VM runtimes this project runs on (Keras 3
# from 2.16). From 2.18 on each name also says which TPU generations its
# image serves; before, one image served v2 to v5p.
TENSORFLOW_VERSIONS = ("2.16.1", "2.17.0", "2.17.1", "2.18.0", "2.19.0", "2.20.0", "2.21.0")
_PER_GENERATION_FROM = (2, 18)

# Accelerator family -> the runtime name's generation suffix (TensorFlow >= 2.18).
GENERATIONS = {
    "v2": "v5p-and-below", "v3": "v5p-and-below", "v4": "v5p-and-below",
    "v5p": "v5p-and-below", "v5litepod": "v5e-and-v6", "v6e": "v5e-and-v6",
}
# What v5e and v6e hosts run: PJRT only, and only on the per-generation images.
_PJRT_ONLY = {"v5litepod", "v6e"}

# Every TPU VM host has 8 TensorCores (v2, v3) or chips (v4/v5p cores count
# 2 a chip: 8 is still one host; v5e, v6e: 8 chips a host), so a type whose
# number is above 8 is a pod slice of several hosts.
_CORES_PER_HOST = 8

# As Google's TensorFlow TPU configurations set them. A pod slice has one
# client, on worker 0, which must not open worker 0's chips itself; one host
# on PJRT reaches its chips through libtpu's pluggable-device C API.
POD_ENV = "TPU_LOAD_LIBRARY=0"
PJRT_ENV = "NEXT_PLUGGABLE_DEVICE_USE_C_API=true TF_PLUGGABLE_DEVICE_LIBRARY_PATH=/lib/libtpu.so"


class Error(ValueError):
  pass


def _version_tuple(version):
  return tuple(int(part) for part in version.split("."))


def default_runtime(family, tensorflow, pod):
  """The runtime name for a family, TensorFlow version and host count."""
  if tensorflow not in TENSORFLOW_VERSIONS:
    raise Error(f"no TPU VM runtime known for TensorFlow {tensorflow} (known: "
                f"{', '.join(TENSORFLOW_VERSIONS)}); pass --runtime_version")
  name = f"tpu-vm-tf-{tensorflow}{'-pod' if pod else ''}-pjrt"
  if _version_tuple(tensorflow) >= _PER_GENERATION_FROM:
    return f"{name}-{GENERATIONS[family]}"
  if family in _PJRT_ONLY:
    raise Error(f"{family} has TensorFlow runtimes from "
                f"{'.'.join(map(str, _PER_GENERATION_FROM))} on, not {tensorflow}")
  return name


def resolve(accelerator_type, tensorflow, runtime=""):
  """(runtime, TensorFlow version of its image, pod?, training environment)."""
  match = re.fullmatch(r"(v[0-9]+[a-z]*)-([0-9]+)", accelerator_type)
  if not match:
    raise Error(f"--accelerator_type={accelerator_type} is not of the form v3-8, v4-32, "
                "v5litepod-16")
  family, count = match.group(1), int(match.group(2))
  if family not in GENERATIONS:
    raise Error(f"--accelerator_type={accelerator_type}: unknown TPU family {family} (known: "
                f"{', '.join(GENERATIONS)})")
  # Slices come in powers of two: of chips from 1 (v5e, v6e), of TensorCores from 8.
  chips = family in _PJRT_ONLY
  smallest, examples = (1, (4, 16)) if chips else (_CORES_PER_HOST, (8, 32))
  if count < smallest or count & (count - 1):
    raise Error(f"--accelerator_type={accelerator_type}: {family} slices have a power of two "
                f"of {'chips' if chips else 'TensorCores'} from {smallest} "
                f"({family}-{examples[0]}, {family}-{examples[1]}, ...)")
  pod = count > _CORES_PER_HOST
  runtime = runtime or default_runtime(family, tensorflow, pod)
  image = re.match(r"tpu-vm-tf-([0-9]+\.[0-9]+\.[0-9]+)", runtime)
  if not image:
    raise Error(f"--runtime_version={runtime} is not a TensorFlow runtime (tpu-vm-tf-...): "
                "its image has no TensorFlow for TPUs")
  if _version_tuple(image.group(1)) < _version_tuple(TENSORFLOW_VERSIONS[0]):
    raise Error(f"--runtime_version={runtime} carries TensorFlow {image.group(1)}; resnet_dist "
                f"needs {TENSORFLOW_VERSIONS[0]} or later (Keras 3)")
  pjrt = "-pjrt" in runtime
  if family in _PJRT_ONLY and not pjrt:
    raise Error(f"--runtime_version={runtime}: {family} runs only PJRT runtimes (...-pjrt-...)")
  if ("-pod" in runtime) != pod:
    raise Error(f"--runtime_version={runtime} is for {'a pod slice' if not pod else 'one host'}"
                f", and {accelerator_type} is {'a pod slice' if pod else 'one host'}")
  env = POD_ENV if pod else (PJRT_ENV if pjrt else "")
  return runtime, image.group(1), pod, env


def main(argv):
  if len(argv) not in (3, 4):
    print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
    return 2
  try:
    runtime, tensorflow, pod, env = resolve(*argv[1:])
  except Error as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"runtime_version='{runtime}' tensorflow='{tensorflow}' pod={int(pod)} "
        f"train_env='{env}'")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
