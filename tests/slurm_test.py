"""Training under a real SLURM: munged, slurmctld and slurmd on 127.0.0.1.

The daemons are Debian's (slurm-wlm, munge; launch/setup.sh installs them),
started by this test with a slurm.conf and munge key of its own in its temp
dir, one node of this machine's CPUs. Nothing is mocked: the tasks read the
SLURM_* variables the real srun sets.

launch/slurm/train.sbatch as users submit it: its `srun` starts two tasks
of `python -m launch.train` (no --strategy, no TF_CONFIG) that train one
model, the cluster read from srun's variables; `scancel --signal=TERM` (what
--signal=TERM@grace and preemption send) ends both tasks with 75 after a
checkpoint, the script requeues the job, and the rerun of the same command
resumes from that checkpoint. (That the tasks of such a cluster train the
weights one device does is tests/equivalence_test.py, with TF_CONFIG; that
srun's variables give the same cluster is tests/cluster_test.py.)
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

from launch import multi_worker
from tests import launching

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
    # cred_expire is also how long SLURM holds a requeued job back (120 s by
    # default), and the scheduler's full pass runs every sched_interval (60 s):
    # both short here, so that the requeued job starts within seconds.
    with open(self.conf, "w") as f:
      f.write(f"""ClusterName=resnet-dist-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={controller_port}
SlurmdPort={node_port}
AuthType=auth/munge
AuthInfo=socket={self.socket},cred_expire=10
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2
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
    """Ends the daemons, then whatever they started: slurmstepd and a job's
    tasks outlive slurmd, and a task left training would hold the cores and
    its ports for the rest of the suite."""
    for daemon in reversed(self.daemons):
      daemon.send_signal(signal.SIGTERM)
    for daemon in self.daemons:
      try:
        daemon.wait(timeout=20)
      except subprocess.TimeoutExpired:
        daemon.kill()
    deadline = time.time() + 30
    while left := self.processes():
      if time.time() > deadline:
        raise AssertionError(f"processes of the test's SLURM outlived it: {left}")
      for pid in left:
        try:
          os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
      time.sleep(0.2)

  def processes(self):
    """Live processes of this cluster: those whose environment names its
    slurm.conf (the daemons', slurmstepd's and the jobs' tasks')."""
    marker = f"SLURM_CONF={self.conf}".encode()
    return [int(pid) for pid in os.listdir("/proc")
            if pid.isdigit() and int(pid) != os.getpid() and _runs_with(int(pid), marker)]


def _runs_with(pid, variable):
  """Whether process pid is alive (not a zombie) with `variable` (NAME=value) set."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      if f.read().rsplit(")", 1)[1].split()[0] == "Z":
        return False
    with open(f"/proc/{pid}/environ", "rb") as f:
      return variable in f.read().split(b"\0")
  except OSError:  # gone, or not ours to read
    return False


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

  def test_the_sbatch_scripts_tasks_train_one_model_save_on_sigterm_and_resume(self):
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
      self.wait_for(output, r"^0: step \d+/", "the first run to train")
      self.slurm.command("scancel", "--signal=TERM", job)
      saved = self.wait_for(output, r"SIGTERM: saved a checkpoint at step (\d+)",
                            "the checkpoint of the signal")
      self.wait_for(output, r"^requeued job", "the script to requeue the job")
      self.wait_for(output, rf"^0: resuming from step {saved.group(1)} ", "the requeued job")
    finally:
      self.slurm.command("scancel", job)
    text = read(output)
    # One model across srun's two tasks: the cluster read from its variables,
    # and one log of one run, its chief's.
    self.assertIn("strategy   multi_worker_mirrored: 2 replica(s), worker 0 of 2 tasks", text)
    self.assertRegex(text, r"all-reduce ring, [\d.]+ MB a step in 1 pack")
    # Each task's own line (srun --label) says how it ended.
    for task in (0, 1):
      self.assertEqual(text.count(f"{task}: SIGTERM: saved a checkpoint at step {saved.group(1)}"),
                       1, text[-3000:])
    # srun reports the tasks' statuses together or, under --label, one by one.
    exited = re.findall(r"srun: error: \S+: tasks? ([\d-]+): Exited with exit code 75", text)
    self.assertIn(sorted(exited), (["0-1"], ["0", "1"]), text[-3000:])
    self.assertIn("srun ended with status 75", text)
    self.assertIn("(restart 1)", text)

  def wait_for(self, path, pattern, what, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
      text = read(path)
      match = re.search(pattern, text, re.M)
      if match:
        print(f"{time.strftime('%X')} {what}", flush=True)
        return match
      time.sleep(0.2)
    raise AssertionError(f"waiting for {what}; the job wrote:\n{text[-3000:]}")


if __name__ == "__main__":
  absltest.main()
