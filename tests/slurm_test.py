"""Training under a real SLURM: munged, slurmctld and slurmd on 127.0.0.1.

The daemons are Debian's (slurm-wlm, munge; launch/setup.sh installs them),
started by this test with a slurm.conf and munge key of its own in its temp
dir, one node of this machine's CPUs. Nothing is mocked: the tasks read the
SLURM_* variables the real srun sets.

- `srun -n2 python -m launch.train` (no --strategy, no TF_CONFIG) trains one
  model across both tasks, the weights one device trains. A task that read
  no cluster would train a model of its own on half the batches and fail.
- launch/slurm/train.sbatch as users submit it: `scancel --signal=TERM`
  (what --signal=TERM@grace and preemption send) ends both tasks with 75
  after a checkpoint, the script requeues the job, and the rerun of the same
  command resumes from that checkpoint.
"""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
from absl.testing import absltest

from flags import definitions
from launch import multi_worker
from resnet_dist import train
from tests import equivalence_test, fixtures, launching

DAEMONS = ("munged", "slurmctld", "slurmd")


def read(path):
  if not os.path.exists(path):
    return ""
  with open(path) as f:
    return f.read()


class LocalSlurm:
  """A SLURM cluster of one node, this machine, whose daemons live in `root`."""

  def __init__(self, root):
    self.root = root
    self.conf = os.path.join(root, "slurm.conf")
    self.socket = os.path.join(root, "munge", "socket")
    self.env = {**launching.ENV, "SLURM_CONF": self.conf}
    self.daemons = []

  def start(self):
    missing = [d for d in DAEMONS if not shutil.which(d, path="/usr/sbin:/usr/bin")]
    if missing:
      raise AssertionError(f"{', '.join(missing)} not installed: run launch/setup.sh")
    munge = os.path.join(self.root, "munge")
    os.makedirs(munge, mode=0o755)
    for name in ("spool", "state"):
      os.makedirs(os.path.join(self.root, name))
    key = os.path.join(munge, "key")
    with open(key, "wb") as f:
      f.write(os.urandom(1024))
    os.chmod(key, 0o600)
    self._write_conf()
    self._daemon("/usr/sbin/munged", "--foreground", "--force", f"--key-file={key}",
                 f"--socket={self.socket}", f"--pid-file={munge}/pid",
                 f"--log-file={munge}/log", f"--seed-file={munge}/seed")
    self._wait(lambda: os.path.exists(self.socket), "munged's socket")
    self._daemon("/usr/sbin/slurmctld", "-D", "-f", self.conf)
    self._daemon("/usr/sbin/slurmd", "-D", "-f", self.conf)
    self._wait(lambda: self.command("sinfo", "-h", "-o", "%T").stdout.strip() == "idle",
               "the node to be idle")

  def _write_conf(self):
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    controller_port, node_port = multi_worker.free_ports(2)
    paths = {name: os.path.join(self.root, name) for name in ("spool", "state")}
    with open(self.conf, "w") as f:
      f.write(f"""ClusterName=resnet-dist-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={controller_port}
SlurmdPort={node_port}
AuthType=auth/munge
AuthInfo=socket={self.socket}
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd.log
SlurmdSpoolDir={paths['spool']}
StateSaveLocation={paths['state']}
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES OverSubscribe=YES MaxTime=INFINITE State=UP
""")

  def _daemon(self, *command):
    self.daemons.append(subprocess.Popen(command, env=self.env, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True))

  def _wait(self, ready, what, timeout=60):
    deadline = time.time() + timeout
    while not ready():
      ended = [d.args[0] for d in self.daemons if d.poll() is not None]
      if ended or time.time() > deadline:
        logs = "".join(read(f"{self.root}/{name}.log")[-1500:]
                       for name in ("slurmctld", "slurmd"))
        raise AssertionError(f"waiting for {what}: {ended or 'timed out'}\n{logs}")
      time.sleep(0.2)

  def command(self, *args, timeout=60, env=None):
    return subprocess.run(args, env={**self.env, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout, cwd=launching.ROOT)

  def stop(self):
    for daemon in reversed(self.daemons):
      daemon.send_signal(signal.SIGTERM)
    for daemon in self.daemons:
      try:
        daemon.wait(timeout=20)
      except subprocess.TimeoutExpired:
        daemon.kill()


class SlurmTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = launching.digits_dir()
    cls.slurm = LocalSlurm(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    cls.slurm.start()

  @classmethod
  def tearDownClass(cls):
    cls.slurm.stop()
    super().tearDownClass()

  def test_srun_tasks_train_the_weights_one_device_does(self):
    flags = [*equivalence_test.COMMON, f"--data_dir={self.data_dir}"]
    reference = self.create_tempdir().full_path
    definitions.FLAGS.unparse_flags()
    definitions.FLAGS(["train", *flags, "--strategy=one_device", f"--model_dir={reference}"])
    with fixtures.quiet():
      train.run(definitions.config_from_flags())
    model_dir = self.create_tempdir().full_path
    result = self.slurm.command(
        "srun", "-N1", "-n2", "--cpus-per-task=1",
        *launching.command("launch.train", *flags, f"--model_dir={model_dir}"), timeout=600)
    self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
    self.assertIn("strategy   multi_worker_mirrored: 2 replica(s), worker 0 of 2 tasks",
                  result.stdout)
    self.assertRegex(result.stdout, r"all-reduce ring, [\d.]+ MB a step in 1 pack")
    self.assertEqual(result.stdout.count("done: 6 steps"), 1)  # one chief, one run
    equivalence = equivalence_test.StrategyEquivalenceTest("assert_same_weights")
    equivalence.assert_same_weights(equivalence_test.model_weights(reference),
                                    equivalence_test.model_weights(model_dir))

  def test_the_sbatch_script_saves_on_sigterm_and_its_requeue_resumes(self):
    model_dir = self.create_tempdir().full_path
    output = os.path.join(model_dir, "job.out")
    # The copy-and-edit lines overridden for a node of CPUs, as users do.
    submitted = self.slurm.command(
        "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
        "--gres=none", f"--output={output}", "launch/slurm/train.sbatch",
        "--model=resnet8", "--train_epochs=1000", "--steps_per_loop=10",
        "--log_every_steps=10", "--skip_eval", f"--data_dir={self.data_dir}",
        env={"FLAGFILE": "launch/configs/digits.cfg", "MODEL_DIR": model_dir,
             "PYTHON": launching.command("")[0]})
    self.assertEqual(submitted.returncode, 0, submitted.stderr)
    job = submitted.stdout.strip().split(";")[0]
    try:
      self.wait_for(output, r"^step \d+/", "the first run to train")
      self.slurm.command("scancel", "--signal=TERM", job)
      saved = self.wait_for(output, r"SIGTERM: saved a checkpoint at step (\d+)",
                            "the checkpoint of the signal")
      self.wait_for(output, r"^requeued job", "the script to requeue the job")
      self.wait_for(output, rf"^resuming from step {saved.group(1)} ", "the requeued job")
    finally:
      self.slurm.command("scancel", job)
    text = read(output)
    self.assertRegex(text, r"srun: error: \S+: tasks 0-1: Exited with exit code 75")
    self.assertIn("srun ended with status 75", text)
    self.assertIn("(restart 1)", text)

  def wait_for(self, path, pattern, what, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
      text = read(path)
      match = re.search(pattern, text, re.M)
      if match:
        return match
      time.sleep(0.2)
    raise AssertionError(f"waiting for {what}; the job wrote:\n{text[-3000:]}")


if __name__ == "__main__":
  absltest.main()
