"""The frameworks launch.benchmark compares ours with, each in a virtual
environment of its own (never the project's .venv), made on first use.

PEERS: name -> (its environment, the step script the environment's python
runs); ENVIRONMENTS: environment -> its requirements files in this folder.
The keras peer runs in the project's own environment (launch.benchmark itself).
"""

import hashlib
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
VENVS = os.path.join(ROOT, ".peers")

# name -> (environment, step script)
PEERS = {
    "modelgarden": ("modelgarden", "modelgarden_step.py"),
    "torch": ("torch", "torch_step.py"),
    "torch_compile": ("torch", "torch_step.py"),
}
# environment -> (requirements, requirements installed without their dependencies)
ENVIRONMENTS = {
    "modelgarden": ("modelgarden.txt", "modelgarden-nodeps.txt"),
    "torch": ("torch.txt", None),
}


def _stamp(environment):
  digest = hashlib.sha256()
  for name in ENVIRONMENTS[environment]:
    if name:
      with open(os.path.join(HERE, name), "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


def python(peer):
  """The python of a peer's environment, made (or remade, when its
  requirements changed) first: pip's progress goes to stderr."""
  environment, _ = PEERS[peer]
  venv = os.path.join(VENVS, environment)
  stamp_path = os.path.join(venv, ".requirements.sha256")
  want = _stamp(environment)
  binary = os.path.join(venv, "bin", "python")
  try:
    with open(stamp_path) as f:
      if f.read() == want and os.access(binary, os.X_OK):
        return binary
  except OSError:
    pass
  print(f"benchmark: making the {environment} peers' environment in {venv} (once)",
        file=sys.stderr, flush=True)
  subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
  pip = [binary, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
  requirements, no_deps = ENVIRONMENTS[environment]
  subprocess.run(pip + ["-r", os.path.join(HERE, requirements)], check=True,
                 stdout=sys.stderr)
  if no_deps:
    subprocess.run(pip + ["--no-deps", "-r", os.path.join(HERE, no_deps)], check=True,
                   stdout=sys.stderr)
  with open(stamp_path, "w") as f:
    f.write(want)
  return binary


def command(peer, case, seconds, min_steps):
  """argv that times one case of a peer in its environment."""
  _, script = PEERS[peer]
  return [python(peer), os.path.join(HERE, script), json.dumps(case), str(seconds),
          str(min_steps)]
